//! `citywatch cluster nats-config`: one nats-server node's configuration for a Citywatch cluster.
//!
//! Pure text generation (nothing here starts a server). What the server cannot declare in its
//! configuration — the ingest stream, the KV buckets, the relay consumers on the MQTT listener's
//! stream — the gateways create at startup
//! ([`super::Cluster::connect`]). With [`Users`] the node is closed: nats-server's own
//! `authorization` block, a gateway user and a shared device user (passwords left in the server's
//! environment) and/or device accounts from a Citywatch config's `[[mqtt.users]]` (bcrypt hashes,
//! permissions narrowed to the account's site and device, as the embedded broker's door does).

use std::fmt::Write as _;
use std::path::PathBuf;

/// Subject prefix of the partitioned device messages: `citywatch.part.{p}.{site}.{device}.{channel}`.
pub const PARTITION_PREFIX: &str = "citywatch.part";
/// The device channels that flow to the gateways (`cmd` flows the other way and is not mapped).
pub const INBOUND_CHANNELS: [&str; 3] = ["status", "telemetry", "event"];
/// The NATS cluster's name (the route handshake compares it).
pub const CLUSTER_NAME: &str = "citywatch";
/// The nats-server environment variable holding the gateway user's password, unless
/// `--gateway-password-env` names another.
pub const GATEWAY_PASSWORD_ENV: &str = "CITYWATCH_NATS_GATEWAY_PASSWORD";
/// The nats-server environment variable holding the device user's password, unless
/// `--device-password-env` names another.
pub const DEVICE_PASSWORD_ENV: &str = "CITYWATCH_NATS_DEVICE_PASSWORD";

/// One user of a closed cluster: its name, and the nats-server environment variable its
/// password (or bcrypt hash) is read from when the server starts — never written into the config.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub name: String,
    pub password_env: String,
}

/// Who may connect to a closed cluster (`--gateway-user`, `--device-user`, `--accounts`).
///
/// The gateway user may do anything, on the NATS client port only. The device user may only use
/// the MQTT port, publish the device channels and subscribe to commands: checked against
/// nats-server 2.12.8 (`server/mqtt.go`, `client.go`), its permissions need nothing else for a
/// 3.1.1 device's whole contract. A publish is checked after the partition mapping, so the allowed
/// subjects are the mapped `citywatch.part.*.*.*.{channel}` ones; a Last Will is a publish checked
/// like any other, and a retained status is stored by the server once its publish passed. The
/// subscriptions on `$MQTT.sub.…` that deliver QoS 1 messages (a persistent session's too) are
/// allowed to every MQTT client by the server itself, which also refuses them to MQTT SUBSCRIBEs.
#[derive(Debug, Clone, PartialEq)]
pub struct Users {
    pub gateway: User,
    /// The user every device may share (`--device-user`).
    pub device: Option<User>,
    /// One user per `[[mqtt.users]]` account (`--accounts`).
    pub accounts: Vec<Account>,
}

/// A device account of a closed cluster: one `[[mqtt.users]]` entry of a Citywatch config, the
/// same accounts the embedded broker takes (README "Device accounts and topic ACLs").
///
/// With `site` and `device` it may publish only that device's status, telemetry and event on
/// the site's own partition and subscribe only to that device's `cmd`; with `site` only, any
/// device of the site; without `site` (a bridge, the simulator, the operations centre's MQTT
/// client) anything under `citywatch/v1/` and the partitions — but never the gateways' subjects
/// (incident log, API, KV). The password goes into the config as a bcrypt hash only.
#[derive(Clone, PartialEq)]
pub struct Account {
    pub name: String,
    /// `$2a$…` as nats-server compares it (it takes a password beginning `$2a$`, `$2b$`… for
    /// a bcrypt hash).
    pub password_hash: String,
    pub site: Option<String>,
    pub device: Option<String>,
}

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Account").field("name", &self.name).field("site", &self.site).field("device", &self.device).finish_non_exhaustive()
    }
}

/// bcrypt's cost for `--accounts` passwords unless `--bcrypt-cost` says otherwise: nats-server
/// verifies the hash at every MQTT CONNECT, so the cost is paid again by every device in a
/// reconnect storm (cost 6: ~3.4 ms of one core each; 10: ~55 ms). Device passwords are machine-made
/// random secrets, which a slow hash does not need to protect.
pub const DEFAULT_BCRYPT_COST: u32 = 6;

impl Account {
    /// The accounts of `[[mqtt.users]]` (already validated by the config loader), each password
    /// hashed with `cost`.
    pub fn from_mqtt_users(users: &[crate::sources::config::MqttUser], cost: u32) -> Result<Vec<Account>, String> {
        if !(4..=31).contains(&cost) {
            return Err(format!("--bcrypt-cost: {cost} is not within 4..=31 (bcrypt's range)"));
        }
        users
            .iter()
            .map(|u| {
                let hash = bcrypt::hash_with_result(&u.password, cost).map_err(|e| format!("hashing the password of {:?}: {e}", u.username))?;
                Ok(Account {
                    name: u.username.clone(),
                    password_hash: hash.format_for_version(bcrypt::Version::TwoA),
                    site: u.site.clone(),
                    device: u.device.clone(),
                })
            })
            .collect()
    }

    /// What the account may publish (checked by nats-server after the partition mapping) and
    /// subscribe to.
    fn permissions(&self, partitions: u16) -> (Vec<String>, Vec<String>) {
        match (&self.site, &self.device) {
            (Some(site), device) => {
                let device = device.as_deref().unwrap_or("*");
                let partition = partition_of(site, partitions).to_string();
                (device_publish_subjects(&partition, site, device), vec![device_subscribe_subject(site, device)])
            }
            (None, _) => (vec![format!("{PARTITION_PREFIX}.>"), "citywatch.v1.>".into()], vec!["citywatch.v1.>".into()]),
        }
    }
}

impl Users {
    /// From the command line: the gateway user with a device user, device accounts or both; or
    /// none of them (an open cluster, as before these options).
    pub fn from_flags(
        gateway_user: Option<String>,
        device_user: Option<String>,
        gateway_password_env: String,
        device_password_env: String,
        accounts: Vec<Account>,
    ) -> Result<Option<Users>, String> {
        let devices = device_user.is_some() || !accounts.is_empty();
        let users = match (gateway_user, devices) {
            (None, false) => return Ok(None),
            (Some(gateway), true) => Users {
                gateway: User { name: gateway, password_env: gateway_password_env },
                device: device_user.map(|name| User { name, password_env: device_password_env }),
                accounts,
            },
            (Some(_), false) => {
                return Err("--gateway-user: give --device-user or --accounts too (devices could not connect to a closed cluster)".into())
            }
            (None, true) => {
                let flag = if device_user.is_some() { "--device-user" } else { "--accounts" };
                return Err(format!("{flag}: give --gateway-user too (gateways could not connect to a closed cluster)"));
            }
        };
        users.validate()?;
        Ok(Some(users))
    }

    fn validate(&self) -> Result<(), String> {
        let named = std::iter::once(("--gateway-user", "--gateway-password-env", &self.gateway))
            .chain(self.device.iter().map(|d| ("--device-user", "--device-password-env", d)));
        for (flag, env_flag, user) in named.clone() {
            if user.name.is_empty() || !user.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(format!("{flag}: {:?} must be 1+ characters of [A-Za-z0-9_-]", user.name));
            }
            let mut chars = user.password_env.chars();
            let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_') && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!("{env_flag}: {:?} is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)", user.password_env));
            }
        }
        if let Some(device) = &self.device {
            if self.gateway.name == device.name {
                return Err(format!("--device-user: {:?} is the gateway user too; devices need a user of their own", device.name));
            }
            if self.gateway.password_env == device.password_env {
                return Err(format!("--device-password-env: {:?} holds the gateway's password too; give each user its own", device.password_env));
            }
        }
        let mut names: std::collections::HashSet<&str> = named.map(|(_, _, u)| u.name.as_str()).collect();
        for account in &self.accounts {
            if !names.insert(&account.name) {
                return Err(format!("--accounts: the account {:?} has the name of another user; nats-server needs each name once", account.name));
            }
        }
        Ok(())
    }
}

/// One node's settings, as given on the command line.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// `server_name`, unique in the cluster (JetStream's RAFT groups need it).
    pub name: String,
    /// Interface every listener binds.
    pub host: String,
    /// NATS client port.
    pub port: u16,
    /// Route port (other nodes connect here).
    pub cluster_port: u16,
    /// MQTT 3.1.1 listener for devices.
    pub mqtt_port: u16,
    /// JetStream storage directory.
    pub store: PathBuf,
    /// Every node's route URL, `nats://host:cluster_port` (this node's own is allowed and ignored).
    pub routes: Vec<String>,
    /// Partitions of the device topics (SPEC §9 default 64).
    pub partitions: u16,
    /// Optional HTTP monitoring port (`/healthz?js-enabled-only=true`, `/jsz`).
    pub http_port: Option<u16>,
    /// Copies of the MQTT listener's own streams (`$MQTT_msgs`, sessions, retained messages);
    /// `None`: as many as the cluster has nodes (the routes), at most 3 — what the gateways'
    /// `[cluster] replicas` gives the streams they create.
    pub replicas: Option<usize>,
    /// The users of a closed cluster; `None`: anyone reaching a port may do anything.
    pub users: Option<Users>,
}

impl NodeSpec {
    /// The MQTT streams' replicas: as given, else min(3, nodes). `--routes` names every node
    /// (this one's own route included), so the node count is the route count.
    fn mqtt_replicas(&self) -> Result<usize, String> {
        let nodes = self.routes.len().max(1);
        let replicas = self.replicas.unwrap_or(nodes.min(3));
        if !(1..=5).contains(&replicas) {
            return Err(format!("--replicas: {replicas} is not within 1..=5 (JetStream's limit)"));
        }
        if replicas > nodes {
            return Err(format!(
                "--replicas: {replicas} copies need as many nodes, but --routes names {nodes} (list every node's route, this one's too)"
            ));
        }
        Ok(replicas)
    }
}

/// The NATS subject of an MQTT topic part (`/` becomes `.`); MQTT topics of the contract hold
/// no `.` (site and device are `[A-Za-z0-9_-]`).
pub fn source_subject(channel: &str) -> String {
    format!("citywatch.v1.*.*.{channel}")
}

/// The mapping destination: partition by the site token (wildcard 1), keep site, device, channel.
pub fn partition_destination(partitions: u16, channel: &str) -> String {
    format!("{PARTITION_PREFIX}.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.{channel}")
}

fn quote(s: &str) -> String {
    // NATS conf strings accept JSON escapes.
    serde_json::Value::String(s.to_owned()).to_string()
}

/// The complete configuration text of one node.
pub fn render(spec: &NodeSpec) -> Result<String, String> {
    if spec.name.is_empty() {
        return Err("--name: empty".into());
    }
    if spec.partitions == 0 || spec.partitions > 1024 {
        return Err(format!("--partitions: {} is not within 1..=1024", spec.partitions));
    }
    for r in &spec.routes {
        if !r.starts_with("nats://") && !r.starts_with("nats-route://") {
            return Err(format!("--routes: {r:?} is not a nats://host:port URL"));
        }
    }
    let mqtt_replicas = spec.mqtt_replicas()?;
    if let Some(users) = &spec.users {
        users.validate()?;
    }
    let mut out = String::new();
    let w = &mut out;
    // Writing to a String cannot fail.
    let _ = writeln!(w, "# Citywatch cluster node {} — generated by `citywatch cluster nats-config`.", spec.name);
    let _ = writeln!(w, "# Devices connect to the MQTT port; gateways to the client port (SPEC §9).");
    let _ = writeln!(w, "server_name: {}", quote(&spec.name));
    let _ = writeln!(w, "listen: {}", quote(&format!("{}:{}", spec.host, spec.port)));
    if let Some(http) = spec.http_port {
        let _ = writeln!(w, "http: {}", quote(&format!("{}:{http}", spec.host)));
    }
    let _ = writeln!(w, "max_payload: 1MB");
    let _ = writeln!(w);
    let _ = writeln!(w, "jetstream {{");
    let _ = writeln!(w, "  store_dir: {}", quote(&spec.store.display().to_string()));
    let _ = writeln!(w, "}}");
    let _ = writeln!(w);
    let _ = writeln!(w, "cluster {{");
    let _ = writeln!(w, "  name: {}", quote(CLUSTER_NAME));
    let _ = writeln!(w, "  listen: {}", quote(&format!("{}:{}", spec.host, spec.cluster_port)));
    let _ = writeln!(w, "  routes: [");
    for r in &spec.routes {
        let _ = writeln!(w, "    {}", quote(r));
    }
    let _ = writeln!(w, "  ]");
    let _ = writeln!(w, "}}");
    let _ = writeln!(w);
    let _ = writeln!(w, "# MQTT 3.1.1 for devices: sessions, retained messages and QoS 1 state live in JetStream.");
    let _ = writeln!(w, "# A QoS 1 PUBLISH is PUBACKed once the listener's $MQTT_msgs stream holds it; the gateways keep");
    let _ = writeln!(w, "# a durable consumer relay-{{p}} there per partition and move each message into the ingest");
    let _ = writeln!(w, "# stream, so an acknowledged message survives a node (and an ingest leader) dying.");
    let _ = writeln!(w, "mqtt {{");
    let _ = writeln!(w, "  listen: {}", quote(&format!("{}:{}", spec.host, spec.mqtt_port)));
    let _ = writeln!(w, "  # $MQTT_msgs, sessions and retained messages: as many copies as the gateways' streams");
    let _ = writeln!(w, "  # ([cluster] replicas), whoever creates them first (a device or a gateway).");
    let _ = writeln!(w, "  stream_replicas: {mqtt_replicas}");
    let _ = writeln!(w, "  ack_wait: \"30s\"");
    let _ = writeln!(w, "  max_ack_pending: 1000");
    let _ = writeln!(w, "}}");
    let _ = writeln!(w);
    let _ = writeln!(w, "# A site's devices always land in one partition: partition({}, site).", spec.partitions);
    let _ = writeln!(w, "# The gateways' ingest stream captures {PARTITION_PREFIX}.> (QoS 0 messages get in only this way;");
    let _ = writeln!(w, "# the relay brings QoS 1 ones); `cmd` topics are not mapped.");
    let _ = writeln!(w, "mappings {{");
    for ch in INBOUND_CHANNELS {
        let _ = writeln!(w, "  {}: {}", quote(&source_subject(ch)), quote(&partition_destination(spec.partitions, ch)));
    }
    let _ = writeln!(w, "}}");
    if let Some(users) = &spec.users {
        render_users(w, users, spec.partitions);
    }
    Ok(out)
}

/// The subjects a device may publish: its channels as mapped into the partitions (nats-server
/// checks a publish after the mapping). `*` in a place: any partition, site or device.
pub fn device_publish_subjects(partition: &str, site: &str, device: &str) -> Vec<String> {
    INBOUND_CHANNELS.iter().map(|ch| format!("{PARTITION_PREFIX}.{partition}.{site}.{device}.{ch}")).collect()
}

/// The subject a device may subscribe to: its commands (not mapped). `*`: any site or device.
pub fn device_subscribe_subject(site: &str, device: &str) -> String {
    format!("citywatch.v1.{site}.{device}.cmd")
}

fn render_users(w: &mut String, users: &Users, partitions: u16) {
    let list = |subjects: &[String]| subjects.iter().map(|s| quote(s)).collect::<Vec<_>>().join(", ");
    let permissions = |w: &mut String, publish: &[String], subscribe: &[String]| {
        let _ = writeln!(w, "      permissions: {{");
        let _ = writeln!(w, "        publish: {{ allow: [{}] }}", list(publish));
        let _ = writeln!(w, "        subscribe: {{ allow: [{}] }}", list(subscribe));
        let _ = writeln!(w, "      }} }}");
    };
    let _ = writeln!(w);
    let _ = writeln!(w, "# A closed cluster: nobody connects without a user. The passwords are this server's environment");
    let _ = writeln!(w, "# variables, read when it starts (a missing one stops it); each may hold a bcrypt hash instead, in");
    let _ = writeln!(w, "# double quotes (nats-server parses the value: NAME='\"$2a$11$...\"').");
    let _ = writeln!(w, "authorization {{");
    let _ = writeln!(w, "  users = [");
    let _ = writeln!(w, "    # The gateways: streams, KV buckets, JetStream API, citywatch.api.> and _INBOX.> — everything;");
    let _ = writeln!(w, "    # on the client port only.");
    let _ = writeln!(
        w,
        "    {{ user: {}, password: ${}, allowed_connection_types: [\"STANDARD\"] }}",
        quote(&users.gateway.name),
        users.gateway.password_env
    );
    if let Some(device) = &users.device {
        let _ = writeln!(w, "    # Devices: MQTT only; publish status, telemetry and event (checked after the mapping above, so on");
        let _ = writeln!(w, "    # the partition subjects; the Last Will too), subscribe to their commands. QoS 1 delivery and");
        let _ = writeln!(w, "    # persistent sessions need no more: nats-server itself lets MQTT clients use $MQTT.sub.>.");
        let _ = writeln!(w, "    {{ user: {}, password: ${}, allowed_connection_types: [\"MQTT\"],", quote(&device.name), device.password_env);
        permissions(w, &device_publish_subjects("*", "*", "*"), &[device_subscribe_subject("*", "*")]);
    }
    if !users.accounts.is_empty() {
        let _ = writeln!(w, "    # Device accounts ([[mqtt.users]] of `--accounts`), MQTT only, bcrypt-hashed passwords: a device");
        let _ = writeln!(w, "    # account publishes only its device's channels on its site's partition and reads only its own");
        let _ = writeln!(w, "    # cmd; a site account any device of its site; an account without a site all of citywatch/v1.");
    }
    for account in &users.accounts {
        let (publish, subscribe) = account.permissions(partitions);
        let _ = writeln!(w, "    {{ user: {}, password: {}, allowed_connection_types: [\"MQTT\"],", quote(&account.name), quote(&account.password_hash));
        permissions(w, &publish, &subscribe);
    }
    let _ = writeln!(w, "  ]");
    let _ = writeln!(w, "}}");
}

/// The partition NATS's `partition(n, site)` mapping puts a site in: FNV-1a (32 bit) of the
/// token, modulo n (nats-server `subject_transform.go`, `getHashPartition`). The gateway uses
/// it to fence device commands by the partition lease; an e2e test checks it against the server.
pub fn partition_of(site: &str, partitions: u16) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in site.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % u32::from(partitions.max(1))) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> NodeSpec {
        NodeSpec {
            name: "n1".into(),
            host: "127.0.0.1".into(),
            port: 4222,
            cluster_port: 6222,
            mqtt_port: 1883,
            store: "/var/lib/nats/n1".into(),
            routes: vec!["nats://127.0.0.1:6222".into(), "nats://127.0.0.1:6223".into()],
            partitions: 64,
            http_port: None,
            replicas: None,
            users: None,
        }
    }

    fn users() -> Users {
        Users::from_flags(Some("gateway".into()), Some("device".into()), GATEWAY_PASSWORD_ENV.into(), DEVICE_PASSWORD_ENV.into(), Vec::new())
            .expect("valid users")
            .expect("both given")
    }

    #[test]
    fn without_users_the_cluster_stays_open_as_before() {
        let text = render(&spec()).expect("valid spec");
        assert!(!text.contains("authorization"), "{text}");
        assert_eq!(Users::from_flags(None, None, "A".into(), "B".into(), Vec::new()), Ok(None));
    }

    #[test]
    fn users_close_the_cluster_with_passwords_from_the_environment() {
        let mut s = spec();
        s.users = Some(users());
        let text = render(&s).expect("valid spec");
        let auth = &text[text.find("authorization {").expect("an authorization block")..];
        assert!(
            auth.contains("{ user: \"gateway\", password: $CITYWATCH_NATS_GATEWAY_PASSWORD, allowed_connection_types: [\"STANDARD\"] }"),
            "{auth}"
        );
        assert!(auth.contains("{ user: \"device\", password: $CITYWATCH_NATS_DEVICE_PASSWORD, allowed_connection_types: [\"MQTT\"],"), "{auth}");
        assert!(
            auth.contains(
                "publish: { allow: [\"citywatch.part.*.*.*.status\", \"citywatch.part.*.*.*.telemetry\", \"citywatch.part.*.*.*.event\"] }"
            ),
            "{auth}"
        );
        assert!(auth.contains("subscribe: { allow: [\"citywatch.v1.*.*.cmd\"] }"), "{auth}");
    }

    #[test]
    fn bad_users_are_named() {
        let flags = |g: Option<&str>, d: Option<&str>, ge: &str, de: &str| {
            Users::from_flags(g.map(Into::into), d.map(Into::into), ge.into(), de.into(), Vec::new()).expect_err("refused")
        };
        assert!(flags(Some("gw"), None, "A", "B").starts_with("--gateway-user: give --device-user or --accounts too"));
        assert!(flags(None, Some("dev"), "A", "B").starts_with("--device-user: give --gateway-user too"));
        assert!(flags(Some("gw x"), Some("dev"), "A", "B").starts_with("--gateway-user:"));
        assert!(flags(Some("gw"), Some(""), "A", "B").starts_with("--device-user:"));
        assert!(flags(Some("same"), Some("same"), "A", "B").starts_with("--device-user: \"same\" is the gateway user too"));
        assert!(flags(Some("gw"), Some("dev"), "1ABC", "B").starts_with("--gateway-password-env:"));
        assert!(flags(Some("gw"), Some("dev"), "A", "B-C").starts_with("--device-password-env:"));
        assert!(flags(Some("gw"), Some("dev"), "SAME", "SAME").starts_with("--device-password-env: \"SAME\" holds the gateway's password too"));
    }

    fn mqtt_user(name: &str, site: Option<&str>, device: Option<&str>) -> crate::sources::config::MqttUser {
        crate::sources::config::MqttUser {
            username: name.into(),
            password: format!("{name}-secret"),
            site: site.map(Into::into),
            device: device.map(Into::into),
        }
    }

    #[test]
    fn device_accounts_are_narrowed_to_their_site_partition_and_device_and_carry_only_a_hash() {
        let mqtt = [mqtt_user("gas-1", Some("kitchen"), Some("kitchen-gas-1")), mqtt_user("kitchen", Some("kitchen"), None), mqtt_user("ops", None, None)];
        let accounts = Account::from_mqtt_users(&mqtt, 4).expect("hashed");
        assert!(bcrypt::verify("gas-1-secret", &accounts[0].password_hash).expect("a bcrypt hash"));
        assert!(accounts[0].password_hash.starts_with("$2a$04$"), "{}", accounts[0].password_hash);
        let mut s = spec();
        s.users = Users::from_flags(Some("gateway".into()), None, GATEWAY_PASSWORD_ENV.into(), DEVICE_PASSWORD_ENV.into(), accounts).expect("valid");
        let text = render(&s).expect("valid spec");
        assert!(!text.contains("secret"), "a password in clear: {text}");
        assert!(!text.contains("$CITYWATCH_NATS_DEVICE_PASSWORD"), "no shared device user was asked for: {text}");
        let p = partition_of("kitchen", 64);
        let device = format!(
            "publish: {{ allow: [\"citywatch.part.{p}.kitchen.kitchen-gas-1.status\", \"citywatch.part.{p}.kitchen.kitchen-gas-1.telemetry\", \"citywatch.part.{p}.kitchen.kitchen-gas-1.event\"] }}\n        subscribe: {{ allow: [\"citywatch.v1.kitchen.kitchen-gas-1.cmd\"] }}"
        );
        assert!(text.contains(&device), "{text}");
        assert!(text.contains(&format!("\"citywatch.part.{p}.kitchen.*.event\"] }}\n        subscribe: {{ allow: [\"citywatch.v1.kitchen.*.cmd\"] }}")), "{text}");
        assert!(text.contains("publish: { allow: [\"citywatch.part.>\", \"citywatch.v1.>\"] }\n        subscribe: { allow: [\"citywatch.v1.>\"] }"), "{text}");
        assert_eq!(text.matches("allowed_connection_types: [\"MQTT\"]").count(), 3, "{text}");
    }

    #[test]
    fn accounts_need_the_gateway_user_unique_names_and_a_sane_cost() {
        let accounts = Account::from_mqtt_users(&[mqtt_user("gateway", None, None)], 4).expect("hashed");
        let refused = Users::from_flags(None, None, "A".into(), "B".into(), accounts.clone()).expect_err("no gateway user");
        assert!(refused.starts_with("--accounts: give --gateway-user too"), "{refused}");
        let refused = Users::from_flags(Some("gateway".into()), None, "A".into(), "B".into(), accounts).expect_err("a name twice");
        assert!(refused.contains("\"gateway\" has the name of another user"), "{refused}");
        let refused = Account::from_mqtt_users(&[mqtt_user("x", None, None)], 3).expect_err("cost 3");
        assert!(refused.starts_with("--bcrypt-cost: 3"), "{refused}");
    }

    #[test]
    fn the_config_declares_jetstream_mqtt_routes_and_the_site_partition_mapping() {
        let text = render(&spec()).expect("valid spec");
        assert!(text.contains("server_name: \"n1\""), "{text}");
        assert!(text.contains("store_dir: \"/var/lib/nats/n1\""), "{text}");
        assert!(text.contains("listen: \"127.0.0.1:1883\""), "{text}");
        assert!(text.contains("\"nats://127.0.0.1:6223\""), "{text}");
        assert!(
            text.contains("\"citywatch.v1.*.*.event\": \"citywatch.part.{{partition(64,1)}}.{{wildcard(1)}}.{{wildcard(2)}}.event\""),
            "{text}"
        );
        assert!(!text.contains(".cmd"), "commands are not mapped: {text}");
        assert!(text.contains("relay-{p}"), "the QoS 1 path is described: {text}");
        assert!(text.contains("stream_replicas: 2"), "two routes, two copies: {text}");
    }

    #[test]
    fn the_mqtt_streams_get_at_most_three_copies_and_never_more_than_the_nodes() {
        let mut s = spec();
        s.routes = (1..=5).map(|i| format!("nats://h{i}:6222")).collect();
        assert!(render(&s).expect("five nodes").contains("stream_replicas: 3"));
        s.replicas = Some(5);
        assert!(render(&s).expect("five copies on five nodes").contains("stream_replicas: 5"));
        s.routes.clear();
        s.replicas = None;
        assert!(render(&s).expect("a single node").contains("stream_replicas: 1"));
        s.replicas = Some(3);
        assert!(render(&s).unwrap_err().contains("--replicas: 3 copies need as many nodes"));
        s.replicas = Some(0);
        assert!(render(&s).unwrap_err().contains("not within 1..=5"));
    }

    #[test]
    fn bad_arguments_are_named() {
        let mut s = spec();
        s.partitions = 0;
        assert!(render(&s).unwrap_err().contains("--partitions"));
        let mut s = spec();
        s.routes = vec!["127.0.0.1:6222".into()];
        assert!(render(&s).unwrap_err().contains("--routes"));
    }

    #[test]
    fn fnv1a_matches_known_vectors() {
        // FNV-1a 32 reference values: "" → 0x811c9dc5, "a" → 0xe40c292c.
        assert_eq!(partition_of("a", u16::MAX), (0xe40c_292c_u32 % 65535) as u16);
        assert_eq!(partition_of("", 7), (0x811c_9dc5_u32 % 7) as u16);
    }
}
