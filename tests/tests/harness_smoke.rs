//! The harness itself works: a real broker, a real subscriber, credentials, restart, binaries.

use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use citywatch_tests::{spawn_edge_sim, unique_client_id, wait_for, Mosquitto, Subscriber};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS,
};
use tokio::task::JoinHandle;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

/// A plain rumqttc client whose event loop is polled by a task; returns after CONNACK.
async fn publisher(options: MqttOptions) -> anyhow::Result<(AsyncClient, JoinHandle<()>)> {
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let connack = timeout(WAIT, eventloop.poll())
        .await
        .context("no CONNACK in time")??;
    anyhow::ensure!(
        matches!(connack, Event::Incoming(Packet::ConnAck(_))),
        "first event is not CONNACK: {connack:?}"
    );
    let task = tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    Ok((client, task))
}

/// What the broker answers to a CONNECT with these options.
async fn connect_outcome(options: MqttOptions) -> anyhow::Result<ConnectReturnCode> {
    let (_client, mut eventloop): (AsyncClient, EventLoop) = AsyncClient::new(options, 4);
    match timeout(WAIT, eventloop.poll())
        .await
        .context("no answer to CONNECT in time")?
    {
        Ok(Event::Incoming(Packet::ConnAck(ack))) => Ok(ack.code),
        Err(ConnectionError::ConnectionRefused(code)) => Ok(code),
        other => bail!("unexpected answer to CONNECT: {other:?}"),
    }
}

fn options(broker: &Mosquitto) -> MqttOptions {
    MqttOptions::new(unique_client_id("smoke"), broker.host(), broker.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_receives_what_a_plain_client_publishes() -> anyhow::Result<()> {
    let broker = Mosquitto::start().await?;
    let mut sub = Subscriber::connect(&broker.addr(), "citywatch/#", QoS::AtLeastOnce).await?;
    let (client, poller) = publisher(options(&broker)).await?;

    let payload = br#"{"device":"lamp-7","lux":412.5}"#.to_vec();
    timeout(
        WAIT,
        client.publish("elsewhere/ignored", QoS::AtLeastOnce, false, b"no".to_vec()),
    )
    .await??;
    timeout(
        WAIT,
        client.publish(
            "citywatch/smoke/hello",
            QoS::AtLeastOnce,
            false,
            payload.clone(),
        ),
    )
    .await??;

    let got = sub
        .recv_timeout(WAIT)
        .await
        .ok_or_else(|| anyhow!("nothing arrived; broker log:\n{}", broker.log()))?;
    assert_eq!(
        got.topic, "citywatch/smoke/hello",
        "the first message is the one in the filter"
    );
    assert_eq!(got.payload, payload);
    assert!(!got.retain);
    assert_eq!(got.qos, QoS::AtLeastOnce);
    assert_eq!(got.json()?["lux"], 412.5);
    assert!(
        sub.collect_for(Duration::from_millis(200)).await.is_empty(),
        "nothing else arrives"
    );
    poller.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_broker_refuses_a_wrong_password_and_accepts_the_right_one() -> anyhow::Result<()>
{
    let broker = Mosquitto::builder()
        .with_password("gateway", "s3cret")
        .start()
        .await?;

    let mut wrong = options(&broker);
    wrong.set_credentials("gateway", "not-it");
    let code = connect_outcome(wrong).await?;
    assert!(
        matches!(
            code,
            ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword
        ),
        "wrong password must be refused, got {code:?}"
    );
    let anonymous = connect_outcome(options(&broker)).await?;
    assert_ne!(
        anonymous,
        ConnectReturnCode::Success,
        "anonymous must be refused"
    );
    assert!(
        Subscriber::connect(&broker.addr(), "citywatch/#", QoS::AtLeastOnce)
            .await
            .is_err(),
        "an anonymous subscriber must fail to connect"
    );

    let mut right = options(&broker);
    right.set_credentials("gateway", "s3cret");
    assert_eq!(
        connect_outcome(right.clone()).await?,
        ConnectReturnCode::Success
    );

    let mut sub = Subscriber::connect_with_credentials(
        &broker.addr(),
        "gateway",
        "s3cret",
        "citywatch/#",
        QoS::AtLeastOnce,
    )
    .await?;
    let (client, poller) = publisher(right).await?;
    timeout(
        WAIT,
        client.publish("citywatch/auth", QoS::AtLeastOnce, false, b"ok".to_vec()),
    )
    .await??;
    let got = sub
        .recv_timeout(WAIT)
        .await
        .ok_or_else(|| anyhow!("nothing arrived"))?;
    assert_eq!(got.payload, b"ok");
    poller.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_resubscribes_after_a_broker_restart() -> anyhow::Result<()> {
    let mut broker = Mosquitto::start().await?;
    let port = broker.port();
    let mut sub = Subscriber::connect(&broker.addr(), "citywatch/#", QoS::AtLeastOnce).await?;
    assert_eq!(sub.subacks(), 1);

    broker.restart().await?;
    assert_eq!(broker.port(), port, "restart keeps the port");
    sub.wait_subacks(2, WAIT).await?;

    let (client, poller) = publisher(options(&broker)).await?;
    timeout(
        WAIT,
        client.publish("citywatch/after", QoS::AtLeastOnce, false, b"back".to_vec()),
    )
    .await??;
    let got = sub.recv_timeout(WAIT).await.ok_or_else(|| {
        anyhow!(
            "nothing arrived after restart; broker log:\n{}",
            broker.log()
        )
    })?;
    assert_eq!(got.topic, "citywatch/after");
    assert!(
        broker.log().contains("running"),
        "the log is kept across restarts"
    );
    poller.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_sim_binary_builds_and_runs() -> anyhow::Result<()> {
    let sim = tokio::task::spawn_blocking(|| spawn_edge_sim(&["--help"])).await?;
    let mut sim = sim;
    let status = sim
        .wait_timeout(WAIT)
        .await?
        .ok_or_else(|| anyhow!("edge-sim --help still runs after {WAIT:?}:\n{}", sim.logs()))?;
    assert!(
        status.success(),
        "edge-sim --help failed ({status}):\n{}",
        sim.logs()
    );
    Ok(())
}

/// POSTs `body` to `url` with optional headers from a blocking thread, as a foreign client
/// would; returns the status.
async fn post_raw(
    agent: &ureq::Agent,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<u16> {
    let agent = agent.clone();
    let url = url.to_owned();
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let body = body.to_owned();
    let status = tokio::task::spawn_blocking(move || -> anyhow::Result<u16> {
        let mut request = agent.post(&url).header("content-type", "application/json");
        for (k, v) in &headers {
            request = request.header(k.as_str(), v.as_str());
        }
        Ok(request.send(body.as_bytes())?.status().as_u16())
    });
    timeout(WAIT, status)
        .await
        .context("POST did not finish in time")??
}

fn plain_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(WAIT))
        .build()
        .into()
}

#[test]
fn signature_is_the_rfc_4231_hmac_sha256() {
    // RFC 4231, test case 2.
    assert_eq!(
        citywatch_tests::signature(b"Jefe", b"what do ya want for nothing?"),
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_receiver_checks_signatures_and_records_every_post() -> anyhow::Result<()> {
    use citywatch_tests::{signature, WebhookReceiver, IDEMPOTENCY_HEADER, SIGNATURE_HEADER};
    let receiver = WebhookReceiver::start("s3cret").await?;
    assert!(receiver.url().starts_with("http://127.0.0.1:") && receiver.url().ends_with("/hook"));
    let mut feed = receiver.subscribe();
    let agent = plain_agent();

    let body = r#"{"id":"inc-1","revision":1,"rule":"gas_high","device":"d-1"}"#;
    let good = signature(b"s3cret", body.as_bytes());
    let forged = signature(b"not-the-secret", body.as_bytes());
    let upper = format!(
        "sha256={}",
        good.trim_start_matches("sha256=").to_uppercase()
    );
    assert_eq!(
        post_raw(
            &agent,
            &receiver.url(),
            &[(SIGNATURE_HEADER, &good), (IDEMPOTENCY_HEADER, "inc-1:1")],
            body
        )
        .await?,
        200
    );
    assert_eq!(
        post_raw(
            &agent,
            &receiver.url(),
            &[(SIGNATURE_HEADER, &forged)],
            body
        )
        .await?,
        200
    );
    assert_eq!(
        post_raw(&agent, &receiver.url(), &[(SIGNATURE_HEADER, &upper)], body).await?,
        200
    );
    assert_eq!(post_raw(&agent, &receiver.url(), &[], body).await?, 200);
    // A body changed after signing no longer matches.
    let tampered = body.replace("gas_high", "gas_low");
    assert_eq!(
        post_raw(
            &agent,
            &receiver.url(),
            &[(SIGNATURE_HEADER, &good)],
            &tampered
        )
        .await?,
        200
    );

    let got = receiver
        .wait_for(WAIT, "five POSTs", |d| (d.len() >= 5).then(|| d.to_vec()))
        .await;
    assert_eq!(got.len(), 5, "{}", receiver.report());
    let valid: Vec<bool> = got.iter().map(|d| d.signature_valid).collect();
    assert_eq!(
        valid,
        [true, false, false, false, false],
        "{}",
        receiver.report()
    );
    assert_eq!(got[0].body["rule"], "gas_high");
    assert_eq!(
        (got[0].id(), got[0].revision(), got[0].device()),
        ("inc-1", 1, "d-1")
    );
    assert_eq!(got[0].header("Idempotency-Key"), Some("inc-1:1"));
    assert_eq!(got[0].raw, body);
    assert!(got.windows(2).all(|w| w[0].received <= w[1].received));
    assert!(got[0].wall_ms > 1_700_000_000_000);

    // The feed got the same deliveries, in order, without polling.
    for want in &got {
        let next = timeout(WAIT, feed.recv())
            .await
            .context("feed")?
            .context("feed closed")?;
        assert_eq!(next.raw, want.raw);
        assert_eq!(next.signature_valid, want.signature_valid);
    }

    // A refusing receiver answers with the status and keeps the attempt apart.
    receiver.set_status(503);
    assert_eq!(
        post_raw(&agent, &receiver.url(), &[(SIGNATURE_HEADER, &good)], body).await?,
        503
    );
    receiver.set_status(200);
    assert_eq!(
        receiver.deliveries().len(),
        5,
        "a refused POST is not a delivery"
    );
    let rejected = receiver.rejected_attempts();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].status, 503);
    assert!(rejected[0].signature_valid);
    assert!(feed.try_recv().is_err(), "a refused POST is not fed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_receiver_stops_refusing_connections_and_starts_again_on_its_port(
) -> anyhow::Result<()> {
    use citywatch_tests::WebhookReceiver;
    let mut receiver = WebhookReceiver::start("k").await?;
    let port = receiver.port();
    // One agent throughout: its pooled keep-alive connection must not outlive the stop.
    let agent = plain_agent();
    assert_eq!(
        post_raw(&agent, &receiver.url(), &[], r#"{"n":1}"#).await?,
        200
    );

    receiver.stop().await?;
    assert!(!receiver.is_running());
    let refused = std::net::TcpStream::connect(("127.0.0.1", port));
    assert_eq!(
        refused.as_ref().map_err(std::io::Error::kind).err(),
        Some(std::io::ErrorKind::ConnectionRefused),
        "connecting to a stopped receiver: {refused:?}"
    );
    assert!(
        post_raw(&agent, &receiver.url(), &[], r#"{"n":2}"#)
            .await
            .is_err(),
        "a POST to a stopped receiver fails"
    );

    receiver.start_again().await?;
    assert_eq!(receiver.port(), port, "same port");
    assert_eq!(
        post_raw(&agent, &receiver.url(), &[], r#"{"n":3}"#).await?,
        200
    );
    let got = receiver
        .wait_for(WAIT, "the POST after the restart", |d| {
            (d.len() >= 2).then(|| d.to_vec())
        })
        .await;
    let numbers: Vec<i64> = got.iter().filter_map(|d| d.body["n"].as_i64()).collect();
    assert_eq!(
        numbers,
        [1, 3],
        "recorded across the restart, nothing while down"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alertmanager_accepts_and_lists_an_alert() -> anyhow::Result<()> {
    use citywatch_tests::Alertmanager;
    let am = Alertmanager::start().await?;
    assert!(
        am.alerts()?.is_empty(),
        "a fresh Alertmanager holds no alert"
    );
    let alert = serde_json::json!([{
        "labels": {"alertname": "harness_smoke", "device": "am-gas-00000", "severity": "critical"},
        "annotations": {"summary": "posted by the harness self-test"},
        "generatorURL": "http://127.0.0.1/harness"
    }]);
    am.post_alerts(&alert)?;
    let listed = wait_for("the alert listed", WAIT, || {
        am.alerts().ok()?.into_iter().find(|a| a["labels"]["alertname"] == "harness_smoke")
    })
    .await
    .with_context(|| format!("{:?}\n{}", am.alerts(), am.logs()))?;
    assert_eq!(listed["labels"]["device"], "am-gas-00000");
    assert_eq!(
        listed["annotations"]["summary"],
        "posted by the harness self-test"
    );
    assert_eq!(listed["status"]["state"], "active", "{listed}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_sends_births_and_readings_and_counts_acknowledgements() -> anyhow::Result<()> {
    use citywatch_tests::{birth, device_topic, Publisher};
    let broker = Mosquitto::start().await?;
    let mut publisher = Publisher::connect(&broker.addr(), 8).await?;
    publisher
        .publish_json(
            &device_topic("smoke", "smoke-gas-00000", "status"),
            true,
            &birth("gas_detector", 60),
        )
        .await?;
    publisher.wait_acked(1, WAIT).await?;
    // Retained: a subscriber that comes later still gets the birth.
    let mut sub =
        Subscriber::connect(&broker.addr(), "citywatch/v1/smoke/+/+", QoS::AtLeastOnce).await?;
    let got = sub
        .recv_timeout(WAIT)
        .await
        .ok_or_else(|| anyhow!("no retained birth"))?;
    assert!(got.retain);
    assert_eq!(
        got.json()?,
        serde_json::json!({"state": "online", "kind": "gas_detector", "fw": "0.1.0", "interval_s": 60})
    );
    let reading = serde_json::json!({"seq": 1, "ts": 1, "values": {"gas_lel": 55.0}});
    publisher
        .publish_json(
            &device_topic("smoke", "smoke-gas-00000", "telemetry"),
            false,
            &reading,
        )
        .await?;
    publisher.wait_acked(2, WAIT).await?;
    let got = sub
        .recv_timeout(WAIT)
        .await
        .ok_or_else(|| anyhow!("no reading"))?;
    assert_eq!(
        (got.topic.as_str(), got.retain),
        ("citywatch/v1/smoke/smoke-gas-00000/telemetry", false)
    );
    assert_eq!(got.json()?, reading);
    assert_eq!(publisher.acked(), 2);
    Ok(())
}
