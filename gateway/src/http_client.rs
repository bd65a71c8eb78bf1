//! The one HTTP client setup every outgoing request uses (push channels, the InfluxDB sink,
//! the inventory import CLI), how a response is classified, and error text with its causes.
//! A leaf module: imports only the `model` vocabulary.

use crate::model::DeliveryError;

/// `User-Agent` of every push request.
pub fn user_agent() -> String {
    format!("citywatch/{}", env!("CARGO_PKG_VERSION"))
}

/// One client per channel (and for the InfluxDB sink): `timeout` bounds each whole attempt
/// (connect, send, response), so a task asked to stop never waits longer than that. Redirects
/// are not followed: a POST redirected is a misconfigured URL, reported as a refusal rather
/// than silently re-sent. TLS is rustls with the ring provider (installed as the process
/// default, since reqwest is built without a provider of its own so that aws-lc stays out).
/// `https://` trusts `ca` when given, else the system trust store; plain `http://` loads no
/// trust store at all (so a machine without CA certificates can still push over http).
pub fn build(url: &reqwest::Url, timeout: std::time::Duration, ca: Option<Vec<reqwest::Certificate>>) -> reqwest::Result<reqwest::Client> {
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

/// How much of a refusing response's body goes into the error (receivers often say why).
const ERROR_BODY_BYTES: usize = 200;
/// How much of any response body is read before the connection is given back or closed.
const DRAIN_BODY_BYTES: usize = 64 * 1024;

/// Sends and classifies: 2xx delivered; 408, 429, 5xx and anything that kept a response from
/// arriving (refused, reset, timeout) transient; every other status permanent.
pub async fn send(request: reqwest::RequestBuilder) -> Result<(), DeliveryError> {
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
pub fn error_chain(error: &dyn std::error::Error) -> String {
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
