//! Push channels against real local receivers (axum on 127.0.0.1:0). Every wait is bounded;
//! nothing asserts how long anything took.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::Router;
use citywatch_edge::wire::{DeviceKind, Metric};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::sync::mpsc;

use crate::incidents::manager::{channel_queue, ChannelSender};
use tokio::task::JoinHandle;

use super::*;
use crate::units::Duration;
use crate::incidents::{Incident, IncidentState, OutboxItem, Scope, Severity};

const WAIT: StdDuration = StdDuration::from_secs(10);
const T0: i64 = 1_800_000_000_000;

// ---------------------------------------------------------------------------------------------
// Fixtures.

fn incident(id: &str, revision: u32, state: IncidentState) -> Incident {
    Incident {
        id: id.into(),
        key: format!("xh/gas-1/gas_high#{id}"),
        revision,
        rule: "gas_high".into(),
        severity: Severity::Critical,
        state,
        scope: Scope::Device,
        site: "xh".into(),
        device: "gas-1".into(),
        kind: DeviceKind::GasDetector,
        metric: Some(Metric::GasLel),
        value: Some(55.5),
        threshold: Some(50.0),
        opened_at: crate::model::rfc3339(T0),
        updated_at: crate::model::rfc3339(T0 + i64::from(revision) * 1000),
        opened_ms: T0,
        updated_ms: T0 + i64::from(revision) * 1000,
        summary: format!("gas at 55.5 %LEL (revision {revision})"),
        summary_zh: String::new(),
        summary_en: String::new(),
        count: u64::from(revision),
        escalation: 0,
        flapping: false,
        crew: None,
        devices: Vec::new(),
        situation: None,
        rules_active: Vec::new(),
        parent: None,
        children: Vec::new(),
        history: Vec::new(),
    }
}

fn item_of(seq: i64, channel: &str, incident: Incident) -> OutboxItem {
    let body = serde_json::to_string(&incident).expect("incident JSON");
    OutboxItem { seq, channel: Arc::from(channel), incident: Arc::new(incident), body: Arc::from(body) }
}

/// Item `seq` of incident `inc-{seq}`, revision 1, open.
fn item(seq: i64, channel: &str) -> OutboxItem {
    item_of(seq, channel, incident(&format!("inc-{seq}"), 1, IncidentState::Open))
}

fn fast_retry(give_up_after_attempts: u32) -> RetryConfig {
    RetryConfig {
        initial: Duration(StdDuration::from_millis(1)),
        max: Duration(StdDuration::from_millis(5)),
        give_up_after_attempts,
    }
}

fn webhook_config(addr: SocketAddr) -> NotifyConfig {
    NotifyConfig {
        webhook: vec![WebhookConfig {
            name: Some("ops".into()),
            url: format!("http://{addr}/hooks/citywatch"),
            secret: "s3cret".into(),
            timeout: Duration::secs(5),
            headers: [("Authorization".to_owned(), "Bearer t0ken".to_owned())].into(),
            ca: None,
        }],
        retry: fast_retry(3),
        ..NotifyConfig::default()
    }
}

fn only_sink(cfg: &NotifyConfig, publish: Option<PublishFn>) -> (Arc<str>, Arc<dyn Sink>) {
    let mut sinks = build_sinks(cfg, publish).expect("sinks");
    assert_eq!(sinks.len(), 1);
    sinks.remove(0)
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Seen {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
    }

    fn incident(&self) -> Incident {
        serde_json::from_slice(&self.body).expect("incident body")
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

/// A local HTTP receiver: records every request; answers from `script` first, then 200, except
/// that a body containing `refuse` always gets 400.
#[derive(Clone, Default)]
struct Receiver {
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<VecDeque<u16>>>,
    refuse: Option<&'static str>,
    arrived: Arc<tokio::sync::Notify>,
}

impl Receiver {
    fn scripted(statuses: &[u16]) -> Receiver {
        Receiver { script: Arc::new(Mutex::new(statuses.iter().copied().collect())), ..Receiver::default() }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    async fn start(&self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        self.serve(listener)
    }

    fn serve(&self, listener: tokio::net::TcpListener) -> SocketAddr {
        let addr = listener.local_addr().expect("addr");
        let app = Router::new().fallback(receive).with_state(self.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        addr
    }

    /// Waits until at least `n` requests have arrived.
    async fn wait_for(&self, n: usize) -> Vec<Seen> {
        tokio::time::timeout(WAIT, async {
            loop {
                let arrived = self.arrived.notified();
                let seen = self.seen();
                if seen.len() >= n {
                    return seen;
                }
                arrived.await;
            }
        })
        .await
        .expect("requests arrived")
    }
}

async fn receive(State(r): State<Receiver>, uri: Uri, headers: HeaderMap, body: Bytes) -> StatusCode {
    let refused = r.refuse.is_some_and(|needle| String::from_utf8_lossy(&body).contains(needle));
    r.seen.lock().expect("seen").push(Seen { path: uri.path().to_owned(), headers, body });
    r.arrived.notify_waiters();
    if refused {
        return StatusCode::BAD_REQUEST;
    }
    let scripted = r.script.lock().expect("script").pop_front();
    scripted.and_then(|s| StatusCode::from_u16(s).ok()).unwrap_or(StatusCode::OK)
}

/// A running dispatcher and its ends.
struct Dispatcher {
    state: Arc<ChannelState>,
    items: ChannelSender,
    done: mpsc::Receiver<(Arc<str>, i64, Outcome)>,
    task: JoinHandle<()>,
}

impl Dispatcher {
    fn start(channel: Arc<str>, sink: Arc<dyn Sink>, backlog: Vec<OutboxItem>, retry: RetryConfig) -> Dispatcher {
        Dispatcher::start_with(channel, sink, backlog, Vec::new(), retry)
    }

    /// `early` is already waiting on `new_items` when the dispatcher starts.
    fn start_with(
        channel: Arc<str>,
        sink: Arc<dyn Sink>,
        backlog: Vec<OutboxItem>,
        early: Vec<OutboxItem>,
        retry: RetryConfig,
    ) -> Dispatcher {
        let state = ChannelState::new(channel);
        let (items, items_rx) = channel_queue(64);
        for item in early {
            items.offer(item);
        }
        let (done_tx, done) = mpsc::channel(64);
        let task = tokio::spawn(super::Dispatcher { sink, state: Arc::clone(&state), backlog, retry, outbox: None }.run(items_rx, done_tx));
        Dispatcher { state, items, done, task }
    }

    async fn next_done(&mut self) -> (Arc<str>, i64, Outcome) {
        tokio::time::timeout(WAIT, self.done.recv()).await.expect("an outcome in time").expect("dispatcher running")
    }

    /// The next `n` outcomes as (seq, outcome).
    async fn outcomes(&mut self, n: usize) -> Vec<(i64, Outcome)> {
        let mut out = Vec::new();
        for _ in 0..n {
            let (_, seq, outcome) = self.next_done().await;
            out.push((seq, outcome));
        }
        out
    }

    async fn wait_until(&self, what: &str, check: impl Fn(&ChannelStatus) -> bool) {
        let state = Arc::clone(&self.state);
        tokio::time::timeout(WAIT, async move {
            while !check(&state.status()) {
                tokio::time::sleep(StdDuration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    }

    /// Closes the queue, the dispatcher's stop signal (as when the incident manager stops).
    async fn stop(self) -> (Arc<ChannelState>, mpsc::Receiver<(Arc<str>, i64, Outcome)>) {
        let Dispatcher { state, items, done, task } = self;
        drop(items);
        tokio::time::timeout(WAIT, task).await.expect("dispatcher stopped in time").expect("dispatcher did not panic");
        (state, done)
    }
}

fn delivered(seqs: impl IntoIterator<Item = i64>) -> Vec<(i64, Outcome)> {
    seqs.into_iter().map(|s| (s, Outcome::Delivered)).collect()
}

// ---------------------------------------------------------------------------------------------
// Webhook.

#[test]
fn signature_matches_rfc4231_test_case_2() {
    assert_eq!(
        sign(b"Jefe", b"what do ya want for nothing?"),
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
}

#[tokio::test]
async fn webhook_posts_the_body_signed_with_idempotency_headers() {
    let receiver = Receiver::default();
    let addr = receiver.start().await;
    let (channel, sink) = only_sink(&webhook_config(addr), None);
    assert_eq!(&*channel, "webhook:ops");
    let sent = item_of(7, "webhook:ops", incident("inc-42", 3, IncidentState::Acknowledged));
    let mut d = Dispatcher::start(channel, sink, vec![sent.clone()], fast_retry(3));

    let (done_channel, seq, outcome) = d.next_done().await;
    assert_eq!((&*done_channel, seq, outcome), ("webhook:ops", 7, Outcome::Delivered));
    let seen = receiver.seen();
    assert_eq!(seen.len(), 1);
    let request = &seen[0];
    assert_eq!(request.path, "/hooks/citywatch");
    assert_eq!(request.body, sent.body.as_bytes(), "the body is the outbox's bytes, unchanged");
    assert_eq!(request.header("content-type"), "application/json");
    assert_eq!(request.header("idempotency-key"), "inc-42:3");
    assert_eq!(request.header("x-citywatch-delivery"), "inc-42:3");
    assert_eq!(request.header("user-agent"), format!("citywatch/{}", env!("CARGO_PKG_VERSION")));
    assert_eq!(request.header("authorization"), "Bearer t0ken");

    // What a receiver does: recompute the HMAC over the raw body and compare in constant time.
    let signature = request.header("x-citywatch-signature");
    let tag = hex::decode(signature.strip_prefix("sha256=").expect("sha256= prefix")).expect("hex");
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(b"s3cret").expect("key");
    mac.update(&request.body);
    mac.verify_slice(&tag).expect("signature verifies");

    let status = d.state.status();
    assert_eq!((status.delivered, status.pending, status.attempts_failed), (1, 0, 0));
    assert!(status.last_delivered_ms.is_some());
    assert_eq!(status.oldest_pending_ms, None);
    d.stop().await;
}

#[tokio::test]
async fn transient_errors_are_retried_until_delivered_in_order() {
    let receiver = Receiver::scripted(&[503, 503, 503]);
    let addr = receiver.start().await;
    let (channel, sink) = only_sink(&webhook_config(addr), None);
    let mut d = Dispatcher::start(channel, sink, vec![item(1, "webhook:ops"), item(2, "webhook:ops")], fast_retry(3));

    assert_eq!(d.outcomes(2).await, delivered([1, 2]));
    let ids: Vec<String> = receiver.seen().iter().map(|s| s.incident().id).collect();
    assert_eq!(ids, ["inc-1", "inc-1", "inc-1", "inc-1", "inc-2"], "item 2 waits behind item 1");
    let status = d.state.status();
    assert_eq!(status.delivered, 2);
    assert_eq!(status.attempts_failed, 3);
    assert_eq!(status.consecutive_failures, 0);
    assert_eq!(status.dropped, 0);
    assert!(status.last_error.as_deref().is_some_and(|e| e.contains("503")), "{:?}", status.last_error);
    d.stop().await;
}

#[tokio::test]
async fn a_receiver_that_comes_up_later_gets_everything_in_order() {
    // A free port nobody listens on (yet).
    let port_holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = port_holder.local_addr().expect("addr");
    drop(port_holder);

    let (channel, sink) = only_sink(&webhook_config(addr), None);
    let mut d = Dispatcher::start(channel, sink, vec![item(1, "webhook:ops")], fast_retry(3));
    d.items.offer(item(2, "webhook:ops"));
    d.items.offer(item(3, "webhook:ops"));
    d.wait_until("a refused connection", |s| s.attempts_failed >= 2).await;
    let status = d.state.status();
    assert_eq!(status.pending, 3);
    assert_eq!(status.oldest_pending_ms, Some(T0 + 1000));
    assert!(status.consecutive_failures >= 2);
    assert_eq!(status.dropped, 0, "connection refused is never a reason to give up");

    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind(addr).await.expect("rebind the same port");
    receiver.serve(listener);

    assert_eq!(d.outcomes(3).await, delivered([1, 2, 3]));
    let ids: Vec<String> = receiver.seen().iter().map(|s| s.incident().id).collect();
    assert_eq!(ids, ["inc-1", "inc-2", "inc-3"]);
    let status = d.state.status();
    assert_eq!((status.delivered, status.pending, status.consecutive_failures), (3, 0, 0));
    d.stop().await;
}

#[tokio::test]
async fn a_refused_change_is_dropped_after_the_set_attempts_and_the_next_one_goes() {
    let receiver = Receiver { refuse: Some("inc-bad"), ..Receiver::default() };
    let addr = receiver.start().await;
    let (channel, sink) = only_sink(&webhook_config(addr), None);
    let bad = item_of(1, "webhook:ops", incident("inc-bad", 1, IncidentState::Open));
    let mut d = Dispatcher::start(channel, sink, vec![bad, item(2, "webhook:ops")], fast_retry(4));

    assert_eq!(d.outcomes(2).await, vec![(1, Outcome::Dropped { reason: "rejected" }), (2, Outcome::Delivered)]);
    let ids: Vec<String> = receiver.seen().iter().map(|s| s.incident().id).collect();
    assert_eq!(ids, ["inc-bad", "inc-bad", "inc-bad", "inc-bad", "inc-2"]);
    let status = d.state.status();
    assert_eq!((status.delivered, status.dropped, status.attempts_failed), (1, 1, 4));
    assert!(status.last_error.as_deref().is_some_and(|e| e.contains("400")), "{:?}", status.last_error);

    let metrics = crate::metrics::encode_collector(ChannelMetrics(vec![Arc::clone(&d.state)]));
    for line in [
        // OpenMetrics: the family is named without `_total`, its counter samples with it.
        "# TYPE citywatch_notify_delivered counter",
        "citywatch_notify_delivered_total{channel=\"webhook:ops\"} 1",
        "citywatch_notify_dropped_total{channel=\"webhook:ops\",reason=\"rejected\"} 1",
        "citywatch_notify_failed_attempts_total{channel=\"webhook:ops\"} 4",
        "# TYPE citywatch_notify_pending gauge",
        "citywatch_notify_pending{channel=\"webhook:ops\"} 0",
        "citywatch_notify_oldest_pending_age_seconds{channel=\"webhook:ops\"} 0.0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "missing {line:?} in\n{metrics}");
    }
    d.stop().await;
}

#[tokio::test]
async fn backlog_and_overlapping_new_items_are_each_delivered_once() {
    let receiver = Receiver::default();
    let addr = receiver.start().await;
    let (channel, sink) = only_sink(&webhook_config(addr), None);
    // The backlog out of order, and new items that repeat part of it.
    let backlog = vec![item(3, "webhook:ops"), item(1, "webhook:ops"), item(2, "webhook:ops")];
    let early = vec![item(2, "webhook:ops"), item(3, "webhook:ops"), item(4, "webhook:ops")];
    let mut d = Dispatcher::start_with(channel, sink, backlog, early, fast_retry(3));
    assert_eq!(d.outcomes(4).await, delivered([1, 2, 3, 4]));
    d.items.offer(item(4, "webhook:ops"));
    d.items.offer(item(5, "webhook:ops"));
    assert_eq!(d.outcomes(1).await, delivered([5]));

    let ids: Vec<String> = receiver.seen().iter().map(|s| s.incident().id).collect();
    assert_eq!(ids, ["inc-1", "inc-2", "inc-3", "inc-4", "inc-5"]);
    let (state, mut done) = d.stop().await;
    assert_eq!(state.status().delivered, 5);
    assert!(done.try_recv().is_err(), "nothing reported twice");
}

#[tokio::test]
async fn shutdown_during_backoff_returns_without_reporting_a_drop() {
    let receiver = Receiver::scripted(&[503; 64]);
    let addr = receiver.start().await;
    let (channel, sink) = only_sink(&webhook_config(addr), None);
    let hour = Duration::secs(3600);
    let retry = RetryConfig { initial: hour, max: hour, give_up_after_attempts: 1 };
    let d = Dispatcher::start(channel, sink, vec![item(1, "webhook:ops"), item(2, "webhook:ops")], retry);
    d.wait_until("the first failure and a retry time", |s| s.attempts_failed == 1 && s.next_retry_ms.is_some()).await;

    // `stop` fails the test unless the dispatcher ends well before the hour's backoff.
    let (state, mut done) = d.stop().await;
    assert!(done.try_recv().is_err(), "nothing reported: both items stay in the outbox");
    let status = state.status();
    assert_eq!((status.delivered, status.dropped, status.pending), (0, 0, 2));
    assert_eq!(receiver.seen().len(), 1);
}

#[tokio::test]
async fn the_dispatcher_ends_when_its_input_closes_and_leaves_the_rest_in_the_outbox() {
    let receiver = Receiver::default();
    let addr = receiver.start().await;
    let (channel, sink) = only_sink(&webhook_config(addr), None);
    let mut d = Dispatcher::start(channel, sink, vec![item(1, "webhook:ops")], fast_retry(3));
    assert_eq!(d.outcomes(1).await, delivered([1]));
    d.items.offer(item(2, "webhook:ops"));
    // Closing the queue is the stop signal: whatever was not delivered yet is neither sent nor
    // reported (it stays pending in the outbox for the next start).
    let (state, mut done) = d.stop().await;
    let status = state.status();
    assert_eq!(status.delivered + status.pending, 2, "{status:?}");
    if status.pending == 1 {
        assert!(done.try_recv().is_err());
    }
}

#[tokio::test]
async fn an_overflowing_queue_neither_blocks_nor_drops_the_dispatcher_re_reads_the_outbox() {
    let receiver = Receiver::default();
    let addr = receiver.start().await;
    let (channel, sink) = only_sink(&webhook_config(addr), None);
    // Five changes committed to the durable outbox, as the incident manager does first.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(crate::incidents::store::IncidentStore::open(dir.path()).expect("incident store"));
    let incidents: Vec<Arc<Incident>> = (1..=5).map(|n| Arc::new(incident(&format!("inc-{n}"), 1, IncidentState::Open))).collect();
    let commit = crate::incidents::store::Commit { incidents: incidents.clone(), outbox: incidents, ..Default::default() };
    let committed = store.commit(&commit, &[Arc::clone(&channel)], T0).expect("commit");
    let seqs: Vec<i64> = committed.iter().map(|c| c.seq).collect();
    assert_eq!(seqs.len(), 5);

    // A queue of two: the third offer finds it full and neither waits nor fails; the fourth and
    // fifth are left to the outbox too.
    let (items, items_rx) = channel_queue(2);
    for c in committed {
        items.offer(OutboxItem { seq: c.seq, channel: Arc::clone(&channel), incident: c.incident, body: c.body });
    }
    assert!(items_rx.lagged(), "the full queue is reported to the dispatcher");

    let state = ChannelState::new(Arc::clone(&channel));
    let (done_tx, mut done) = mpsc::channel(64);
    let dispatcher = super::Dispatcher { sink, state: Arc::clone(&state), backlog: Vec::new(), retry: fast_retry(3), outbox: Some(store) };
    let task = tokio::spawn(dispatcher.run(items_rx, done_tx));
    let mut outcomes = Vec::new();
    for _ in 0..5 {
        let (_, seq, outcome) = tokio::time::timeout(WAIT, done.recv()).await.expect("an outcome in time").expect("running");
        outcomes.push((seq, outcome));
    }
    assert_eq!(outcomes, delivered(seqs.clone()), "every change once, in commit order");
    let ids: Vec<String> = receiver.wait_for(5).await.iter().map(|s| s.incident().id).collect();
    assert_eq!(ids, (1..=5).map(|n| format!("inc-{n}")).collect::<Vec<_>>());
    // Caught up, the queue carries new changes again.
    items.offer(item(seqs[4] + 1, &channel));
    let (_, seq, _) = tokio::time::timeout(WAIT, done.recv()).await.expect("in time").expect("running");
    assert_eq!(seq, seqs[4] + 1);
    drop(items);
    tokio::time::timeout(WAIT, task).await.expect("stopped").expect("no panic");
}

// ---------------------------------------------------------------------------------------------
// Alertmanager.

fn alertmanager_config(addr: SocketAddr, resend_every: Duration) -> NotifyConfig {
    NotifyConfig {
        alertmanager: Some(AlertmanagerConfig {
            url: format!("http://{addr}/"),
            timeout: Duration::secs(5),
            resend_every,
            generator_url: Some("http://gw.example:8080/".into()),
        }),
        retry: fast_retry(3),
        ..NotifyConfig::default()
    }
}

fn alertmanager_sink(addr: SocketAddr) -> AlertmanagerSink {
    let cfg = alertmanager_config(addr, Duration::secs(60));
    let Some(am) = cfg.alertmanager.as_ref() else { unreachable!("configured above") };
    AlertmanagerSink::new(am).expect("sink")
}

#[tokio::test]
async fn alertmanager_alert_shape_and_resend_until_inactive() {
    let receiver = Receiver::default();
    let addr = receiver.start().await;
    let sink = alertmanager_sink(addr);

    let open = item_of(1, "alertmanager", incident("inc-9", 1, IncidentState::Open));
    sink.deliver(&open).await.expect("delivered");
    let seen = receiver.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/api/v2/alerts");
    assert_eq!(seen[0].header("content-type"), "application/json");
    let expected = serde_json::json!([{
        "labels": {
            "alertname": "gas_high", "severity": "critical", "site": "xh", "device": "gas-1",
            "kind": "gas_detector", "incident_id": "inc-9", "key": "xh/gas-1/gas_high#inc-9",
            "metric": "gas_lel",
        },
        "annotations": {
            "summary": "gas at 55.5 %LEL (revision 1)", "state": "open", "value": "55.5",
            "threshold": "50", "revision": "1",
        },
        "startsAt": open.incident.opened_at,
        "generatorURL": "http://gw.example:8080/#/incidents/inc-9",
    }]);
    assert_eq!(seen[0].json(), expected, "no endsAt while active");

    // Re-posted at the first tick, then only every `resend_every`.
    let now = T0 + 10_000;
    sink.tick(now).await;
    assert_eq!(receiver.seen().len(), 2);
    assert_eq!(receiver.seen()[1].json(), expected);
    sink.tick(now + 1).await;
    sink.tick(now + 59_999).await;
    assert_eq!(receiver.seen().len(), 2, "not again before resend_every");
    sink.tick(now + 60_000).await;
    assert_eq!(receiver.seen().len(), 3);

    // An older revision arriving late does not replace the newer one being re-posted.
    let acked = item_of(2, "alertmanager", incident("inc-9", 3, IncidentState::Acknowledged));
    sink.deliver(&acked).await.expect("delivered");
    sink.deliver(&item_of(3, "alertmanager", incident("inc-9", 2, IncidentState::Cleared))).await.expect("delivered");
    assert_eq!(sink.active_ids(), ["inc-9"]);

    // Cleared: the alert ends at the incident's update time and is re-posted no more.
    let cleared = item_of(4, "alertmanager", incident("inc-9", 4, IncidentState::Cleared));
    sink.deliver(&cleared).await.expect("delivered");
    let last = receiver.seen().last().expect("a post").json();
    assert_eq!(last[0]["endsAt"], serde_json::json!(cleared.incident.updated_at));
    assert_eq!(last[0]["annotations"]["state"], "cleared");
    assert!(sink.active_ids().is_empty());
    let posts = receiver.seen().len();
    sink.tick(now + 600_000).await;
    assert_eq!(receiver.seen().len(), posts, "nothing left to re-post");
}

#[tokio::test]
async fn alertmanager_resolves_the_old_label_set_when_severity_changes() {
    let receiver = Receiver::default();
    let addr = receiver.start().await;
    let sink = alertmanager_sink(addr);
    let mut major = incident("inc-5", 1, IncidentState::Open);
    major.severity = Severity::Major;
    sink.deliver(&item_of(1, "alertmanager", major)).await.expect("delivered");
    let critical = incident("inc-5", 2, IncidentState::Open);
    sink.deliver(&item_of(2, "alertmanager", critical.clone())).await.expect("delivered");

    let post = receiver.seen()[1].json();
    let alerts = post.as_array().expect("array");
    assert_eq!(alerts.len(), 2);
    assert_eq!(alerts[0]["labels"]["severity"], "major");
    assert_eq!(alerts[0]["endsAt"], serde_json::json!(critical.updated_at));
    assert_eq!(alerts[1]["labels"]["severity"], "critical");
    assert!(alerts[1].get("endsAt").is_none());

    // Re-posting carries only the current label set.
    sink.tick(T0).await;
    let resent = receiver.seen()[2].json();
    assert_eq!(resent.as_array().map(Vec::len), Some(1));
    assert_eq!(resent[0]["labels"]["severity"], "critical");
}

#[tokio::test]
async fn alertmanager_resend_runs_from_the_dispatcher_and_after_a_restart() {
    let receiver = Receiver::default();
    let addr = receiver.start().await;
    let (channel, sink) = only_sink(&alertmanager_config(addr, Duration::secs(1)), None);
    assert_eq!(&*channel, "alertmanager");
    // As after a restart: inc-1 is active and was delivered in an earlier run.
    sink.resume(&[Arc::new(incident("inc-1", 2, IncidentState::Dispatched))]);
    let mut d = Dispatcher::start(channel, sink, vec![item(2, "alertmanager")], fast_retry(3));
    assert_eq!(d.outcomes(1).await, delivered([2]));

    // The dispatcher's ticks re-post both active incidents in one request.
    let seen = tokio::time::timeout(WAIT, async {
        loop {
            let seen = receiver.wait_for(receiver.seen().len() + 1).await;
            if seen.last().is_some_and(|s| s.json().as_array().map(Vec::len) == Some(2)) {
                return seen;
            }
        }
    })
    .await
    .expect("a re-post of both");
    let ids: Vec<serde_json::Value> =
        seen.last().expect("post").json().as_array().expect("array").iter().map(|a| a["labels"]["incident_id"].clone()).collect();
    assert_eq!(ids, ["inc-1", "inc-2"]);
    d.stop().await;
}

// ---------------------------------------------------------------------------------------------
// MQTT.

type Published = Arc<Mutex<Vec<(String, Vec<u8>, bool)>>>;

/// A publisher that fails `failures` times, then records what it is given.
fn recording_publisher(failures: usize) -> (PublishFn, Published) {
    let published: Published = Arc::default();
    let left = Arc::new(Mutex::new(failures));
    let record = Arc::clone(&published);
    let publish: PublishFn = Arc::new(move |topic, payload, retain| {
        let record = Arc::clone(&record);
        let left = Arc::clone(&left);
        Box::pin(async move {
            let mut left = left.lock().expect("left");
            if *left > 0 {
                *left -= 1;
                return Err("broker not connected".to_owned());
            }
            record.lock().expect("record").push((topic, payload, retain));
            Ok(())
        })
    });
    (publish, published)
}

#[tokio::test]
async fn mqtt_publishes_the_body_to_the_ops_topic_and_retries_broker_errors() {
    let mqtt = MqttNotifyConfig { topic: "city/ops".into(), retain: true };
    let cfg = NotifyConfig { mqtt: Some(mqtt), retry: fast_retry(1), ..NotifyConfig::default() };
    let (publish, published) = recording_publisher(2);
    let (channel, sink) = only_sink(&cfg, Some(publish));
    assert_eq!(&*channel, "mqtt");
    let first = item(1, "mqtt");
    let mut d = Dispatcher::start(channel, sink, vec![first.clone(), item(2, "mqtt")], fast_retry(1));

    assert_eq!(d.outcomes(2).await, delivered([1, 2]), "broker errors are transient even with give_up = 1");
    let published = published.lock().expect("published").clone();
    assert_eq!(published.len(), 2);
    assert_eq!(published[0], ("city/ops".to_owned(), first.body.as_bytes().to_vec(), true));
    let status = d.state.status();
    assert_eq!((status.attempts_failed, status.dropped), (2, 0));
    assert!(status.last_error.as_deref().is_some_and(|e| e.contains("broker not connected")));
    d.stop().await;
}

#[test]
fn mqtt_channel_needs_a_publisher() {
    let cfg = NotifyConfig { mqtt: Some(MqttNotifyConfig::default()), ..NotifyConfig::default() };
    assert!(matches!(build_sinks(&cfg, None), Err(Error::NoPublisher)));
}

// ---------------------------------------------------------------------------------------------
// Configuration.

fn parse(text: &str) -> NotifyConfig {
    #[derive(serde::Deserialize)]
    struct File {
        notify: NotifyConfig,
    }
    toml::from_str::<File>(text).expect("parses").notify
}

fn invalid_key(text: &str) -> (String, String) {
    parse(text).validate().expect_err("invalid")
}

#[test]
fn config_defaults_and_channel_names() {
    let cfg = parse(
        r#"
        [[notify.webhook]]
        url = "http://ops.example/incidents"
        secret = "k"
        [[notify.webhook]]
        name = "crew-app"
        url = "http://10.0.0.5:8081/hook"
        secret = "k2"
        timeout = "2s"
        headers = { Authorization = "Bearer x" }
        [notify.mqtt]
        [notify.alertmanager]
        url = "http://127.0.0.1:9093"
        "#,
    );
    assert_eq!(cfg.validate(), Ok(()));
    let names: Vec<String> = cfg.channel_names().iter().map(|n| n.to_string()).collect();
    assert_eq!(names, ["webhook:webhook-0", "webhook:crew-app", "mqtt", "alertmanager"]);
    assert_eq!(cfg.webhook[0].timeout, Duration::secs(5));
    assert_eq!(cfg.webhook[1].timeout, Duration::secs(2));
    assert_eq!(cfg.mqtt, Some(MqttNotifyConfig { topic: "citywatch/v1/ops/incidents".into(), retain: false }));
    let am = cfg.alertmanager.as_ref().expect("alertmanager");
    assert_eq!((am.timeout, am.resend_every, am.generator_url.as_deref()), (Duration::secs(5), Duration::secs(60), None));
    assert_eq!(cfg.retry, RetryConfig::default());
    assert_eq!(cfg.retry.initial, Duration(StdDuration::from_millis(500)));
    assert_eq!((cfg.retry.max, cfg.retry.give_up_after_attempts), (Duration::secs(10), 10));
    assert_eq!(NotifyConfig::default().channel_names(), Vec::<Arc<str>>::new());

    // Secrets stay out of Debug output.
    let debug = format!("{cfg:?}");
    assert!(!debug.contains("k2") && !debug.contains("Bearer"), "{debug}");
}

#[test]
fn config_rejects_other_schemes_empty_secrets_and_duplicate_names() {
    let (key, reason) = invalid_key(
        r#"
        [[notify.webhook]]
        url = "ftp://ops.example/incidents"
        secret = "k"
        "#,
    );
    assert_eq!(key, "notify.webhook[0].url");
    assert!(reason.contains("http:// or https://"), "{reason}");

    let (key, reason) = invalid_key(
        r#"
        [notify.alertmanager]
        url = "gopher://am.example:9093"
        "#,
    );
    assert_eq!(key, "notify.alertmanager.url");
    assert!(reason.contains("https://"), "{reason}");

    let (key, _) = invalid_key(
        r#"
        [[notify.webhook]]
        url = "http://ops.example/incidents"
        secret = ""
        "#,
    );
    assert_eq!(key, "notify.webhook[0].secret");

    let (key, reason) = invalid_key(
        r#"
        [[notify.webhook]]
        name = "ops"
        url = "http://a.example/"
        secret = "k"
        [[notify.webhook]]
        name = "ops"
        url = "http://b.example/"
        secret = "k"
        "#,
    );
    assert_eq!(key, "notify.webhook[1].name");
    assert!(reason.contains("\"ops\""), "{reason}");

    // A default name can collide with an explicit one too.
    let (key, _) = invalid_key(
        r#"
        [[notify.webhook]]
        name = "webhook-1"
        url = "http://a.example/"
        secret = "k"
        [[notify.webhook]]
        url = "http://b.example/"
        secret = "k"
        "#,
    );
    assert_eq!(key, "notify.webhook[1].name");
}

#[test]
fn config_rejects_other_mistakes_by_key() {
    let cases = [
        ("[[notify.webhook]]\nurl = \"ftp://x\"\nsecret = \"k\"", "notify.webhook[0].url"),
        ("[[notify.webhook]]\nurl = \"not a url\"\nsecret = \"k\"", "notify.webhook[0].url"),
        ("[[notify.webhook]]\nname = \"a b\"\nurl = \"http://x/\"\nsecret = \"k\"", "notify.webhook[0].name"),
        ("[[notify.webhook]]\nurl = \"http://x/\"\nsecret = \"k\"\ntimeout = \"0s\"", "notify.webhook[0].timeout"),
        (
            "[[notify.webhook]]\nurl = \"http://x/\"\nsecret = \"k\"\nheaders = { X-Citywatch-Signature = \"forged\" }",
            "notify.webhook[0].headers.X-Citywatch-Signature",
        ),
        (
            "[[notify.webhook]]\nurl = \"http://x/\"\nsecret = \"k\"\nheaders = { \"bad header\" = \"v\" }",
            "notify.webhook[0].headers.bad header",
        ),
        ("[notify.mqtt]\ntopic = \"ops/#\"", "notify.mqtt.topic"),
        ("[notify.alertmanager]\nurl = \"http://x:9093\"\nresend_every = \"100ms\"", "notify.alertmanager.resend_every"),
        ("[notify.alertmanager]\nurl = \"http://x:9093\"\ngenerator_url = \"gw:8080\"", "notify.alertmanager.generator_url"),
        ("[notify.retry]\ninitial = \"2m\"", "notify.retry.max"),
        ("[notify.retry]\ngive_up_after_attempts = 0", "notify.retry.give_up_after_attempts"),
    ];
    for (text, expected) in cases {
        assert_eq!(invalid_key(text).0, expected, "for {text}");
    }
    // https is fine for a link people click.
    let ok = parse("[notify.alertmanager]\nurl = \"http://x:9093\"\ngenerator_url = \"https://gw.example\"");
    assert_eq!(ok.validate(), Ok(()));
    // Unknown keys are errors at parse time.
    assert!(toml::from_str::<NotifyConfig>("[mqtt]\ntopik = \"x\"").is_err());
    // build_sinks validates too, naming the key.
    let cfg = parse("[[notify.webhook]]\nurl = \"ftp://x/\"\nsecret = \"k\"");
    assert!(matches!(build_sinks(&cfg, None), Err(Error::Invalid { key, .. }) if key == "notify.webhook[0].url"));
}

/// An https:// receiver with its own CA: delivered and signed as over http; a receiver whose
/// certificate the `ca` does not vouch for is a transient failure (retried), never a delivery.
#[tokio::test]
async fn webhook_over_https_trusts_the_configured_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tls, _) = crate::tls::testing::self_signed(dir.path());
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let listener = crate::tls::TlsListener::new(listener, crate::tls::acceptor(&tls).expect("acceptor")).expect("tls");
    let app = Router::new().fallback(receive).with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut cfg = webhook_config(SocketAddr::from(([127, 0, 0, 1], port)));
    cfg.webhook[0].url = format!("https://localhost:{port}/hooks/citywatch");
    cfg.webhook[0].ca = Some(tls.cert.clone());
    assert_eq!(cfg.validate(), Ok(()));
    let (_, sink) = only_sink(&cfg, None);
    let sent = item_of(1, "webhook:ops", incident("inc-7", 1, IncidentState::Open));
    sink.deliver(&sent).await.expect("delivered over https");
    let seen = receiver.wait_for(1).await;
    assert_eq!(seen[0].body, sent.body.as_bytes());
    assert!(seen[0].header("x-citywatch-signature").starts_with("sha256="));

    // Another CA: the handshake fails, the delivery is retried later, nothing arrives.
    let other = tempfile::tempdir().expect("tempdir");
    let (wrong, _) = crate::tls::testing::self_signed(other.path());
    cfg.webhook[0].ca = Some(wrong.cert);
    let (_, sink) = only_sink(&cfg, None);
    match sink.deliver(&sent).await {
        Err(DeliveryError::Transient(_)) => {}
        other => panic!("expected a transient failure, got {other:?}"),
    }
    assert_eq!(receiver.seen().len(), 1);

    // A ca file that is not PEM is named at start.
    std::fs::write(dir.path().join("junk.pem"), "junk").expect("write");
    cfg.webhook[0].ca = Some(dir.path().join("junk.pem"));
    assert!(matches!(build_sinks(&cfg, None), Err(Error::Invalid { key, .. }) if key.ends_with(".ca")));
}
