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

use super::sink::{DeliveryError, Sink};
use super::{Error, Result, WebhookConfig};
use crate::http_client::{build as http_client, send};
use crate::model::OutboxItem;

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

/// The certificates of a PEM bundle (`ca` of a webhook).
fn load_ca(path: &std::path::Path) -> std::result::Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no CERTIFICATE in the file", path.display()));
    }
    Ok(certs)
}
