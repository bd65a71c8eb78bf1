//! Webhook channel: the incident JSON, byte for byte as the outbox stored it, POSTed and signed
//! with HMAC-SHA256 so the receiver can check it came from this gateway.
//!
//! Also the HTTP plumbing the Alertmanager channel shares: one client per channel, no
//! redirects, and which HTTP outcomes are worth retrying.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use hmac::{Hmac, KeyInit, Mac};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use sha2::Sha256;

use super::dispatch::{DeliveryError, Sink};
use super::{Error, Result, WebhookConfig};
use crate::incidents::OutboxItem;

/// `sha256=` and the lowercase hex HMAC-SHA256 of `body` under `secret`: the value of
/// `X-Citywatch-Signature`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length (long keys are hashed, short ones padded), so
    // `new_from_slice` cannot fail here.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Delivers to one `[[notify.webhook]]`.
pub struct WebhookSink {
    channel: Arc<str>,
    url: reqwest::Url,
    secret: Vec<u8>,
    headers: HeaderMap,
    client: reqwest::Client,
}

// By hand: the secret and the static headers (often credentials) stay out of logs.
impl std::fmt::Debug for WebhookSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSink").field("channel", &self.channel).field("url", &self.url.as_str()).finish_non_exhaustive()
    }
}

impl WebhookSink {
    /// `config` must have passed [`super::NotifyConfig::validate`]; what it checked is checked
    /// again here as an error, never a panic.
    pub fn new(channel: Arc<str>, config: &WebhookConfig) -> Result<WebhookSink> {
        let invalid = |field: &str, reason: String| Error::Invalid { key: format!("{channel}.{field}"), reason };
        let url = reqwest::Url::parse(&config.url).map_err(|e| invalid("url", e.to_string()))?;
        let mut headers = HeaderMap::new();
        for (name, value) in &config.headers {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| invalid("headers", e.to_string()))?;
            let mut value = HeaderValue::from_str(value).map_err(|e| invalid("headers", e.to_string()))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let ca = config.ca.as_deref().map(load_ca).transpose().map_err(|reason| invalid("ca", reason))?;
        let client = http_client(&url, config.timeout.0, ca).map_err(|source| Error::HttpClient { channel: channel.to_string(), source })?;
        Ok(WebhookSink { channel, url, secret: config.secret.as_bytes().to_vec(), headers, client })
    }
}

impl Sink for WebhookSink {
    fn deliver<'a>(&'a self, item: &'a OutboxItem) -> BoxFuture<'a, Result<(), DeliveryError>> {
        Box::pin(async move {
            let key = item.idempotency_key();
            // The id comes from the gateway ("inc-…"); should it ever not fit a header, no retry
            // can fix that.
            let key = HeaderValue::from_str(&key).map_err(|_| DeliveryError::Permanent(format!("{key:?} is not a header value")))?;
            let body = item.body.as_bytes().to_vec();
            let request = self
                .client
                .post(self.url.clone())
                .headers(self.headers.clone())
                .header(CONTENT_TYPE, "application/json")
                .header("x-citywatch-signature", sign(&self.secret, &body))
                .header("idempotency-key", key.clone())
                .header("x-citywatch-delivery", key)
                .body(body);
            send(request).await
        })
    }
}

/// `User-Agent` of every push request.
pub(crate) fn user_agent() -> String {
    format!("citywatch/{}", env!("CARGO_PKG_VERSION"))
}

/// One client per channel (and for the InfluxDB sink): `timeout` bounds each whole attempt
/// (connect, send, response), so a task asked to stop never waits longer than that. Redirects
/// are not followed: a POST redirected is a misconfigured URL, reported as a refusal rather
/// than silently re-sent. TLS is rustls with the ring provider (installed as the process
/// default, since reqwest is built without a provider of its own so that aws-lc stays out).
/// `https://` trusts `ca` when given, else the system trust store; plain `http://` loads no
/// trust store at all (so a machine without CA certificates can still push over http).
pub(crate) fn http_client(url: &reqwest::Url, timeout: std::time::Duration, ca: Option<Vec<reqwest::Certificate>>) -> reqwest::Result<reqwest::Client> {
    // Err only when a provider is installed already; every provider here is ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(user_agent());
    let builder = match (url.scheme(), ca) {
        ("https", None) => builder,
        ("https", Some(certs)) => builder.tls_certs_only(certs),
        _ => builder.tls_certs_only(Vec::new()),
    };
    builder.build()
}

/// The certificates of a PEM bundle (`ca` of a webhook).
fn load_ca(path: &std::path::Path) -> std::result::Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no CERTIFICATE in the file", path.display()));
    }
    Ok(certs)
}

/// How much of a refusing response's body goes into the error (receivers often say why).
const ERROR_BODY_BYTES: usize = 200;
/// How much of any response body is read before the connection is given back or closed.
const DRAIN_BODY_BYTES: usize = 64 * 1024;

/// Sends and classifies: 2xx delivered; 408, 429, 5xx and anything that kept a response from
/// arriving (refused, reset, timeout) transient; every other status permanent.
pub(crate) async fn send(request: reqwest::RequestBuilder) -> Result<(), DeliveryError> {
    let mut response = match request.send().await {
        Ok(response) => response,
        Err(e) if e.is_builder() => return Err(DeliveryError::Permanent(error_chain(&e.without_url()))),
        Err(e) => return Err(DeliveryError::Transient(error_chain(&e.without_url()))),
    };
    let status = response.status();
    // Read (a bounded part of) the body so the connection can be reused, and keep the start
    // of it for the error message.
    let mut head = Vec::new();
    let mut read = 0;
    while read < DRAIN_BODY_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                read += chunk.len();
                if head.len() < ERROR_BODY_BYTES {
                    head.extend_from_slice(&chunk[..chunk.len().min(ERROR_BODY_BYTES - head.len())]);
                }
            }
            // The status is what counts; a body cut short does not change it.
            Ok(None) | Err(_) => break,
        }
    }
    if status.is_success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&head);
    let text = text.trim();
    let message = if text.is_empty() { format!("HTTP {status}") } else { format!("HTTP {status}: {text}") };
    if status == reqwest::StatusCode::REQUEST_TIMEOUT || status == reqwest::StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        Err(DeliveryError::Transient(message))
    } else {
        Err(DeliveryError::Permanent(message))
    }
}

/// An error and its causes on one line: reqwest's own message alone ("error sending request")
/// does not say whether the connection was refused or timed out.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
