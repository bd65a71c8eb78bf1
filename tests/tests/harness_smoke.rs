//! The harness itself works: a real broker, a real subscriber, credentials, restart, binaries.

use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use citywatch_tests::{spawn_edge_sim, unique_client_id, Mosquitto, Subscriber};
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
