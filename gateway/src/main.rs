//! `citywatch`: the gateway's command line. Thin: parses arguments, loads the configuration,
//! starts [`citywatch_gateway::gateway::Gateway`] and stops it on Ctrl-C or SIGTERM.

use std::path::PathBuf;

use anyhow::{Context, Result};
#[cfg(feature = "demo")]
use citywatch_edge::sim::Scenario;
use citywatch_gateway::config::Config;
#[cfg(feature = "demo")]
use citywatch_gateway::gateway::DemoFleet;
use citywatch_gateway::gateway::Gateway;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "citywatch", version, about = "Citywatch IoT sensing and alerting gateway")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (without --config: embedded broker and store, all defaults).
    Run {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Embedded broker and store plus a simulated fleet, API on 127.0.0.1:8080.
    #[cfg(feature = "demo")]
    Demo {
        /// A config file to start from (defaults otherwise; the broker must be embedded).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Simulated devices (kinds dealt round-robin: gas, smoke, siren).
        #[arg(long, default_value_t = 30)]
        devices: usize,
        #[arg(long, default_value = "demo")]
        site: String,
        /// normal, gas-leak, fire, bracket-corrosion, offline, flapping, bad-payloads.
        #[arg(long, default_value = "normal")]
        scenario: Scenario,
        /// Telemetry interval of the simulated devices, seconds.
        #[arg(long, default_value_t = 5)]
        interval: u32,
        /// Drive the fleet as a load generator at this many readings per second.
        #[arg(long)]
        rate: Option<f64>,
    },
    /// Validate a configuration file; names the bad key and why.
    CheckConfig { file: PathBuf },
    /// API tokens: `token create --name N --role R` prints a new token once and its config snippet.
    Token {
        #[command(subcommand)]
        action: TokenCommand,
    },
    /// Device inventory (maintenance).
    Devices {
        #[command(subcommand)]
        command: DevicesCommand,
    },
    /// Cluster mode on NATS JetStream (SPEC §9).
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Print one nats-server node's configuration: JetStream, MQTT listener, routes, the site
    /// partition mapping.
    NatsConfig {
        #[arg(long)]
        name: String,
        /// NATS client port.
        #[arg(long)]
        port: u16,
        #[arg(long)]
        cluster_port: u16,
        #[arg(long)]
        mqtt_port: u16,
        /// JetStream store directory.
        #[arg(long)]
        store: PathBuf,
        /// Every node's route URL, comma-separated: nats://host:cluster_port,…
        #[arg(long, value_delimiter = ',')]
        routes: Vec<String>,
        #[arg(long, default_value_t = citywatch_gateway::cluster::config::DEFAULT_PARTITIONS)]
        partitions: u16,
        /// Interface every listener binds.
        #[arg(long, default_value = "0.0.0.0")]
        host: String,
        /// Optional HTTP monitoring port (/healthz).
        #[arg(long)]
        http_port: Option<u16>,
        /// Copies of the MQTT listener's streams ($MQTT_msgs, sessions, retained messages);
        /// default: min(3, the number of --routes), as [cluster] replicas does for the gateways' streams.
        #[arg(long)]
        replicas: Option<usize>,
        /// Close the cluster: the user gateways connect as (full access, NATS client port only).
        /// Give --device-user or --accounts too. Without them, anyone reaching a port may do anything.
        #[arg(long)]
        gateway_user: Option<String>,
        /// Close the cluster: the user devices connect as (MQTT only; publish their status,
        /// telemetry and event topics, subscribe to their cmd topic). Give --gateway-user too.
        #[arg(long)]
        device_user: Option<String>,
        /// Close the cluster with device accounts: the [[mqtt.users]] of this Citywatch config
        /// (per-device, per-site or unrestricted, as for the embedded broker), written in as
        /// bcrypt hashes. Give --gateway-user too; --device-user is then optional.
        #[arg(long, value_name = "CONFIG")]
        accounts: Option<PathBuf>,
        /// bcrypt cost of the --accounts hashes (4..=31). nats-server pays it at every device's
        /// CONNECT, a reconnect storm included.
        #[arg(long, default_value_t = citywatch_gateway::cluster::nats_config::DEFAULT_BCRYPT_COST)]
        bcrypt_cost: u32,
        /// The nats-server environment variable holding the gateway user's password or bcrypt hash
        /// (the config names it; the password is never written into it).
        #[arg(long, default_value = citywatch_gateway::cluster::nats_config::GATEWAY_PASSWORD_ENV)]
        gateway_password_env: String,
        /// The nats-server environment variable holding the device user's password or bcrypt hash.
        #[arg(long, default_value = citywatch_gateway::cluster::nats_config::DEVICE_PASSWORD_ENV)]
        device_password_env: String,
    },
    /// Print the cluster's members, partitions with owners, and lag per partition as JSON.
    Status {
        /// A gateway config with [cluster] (default: the [cluster] defaults).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print a fresh random token (once) and the `[[http.tokens]]` entry holding only its hash.
    Create {
        /// Who holds it (recorded as the actor of their incident transitions).
        #[arg(long)]
        name: String,
        /// viewer, operator or admin.
        #[arg(long)]
        role: citywatch_gateway::api::auth::Role,
    },
}

#[derive(Debug, Subcommand)]
enum DevicesCommand {
    /// Import an inventory CSV into the running gateway (POST /api/v1/devices/import), with a
    /// progress bar; prints the counts and every rejected line. Exits 1 when lines were rejected.
    Import {
        file: PathBuf,
        /// The gateway's config: its [http] listen address is where the import goes.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The gateway's base URL instead (e.g. http://127.0.0.1:8080).
        #[arg(long)]
        url: Option<String>,
        /// Bearer token (an admin's: importing is an admin write), when the API has tokens.
        #[arg(long, env = "CITYWATCH_TOKEN")]
        token: Option<String>,
        /// Records per request.
        #[arg(long, default_value_t = 20_000)]
        chunk_rows: usize,
    },
}

fn load(path: Option<&PathBuf>) -> Result<Config> {
    match path {
        Some(p) => Config::load(p).with_context(|| format!("configuration {}", p.display())),
        None => Ok(Config::default()),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,rmqtt=warn,rmqtt_net=warn".into()));
    if matches!(cli.command, Some(Command::Cluster { .. })) {
        // `cluster status` prints JSON on stdout for scripts: its logs go to stderr.
        logs.with_writer(std::io::stderr).init();
    } else {
        logs.init();
    }
    let (config, demo) = match cli.command.unwrap_or(Command::Run { config: None }) {
        Command::CheckConfig { file } => {
            let config = load(Some(&file))?;
            // Register maps are files of their own: load them too, so a bad map is named here.
            citywatch_gateway::sources::modbus::build(&config.modbus).with_context(|| format!("configuration {}", file.display()))?;
            let source = match &config.cluster {
                Some(c) => format!("cluster node {} on {} NATS URL(s), {} partitions", c.node, c.nats.len(), c.partitions),
                None => format!("mqtt mode {:?}", config.mqtt.mode),
            };
            println!("{}: ok ({source}, http {}, storage {})", file.display(), config.http.listen, config.storage.path.display());
            return Ok(());
        }
        Command::Token { action: TokenCommand::Create { name, role } } => {
            let token = citywatch_gateway::api::auth::new_token();
            print!("{}", citywatch_gateway::api::auth::token_snippet(&name, role, &token));
            return Ok(());
        }
        Command::Devices { command: DevicesCommand::Import { file, config, url, token, chunk_rows } } => {
            let url = match url {
                Some(u) => u,
                None => {
                    let listen = load(config.as_ref())?.http.listen;
                    let host = if listen.ip().is_unspecified() { "127.0.0.1".to_owned() } else { listen.ip().to_string() };
                    format!("http://{host}:{}", listen.port())
                }
            };
            let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let report = runtime.block_on(citywatch_gateway::inspections::client::import(&url, token.as_deref(), &bytes, chunk_rows))?;
            for e in &report.errors {
                println!("line {}: {}", e.line, e.reason);
            }
            let rate = report.imported as f64 / report.seconds.max(1e-9);
            println!(
                "{}: {} imported ({} new, {} updated, {} unchanged), {} rejected, in {:.2} s ({rate:.0} rows/s)",
                file.display(), report.imported, report.created, report.updated, report.unchanged, report.rejected, report.seconds
            );
            if report.rejected > 0 {
                std::process::exit(1);
            }
            return Ok(());
        }
        Command::Cluster {
            command:
                ClusterCommand::NatsConfig {
                    name,
                    port,
                    cluster_port,
                    mqtt_port,
                    store,
                    routes,
                    partitions,
                    host,
                    http_port,
                    replicas,
                    gateway_user,
                    device_user,
                    accounts,
                    bcrypt_cost,
                    gateway_password_env,
                    device_password_env,
                },
        } => {
            use citywatch_gateway::cluster::nats_config::{Account, NodeSpec, Users};
            let accounts = match &accounts {
                None => Vec::new(),
                Some(file) => {
                    let mqtt_users = load(Some(file))?.mqtt.users;
                    if mqtt_users.is_empty() {
                        anyhow::bail!("--accounts {}: it has no [[mqtt.users]]", file.display());
                    }
                    let started = std::time::Instant::now();
                    let mut accounts = Vec::with_capacity(mqtt_users.len());
                    for chunk in mqtt_users.chunks(500) {
                        accounts.extend(Account::from_mqtt_users(chunk, bcrypt_cost).map_err(anyhow::Error::msg)?);
                        if mqtt_users.len() > 500 {
                            eprintln!("hashing account passwords: {} of {}", accounts.len(), mqtt_users.len());
                        }
                    }
                    // stdout is the config; what it took goes to stderr.
                    eprintln!("{} account passwords hashed (bcrypt cost {bcrypt_cost}) in {:.1} s", accounts.len(), started.elapsed().as_secs_f64());
                    accounts
                }
            };
            let users =
                Users::from_flags(gateway_user, device_user, gateway_password_env, device_password_env, accounts).map_err(anyhow::Error::msg)?;
            let spec = NodeSpec { name, host, port, cluster_port, mqtt_port, store, routes, partitions, http_port, replicas, users };
            print!("{}", citywatch_gateway::cluster::nats_config::render(&spec).map_err(anyhow::Error::msg)?);
            return Ok(());
        }
        Command::Cluster { command: ClusterCommand::Status { config } } => {
            let cluster_config = load(config.as_ref())?.cluster.unwrap_or_default();
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let status = runtime.block_on(async {
                let cluster = citywatch_gateway::cluster::Cluster::connect_existing(&cluster_config).await?;
                citywatch_gateway::cluster::status::status(&cluster).await
            })?;
            println!("{}", serde_json::to_string_pretty(&status)?);
            return Ok(());
        }
        Command::Run { config } => (load(config.as_ref())?, None),
        #[cfg(feature = "demo")]
        Command::Demo { config, devices, site, scenario, interval, rate } => {
            let mut c = load(config.as_ref())?;
            if config.is_none() {
                // The demo stays on this machine.
                c.mqtt.listen = ([127, 0, 0, 1], 1883).into();
            }
            (c, Some(DemoFleet { devices, site, scenario, interval_s: interval, rate }))
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let gateway = Gateway::start(config, demo).await?;
        println!("citywatch: API on http://{}  (Ctrl-C to stop)", gateway.http_addr);
        if let Some(addr) = gateway.mqtt_addr {
            println!("citywatch: MQTT broker on {addr}");
        }
        wait_for_stop().await?;
        println!("citywatch: stopping, flushing pending writes");
        gateway.shutdown().await?;
        Ok(())
    })
}

async fn wait_for_stop() -> Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await?;
        Ok(())
    }
}
