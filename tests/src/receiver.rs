//! A real HTTP webhook receiver (axum on a free loopback port) standing in for an operations
//! centre: it records every POST with its arrival time, headers, JSON body and whether the
//! `X-Citywatch-Signature` HMAC is right, and can be taken down, brought back on the same port,
//! or told to refuse with a status. Not a mock of the gateway's client, and not for production.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use hmac::{Hmac, KeyInit as _, Mac as _};
use serde_json::Value;
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::READY_TIMEOUT;

/// The header carrying `sha256=<lowercase hex HMAC-SHA256(secret, raw body)>`.
pub const SIGNATURE_HEADER: &str = "x-citywatch-signature";
/// The header carrying `{id}:{revision}`.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// One POST as the receiver got it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// When the request (head and body) had arrived, on this process's monotonic clock.
    pub received: Instant,
    /// The same moment as wall-clock milliseconds since the epoch.
    pub wall_ms: i64,
    /// Request headers, names lowercase (the last value wins for repeated names).
    pub headers: BTreeMap<String, String>,
    /// The raw body as text (lossy for non-UTF-8).
    pub raw: String,
    /// The body parsed as JSON; `Value::Null` if it is not JSON (see `raw`).
    pub body: Value,
    /// `X-Citywatch-Signature` equals `sha256=` + lowercase hex HMAC-SHA256(secret, raw body).
    pub signature_valid: bool,
    /// The status the receiver answered with.
    pub status: u16,
}

impl Delivery {
    /// A header by (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// The incident id of the body (`id`).
    pub fn id(&self) -> &str {
        self.body["id"].as_str().unwrap_or_default()
    }

    /// The incident revision of the body (`revision`), 0 if absent.
    pub fn revision(&self) -> u64 {
        self.body["revision"].as_u64().unwrap_or(0)
    }

    /// The rule of the body (`rule`).
    pub fn rule(&self) -> &str {
        self.body["rule"].as_str().unwrap_or_default()
    }

    /// The device of the body (`device`).
    pub fn device(&self) -> &str {
        self.body["device"].as_str().unwrap_or_default()
    }

    /// The site of the body (`site`).
    pub fn site(&self) -> &str {
        self.body["site"].as_str().unwrap_or_default()
    }

    /// The incident state of the body (`state`).
    pub fn state(&self) -> &str {
        self.body["state"].as_str().unwrap_or_default()
    }

    /// One line for failure reports.
    pub fn describe(&self) -> String {
        format!(
            "{} {}:{} rule={} site={} device={} state={} sig={} key={:?}",
            self.status,
            self.id(),
            self.revision(),
            self.rule(),
            self.site(),
            self.device(),
            self.state(),
            if self.signature_valid { "ok" } else { "BAD" },
            self.header(IDEMPOTENCY_HEADER).unwrap_or("-"),
        )
    }
}

/// Everything the handler and the test share.
#[derive(Debug)]
struct Shared {
    secret: Vec<u8>,
    status: AtomicU16,
    /// Answered with a 2xx.
    accepted: Mutex<Vec<Delivery>>,
    /// Answered with anything else (see [`WebhookReceiver::set_status`]).
    rejected: Mutex<Vec<Delivery>>,
    /// Counts every recorded POST, so waiters wake on each one without polling.
    recorded: watch::Sender<u64>,
    /// Feeds of accepted deliveries handed out by [`WebhookReceiver::subscribe`].
    feeds: Mutex<Vec<mpsc::UnboundedSender<Delivery>>>,
}

/// Locks a mutex, recovering the data if a panicking test thread poisoned it (the data is a
/// plain record of what arrived, valid at every point).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The running server: a shutdown trigger and its task.
#[derive(Debug)]
struct Serving {
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

/// A webhook receiver on `127.0.0.1:PORT/hook`. Dropping it stops the server.
#[derive(Debug)]
pub struct WebhookReceiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    serving: Option<Serving>,
}

impl WebhookReceiver {
    /// Starts on a free loopback port; HMAC signatures are checked against `secret`.
    pub async fn start(secret: &str) -> anyhow::Result<WebhookReceiver> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the webhook receiver on 127.0.0.1:0")?;
        let addr = listener.local_addr().context("receiver address")?;
        let (recorded, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            secret: secret.as_bytes().to_vec(),
            status: AtomicU16::new(200),
            accepted: Mutex::new(Vec::new()),
            rejected: Mutex::new(Vec::new()),
            recorded,
            feeds: Mutex::new(Vec::new()),
        });
        let mut receiver = WebhookReceiver {
            addr,
            shared,
            serving: None,
        };
        receiver.serve(listener);
        Ok(receiver)
    }

    fn serve(&mut self, listener: TcpListener) {
        let app = Router::new()
            .route("/hook", post(record))
            .with_state(Arc::clone(&self.shared));
        let (shutdown, signal) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = signal.await;
                })
                .await
        });
        self.serving = Some(Serving { shutdown, task });
    }

    /// `http://127.0.0.1:PORT/hook`.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// The port it listens on (kept across [`WebhookReceiver::start_again`]).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Whether the listener is open.
    pub fn is_running(&self) -> bool {
        self.serving.is_some()
    }

    /// Every POST answered with a 2xx, in arrival order.
    pub fn deliveries(&self) -> Vec<Delivery> {
        lock(&self.shared.accepted).clone()
    }

    /// Every POST answered with a non-2xx status (while [`WebhookReceiver::set_status`] said
    /// so), in arrival order.
    pub fn rejected_attempts(&self) -> Vec<Delivery> {
        lock(&self.shared.rejected).clone()
    }

    /// Answer every following POST with `status` (200 by default). Non-2xx answers are recorded
    /// under [`WebhookReceiver::rejected_attempts`], not [`WebhookReceiver::deliveries`].
    pub fn set_status(&self, status: u16) {
        self.shared.status.store(status, Ordering::SeqCst);
    }

    /// A feed of every accepted delivery from now on: await the next one without polling.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<Delivery> {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.shared.feeds).push(tx);
        rx
    }

    /// Waits until `probe` over the accepted deliveries returns `Some`; panics after `within`
    /// with what arrived, naming `what`. Woken by every new POST, and every 250 ms besides so a
    /// probe may also look at other state (e.g. the gateway's API). The probe gets a snapshot:
    /// it may take its time without holding up the receiver.
    pub async fn wait_for<T>(
        &self,
        within: Duration,
        what: &str,
        mut probe: impl FnMut(&[Delivery]) -> Option<T>,
    ) -> T {
        const RECHECK: Duration = Duration::from_millis(250);
        let deadline = tokio::time::Instant::now() + within;
        let mut recorded = self.shared.recorded.subscribe();
        loop {
            // Mark the current count seen before looking, so a POST racing the look wakes us.
            recorded.borrow_and_update();
            if let Some(found) = probe(&self.deliveries()) {
                return found;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                panic!(
                    "timed out after {within:?} waiting for {what} at the webhook receiver\n{}",
                    self.report()
                );
            }
            // Err: the wake-up period passed; the sender lives in `shared`, so `changed`
            // itself cannot fail.
            let _ = tokio::time::timeout_at(deadline.min(now + RECHECK), recorded.changed()).await;
        }
    }

    /// What arrived so far, one line per POST, for failure messages.
    pub fn report(&self) -> String {
        let accepted = lock(&self.shared.accepted);
        let rejected = lock(&self.shared.rejected);
        let mut out = format!(
            "webhook receiver {}: {} accepted, {} rejected\n",
            self.url(),
            accepted.len(),
            rejected.len()
        );
        for d in accepted.iter().chain(rejected.iter()) {
            out.push_str("  ");
            out.push_str(&d.describe());
            out.push('\n');
        }
        out
    }

    /// Closes the listener and every connection (graceful: an in-flight request is answered
    /// first). Afterwards connecting to the port is refused.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(serving) = self.serving.take() {
            let _ = serving.shutdown.send(());
            let mut task = serving.task;
            match tokio::time::timeout(READY_TIMEOUT, &mut task).await {
                Ok(joined) => joined
                    .context("the receiver's server task")?
                    .context("the receiver's server")?,
                Err(_) => {
                    task.abort();
                    anyhow::bail!(
                        "the webhook receiver's connections did not close within {READY_TIMEOUT:?}"
                    );
                }
            }
        }
        Ok(())
    }

    /// Listens again on the same port (after [`WebhookReceiver::stop`]); keeps what was
    /// recorded. Retries the bind, bounded, in case the old socket is still being released.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.serving.is_none(), "the webhook receiver is running");
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("binding {} again", self.addr));
                }
            }
        };
        self.serve(listener);
        Ok(())
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        if let Some(serving) = self.serving.take() {
            let _ = serving.shutdown.send(());
            serving.task.abort();
        }
        if std::thread::panicking() {
            eprintln!(
                "=== {}=== end of webhook receiver report ===",
                self.report()
            );
        }
    }
}

/// The handler: records the POST and answers with the configured status.
async fn record(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let received = Instant::now();
    let wall_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let status = shared.status.load(Ordering::SeqCst);
    let headers: BTreeMap<String, String> = headers
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    let signature_valid = headers
        .get(SIGNATURE_HEADER)
        .is_some_and(|got| *got == signature(&shared.secret, &body));
    let delivery = Delivery {
        received,
        wall_ms,
        headers,
        raw: String::from_utf8_lossy(&body).into_owned(),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        signature_valid,
        status,
    };
    let accepted = (200..300).contains(&status);
    if accepted {
        lock(&shared.feeds).retain(|feed| feed.send(delivery.clone()).is_ok());
        lock(&shared.accepted).push(delivery);
    } else {
        lock(&shared.rejected).push(delivery);
    }
    shared.recorded.send_modify(|n| *n += 1);
    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// The deliveries of incident `id`, one per Idempotency-Key, after checking that every repeat of
/// a key carried the same bytes and that each key is the body's `{id}:{revision}`.
pub fn revisions_of(deliveries: &[Delivery], id: &str) -> BTreeMap<u64, Delivery> {
    let mut by_key: BTreeMap<String, Delivery> = BTreeMap::new();
    for d in deliveries.iter().filter(|d| d.id() == id) {
        assert!(d.signature_valid, "bad signature: {}", d.describe());
        let key = d.header(IDEMPOTENCY_HEADER).unwrap_or_default().to_owned();
        assert_eq!(key, format!("{}:{}", d.id(), d.revision()), "Idempotency-Key is {{id}}:{{revision}}");
        match by_key.get(&key) {
            Some(first) => assert_eq!(first.raw, d.raw, "conflicting content under one Idempotency-Key {key}"),
            None => {
                by_key.insert(key, d.clone());
            }
        }
    }
    by_key.into_values().map(|d| (d.revision(), d)).collect()
}

/// `sha256=` + lowercase hex HMAC-SHA256(`secret`, `body`): what a correct sender puts in
/// `X-Citywatch-Signature`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length: new_from_slice cannot fail for it.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}
