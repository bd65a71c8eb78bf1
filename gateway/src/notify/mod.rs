//! Push channels: deliver every incident change from the durable outbox to the operations
//! centre's receivers (signed webhooks, the MQTT ops topic, Prometheus Alertmanager).
//!
//! Not here: the outbox itself (it hands each channel its items and records the outcomes) and
//! Server-Sent Events (the API fans those out from a broadcast). One [`dispatch::run`] task per
//! channel delivers that channel's items strictly in outbox order; [`ChannelState`] is what
//! the API and `/metrics` see of it.

pub mod alertmanager;
pub mod dispatch;
pub mod influx;
pub mod mqtt;
pub mod sink;
pub mod webhook;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::units::Duration;

pub use alertmanager::{Alert, AlertmanagerSink};
pub use dispatch::{run, Dispatcher, Outcome};
pub use mqtt::{MqttSink, PublishFn};
pub use sink::{DeliveryError, NamedSink, Sink};
pub use webhook::{sign, WebhookSink};

/// Why a push channel could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `[notify]` key is wrong; `key` is its full path, e.g. `notify.webhook[0].url`.
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
    /// `[notify.mqtt]` is configured but the caller has no MQTT connection to publish through.
    #[error("notify.mqtt is configured but no MQTT publisher is available")]
    NoPublisher,
    /// The HTTP client for a channel could not be set up.
    #[error("{channel}: cannot build the HTTP client: {source}")]
    HttpClient {
        channel: String,
        #[source]
        source: reqwest::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Drop reasons, each a label value of `citywatch_notify_dropped_total`.
pub mod drop_reason {
    /// The receiver kept refusing the change (4xx other than 408/429) for
    /// `notify.retry.give_up_after_attempts` attempts.
    pub const REJECTED: &str = "rejected";
    /// Every reason, so `/metrics` shows each series from the start.
    pub const ALL: &[&str] = &[REJECTED];
}

/// Builds every configured channel's sink, named as [`NotifyConfig::channel_names`] names them
/// and in that order. `publish` is required when `[notify.mqtt]` is configured.
pub fn build_sinks(cfg: &NotifyConfig, publish: Option<PublishFn>) -> Result<Vec<NamedSink>> {
    cfg.validate().map_err(|(key, reason)| Error::Invalid { key, reason })?;
    let names = cfg.channel_names();
    let mut names = names.into_iter();
    let mut sinks: Vec<NamedSink> = Vec::new();
    let mut next_name =
        || names.next().ok_or_else(|| Error::Invalid { key: "notify".into(), reason: "channel names out of step".into() });
    for hook in &cfg.webhook {
        let name = next_name()?;
        let sink = WebhookSink::new(Arc::clone(&name), hook)?;
        sinks.push((name, Arc::new(sink)));
    }
    if let Some(mqtt) = &cfg.mqtt {
        let publish = publish.ok_or(Error::NoPublisher)?;
        sinks.push((next_name()?, Arc::new(MqttSink::new(mqtt, publish))));
    }
    if let Some(am) = &cfg.alertmanager {
        sinks.push((next_name()?, Arc::new(AlertmanagerSink::new(am)?)));
    }
    Ok(sinks)
}

// ---------------------------------------------------------------------------------------------
// Configuration.

/// `[notify]`: which push channels run. None configured: incidents are only kept and shown.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    /// `[[notify.webhook]]`, any number; default none.
    pub webhook: Vec<WebhookConfig>,
    /// `[notify.mqtt]`: publish to the ops topic on the gateway's MQTT connection; default off.
    pub mqtt: Option<MqttNotifyConfig>,
    /// `[notify.alertmanager]`: Prometheus Alertmanager v2; default off.
    pub alertmanager: Option<AlertmanagerConfig>,
    /// `[notify.retry]`: backoff shared by every channel.
    pub retry: RetryConfig,
}

/// One `[[notify.webhook]]`: HTTP POST of the incident JSON, signed with HMAC-SHA256.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Names the channel `webhook:{name}` in the API and metrics. Default `webhook-{index}`,
    /// the index counting `[[notify.webhook]]` tables from 0. Letters, digits, `_`, `-`, `.`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Where to POST, `http://…` or `https://…` (required).
    pub url: String,
    /// For `https://`: a PEM file of the CA certificates to trust instead of the system's
    /// (a private PKI). Default: the system trust store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<std::path::PathBuf>,
    /// HMAC-SHA256 key of `X-Citywatch-Signature` (required, not empty).
    pub secret: String,
    /// Whole-request timeout, connecting included. Default "5s".
    #[serde(default = "default_http_timeout")]
    pub timeout: Duration,
    /// Extra static headers sent with every request, e.g. `Authorization`. Default none.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

// By hand so the secret and header values (often credentials) never reach a log.
impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("secret", &"<redacted>")
            .field("timeout", &self.timeout)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("ca", &self.ca)
            .finish()
    }
}

impl WebhookConfig {
    /// The configured name, or `webhook-{index}`.
    pub fn name_or_default(&self, index: usize) -> String {
        self.name.clone().unwrap_or_else(|| format!("webhook-{index}"))
    }
}

/// `[notify.mqtt]`: incident JSON on one topic, QoS 1, through the gateway's MQTT connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttNotifyConfig {
    /// Default "citywatch/v1/ops/incidents". No wildcards.
    pub topic: String,
    /// Publish retained (the broker keeps the last change for new subscribers). Default false.
    pub retain: bool,
}

impl Default for MqttNotifyConfig {
    fn default() -> Self {
        MqttNotifyConfig { topic: "citywatch/v1/ops/incidents".into(), retain: false }
    }
}

/// `[notify.alertmanager]`: Prometheus Alertmanager, v2 API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertmanagerConfig {
    /// Base URL, `http://host:9093` (required); alerts go to `{url}/api/v2/alerts`.
    pub url: String,
    /// Whole-request timeout. Default "5s".
    #[serde(default = "default_http_timeout")]
    pub timeout: Duration,
    /// Every still-active incident is posted again this often, because Alertmanager resolves an
    /// alert it has not heard of within its `resolve_timeout` (5m by default). Default "1m".
    #[serde(default = "default_resend_every")]
    pub resend_every: Duration,
    /// Base URL of the gateway's dashboard; alerts link to `{generator_url}/#/incidents/{id}`.
    /// Default none (no link).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generator_url: Option<String>,
}

/// `[notify.retry]`: exponential backoff with full jitter between attempts of one change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Longest wait after the first failure. Default "500ms".
    pub initial: Duration,
    /// The wait's ceiling: after a receiver outage of any length, what was queued arrives
    /// within about this long of its return (GB 26875.1 asks ≤ 10 s device → centre). Default "10s".
    pub max: Duration,
    /// A change the receiver refuses (4xx other than 408/429) is dropped, counted as
    /// `rejected`, after this many refusals. Transient failures (timeouts, 5xx, connection
    /// refused) are retried until delivered. Default 10.
    pub give_up_after_attempts: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial: Duration(std::time::Duration::from_millis(500)),
            max: Duration::secs(10),
            give_up_after_attempts: 10,
        }
    }
}

fn default_http_timeout() -> Duration {
    Duration::secs(5)
}

fn default_resend_every() -> Duration {
    Duration::secs(60)
}

/// Headers the webhook sink sets itself; a static header may not replace them.
const RESERVED_HEADERS: &[&str] =
    &["content-type", "content-length", "host", "user-agent", "x-citywatch-signature", "x-citywatch-delivery", "idempotency-key"];

impl NotifyConfig {
    /// Checks what serde cannot; the error names the key (`notify.webhook[1].url`) and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let mut names = HashSet::new();
        for (i, hook) in self.webhook.iter().enumerate() {
            let key = |field: &str| format!("notify.webhook[{i}].{field}");
            let name = hook.name_or_default(i);
            if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) {
                return Err((key("name"), "must be 1 to 64 letters, digits, '_', '-' or '.'".into()));
            }
            if !names.insert(format!("webhook:{name}")) {
                return Err((key("name"), format!("another webhook is already named {name:?}")));
            }
            check_push_url(&hook.url).map_err(|reason| (key("url"), reason))?;
            if hook.secret.is_empty() {
                return Err((key("secret"), "must not be empty: receivers verify X-Citywatch-Signature with it".into()));
            }
            if hook.timeout.0.is_zero() {
                return Err((key("timeout"), "must be more than 0s".into()));
            }
            for (header, value) in &hook.headers {
                let header_key = || key(&format!("headers.{header}"));
                let parsed = reqwest::header::HeaderName::from_bytes(header.as_bytes())
                    .map_err(|_| (header_key(), "is not a valid HTTP header name".to_owned()))?;
                if RESERVED_HEADERS.contains(&parsed.as_str()) {
                    return Err((header_key(), "is set by the gateway itself and cannot be replaced".into()));
                }
                if reqwest::header::HeaderValue::from_str(value).is_err() {
                    return Err((header_key(), "value must be visible ASCII (no control characters)".into()));
                }
            }
        }
        if let Some(mqtt) = &self.mqtt {
            if mqtt.topic.is_empty() || mqtt.topic.contains(['+', '#', '\0']) {
                return Err(("notify.mqtt.topic".into(), "must be a topic name without wildcards".into()));
            }
        }
        if let Some(am) = &self.alertmanager {
            check_push_url(&am.url).map_err(|reason| ("notify.alertmanager.url".to_owned(), reason))?;
            if am.timeout.0.is_zero() {
                return Err(("notify.alertmanager.timeout".into(), "must be more than 0s".into()));
            }
            if am.resend_every.0 < std::time::Duration::from_secs(1) {
                return Err(("notify.alertmanager.resend_every".into(), "must be at least 1s".into()));
            }
            if let Some(link) = &am.generator_url {
                // Only a link shown to people, so https is fine here.
                let ok = reqwest::Url::parse(link).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
                if !ok {
                    return Err(("notify.alertmanager.generator_url".into(), "must be an http:// or https:// URL".into()));
                }
            }
        }
        if self.retry.initial.0.is_zero() {
            return Err(("notify.retry.initial".into(), "must be more than 0s".into()));
        }
        if self.retry.max.0 < self.retry.initial.0 {
            return Err(("notify.retry.max".into(), "must not be less than notify.retry.initial".into()));
        }
        if self.retry.give_up_after_attempts == 0 {
            return Err(("notify.retry.give_up_after_attempts".into(), "must be at least 1".into()));
        }
        Ok(())
    }

    /// Every configured channel's name, in the order [`build_sinks`] builds them:
    /// `webhook:{name}`…, `mqtt`, `alertmanager`.
    pub fn channel_names(&self) -> Vec<Arc<str>> {
        let mut names: Vec<Arc<str>> =
            self.webhook.iter().enumerate().map(|(i, hook)| Arc::from(format!("webhook:{}", hook.name_or_default(i)))).collect();
        if self.mqtt.is_some() {
            names.push(Arc::from("mqtt"));
        }
        if self.alertmanager.is_some() {
            names.push(Arc::from("alertmanager"));
        }
        names
    }
}

/// A receiver URL the HTTP client can reach: `http://` or `https://` with a host.
fn check_push_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("scheme must be http:// or https://, not {}://", parsed.scheme()));
    }
    if !parsed.has_host() {
        return Err("host missing".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// What the API and /metrics see of a channel.

/// Sentinel for "no value" in the `i64` atomics below (milliseconds are never this small).
const NONE_MS: i64 = i64::MIN;

/// One channel's live counters, written by its dispatcher, read by the API and `/metrics`.
#[derive(Debug)]
pub struct ChannelState {
    channel: Arc<str>,
    delivered: AtomicU64,
    attempts_failed: AtomicU64,
    pending: AtomicU64,
    consecutive_failures: AtomicU64,
    last_delivered_ms: AtomicI64,
    oldest_pending_ms: AtomicI64,
    next_retry_ms: AtomicI64,
    /// Drops by reason (rare, so a lock is fine).
    dropped: Mutex<BTreeMap<&'static str, u64>>,
    last_error: Mutex<Option<String>>,
}

/// A snapshot of [`ChannelState`], as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChannelStatus {
    pub channel: String,
    pub delivered: u64,
    /// All drops, every reason.
    pub dropped: u64,
    pub attempts_failed: u64,
    /// Changes queued for this channel, the one being tried included.
    pub pending: u64,
    /// The latest failure, kept after recovery (see `consecutive_failures` for the present).
    pub last_error: Option<String>,
    pub last_delivered_ms: Option<i64>,
    /// `updated_ms` of the change at the head of the queue.
    pub oldest_pending_ms: Option<i64>,
    /// Failed attempts since the last delivery; 0 when healthy.
    pub consecutive_failures: u64,
    /// When the head of the queue is tried again, while backing off.
    pub next_retry_ms: Option<i64>,
}

/// Poisoning only means another thread panicked mid-update of a counter map; the data is
/// still usable, so take it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn load_ms(a: &AtomicI64) -> Option<i64> {
    Some(a.load(Ordering::Relaxed)).filter(|&v| v != NONE_MS)
}

impl ChannelState {
    pub fn new(channel: Arc<str>) -> Arc<Self> {
        Arc::new(ChannelState {
            channel,
            delivered: AtomicU64::new(0),
            attempts_failed: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            consecutive_failures: AtomicU64::new(0),
            last_delivered_ms: AtomicI64::new(NONE_MS),
            oldest_pending_ms: AtomicI64::new(NONE_MS),
            next_retry_ms: AtomicI64::new(NONE_MS),
            dropped: Mutex::new(BTreeMap::new()),
            last_error: Mutex::new(None),
        })
    }

    pub fn channel(&self) -> &Arc<str> {
        &self.channel
    }

    pub fn status(&self) -> ChannelStatus {
        ChannelStatus {
            channel: self.channel.to_string(),
            delivered: self.delivered.load(Ordering::Relaxed),
            dropped: lock(&self.dropped).values().sum(),
            attempts_failed: self.attempts_failed.load(Ordering::Relaxed),
            pending: self.pending.load(Ordering::Relaxed),
            last_error: lock(&self.last_error).clone(),
            last_delivered_ms: load_ms(&self.last_delivered_ms),
            oldest_pending_ms: load_ms(&self.oldest_pending_ms),
            consecutive_failures: self.consecutive_failures.load(Ordering::Relaxed),
            next_retry_ms: load_ms(&self.next_retry_ms),
        }
    }

    /// Drops by reason, every known reason included (0 if none yet).
    pub fn dropped_by_reason(&self) -> BTreeMap<&'static str, u64> {
        let mut out: BTreeMap<&'static str, u64> = drop_reason::ALL.iter().map(|r| (*r, 0)).collect();
        for (reason, n) in lock(&self.dropped).iter() {
            *out.entry(reason).or_default() += n;
        }
        out
    }

    // The dispatcher's side.

    pub(crate) fn set_queue(&self, pending: usize, oldest_updated_ms: Option<i64>) {
        self.pending.store(pending as u64, Ordering::Relaxed);
        self.oldest_pending_ms.store(oldest_updated_ms.unwrap_or(NONE_MS), Ordering::Relaxed);
    }

    /// Returns how many attempts had failed in a row before this delivery.
    pub(crate) fn record_delivered(&self, now_ms: i64) -> u64 {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        self.last_delivered_ms.store(now_ms, Ordering::Relaxed);
        self.next_retry_ms.store(NONE_MS, Ordering::Relaxed);
        self.consecutive_failures.swap(0, Ordering::Relaxed)
    }

    /// Returns the number of consecutive failures, this one included.
    pub(crate) fn record_failure(&self, error: &str) -> u64 {
        self.attempts_failed.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_error) = Some(error.to_owned());
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub(crate) fn record_dropped(&self, reason: &'static str) {
        *lock(&self.dropped).entry(reason).or_default() += 1;
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.next_retry_ms.store(NONE_MS, Ordering::Relaxed);
    }

    pub(crate) fn set_next_retry(&self, at_ms: Option<i64>) {
        self.next_retry_ms.store(at_ms.unwrap_or(NONE_MS), Ordering::Relaxed);
    }
}

/// The push channels' series of `/metrics`, one per channel, read at every scrape (names
/// without `_total`: the encoder adds it to counters).
#[derive(Debug)]
pub struct ChannelMetrics(pub Vec<Arc<ChannelState>>);

impl prometheus_client::collector::Collector for ChannelMetrics {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use crate::metrics::{counter_family, gauge_family};
        let now_ms = now_ms();
        let states = &self.0;
        let per_channel = |f: fn(&ChannelState) -> u64| states.iter().map(move |s| ([("channel", &*s.channel)], f(s)));
        let e = &mut encoder;
        counter_family(e, "citywatch_notify_delivered", "Incident changes delivered, by push channel.", per_channel(|s| s.delivered.load(Ordering::Relaxed)))?;
        let dropped = states.iter().flat_map(|s| s.dropped_by_reason().into_iter().map(move |(reason, n)| ([("channel", &*s.channel), ("reason", reason)], n)));
        counter_family(e, "citywatch_notify_dropped", "Incident changes given up on, by push channel and reason.", dropped)?;
        counter_family(e, "citywatch_notify_failed_attempts", "Delivery attempts that failed, by push channel.", per_channel(|s| s.attempts_failed.load(Ordering::Relaxed)))?;
        gauge_family(e, "citywatch_notify_pending", "Incident changes waiting for a push channel.", per_channel(|s| s.pending.load(Ordering::Relaxed)))?;
        let age = states.iter().map(|s| {
            let age = load_ms(&s.oldest_pending_ms).map_or(0.0, |ms| (now_ms - ms).max(0) as f64 / 1000.0);
            ([("channel", &*s.channel)], age)
        });
        gauge_family(e, "citywatch_notify_oldest_pending_age_seconds", "Age of the oldest change waiting for a push channel (0 when none).", age)
    }
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> i64 {
    crate::ingest::now_ms()
}
