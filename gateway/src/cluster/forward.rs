//! Asking a partition's owner: NATS request-reply on `citywatch.api.{partition}`, so any gateway
//! can answer an API request that only the owner of a site's partition can (its devices, an
//! operator's transition of its incidents).
//!
//! Every gateway subscribes to `citywatch.api.*` and answers a request only while it holds the
//! partition's lease ([`super::LeaseTable::holds`]); the others stay silent. So a request is
//! answered by the lease holder alone, and when nobody holds the lease (a failover in progress)
//! or the holder does not answer within [`FORWARD_TIMEOUT`], the asker gets [`Error::NoOwner`].
//! The request is an HTTP request in NATS clothes (method, path and query, caller, body); what it
//! means and how it is answered is the API's business ([`AnswerFn`]), not this module's.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::StreamExt as _;
use tokio::sync::watch;

use super::LeaseTable;

/// Subject prefix of the per-partition API: `citywatch.api.{partition}`.
pub const API_PREFIX: &str = "citywatch.api";

/// How long an asker waits for the owner's answer. A failover takes up to the lease TTL; the
/// caller is told to try again rather than held longer.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

const METHOD: &str = "Citywatch-Method";
const URI: &str = "Citywatch-Uri";
const CONTENT_TYPE: &str = "Citywatch-Content-Type";
const CALLER: &str = "Citywatch-Caller";
const ROLE: &str = "Citywatch-Role";
const STATUS: &str = "Citywatch-Status";

/// An API request for the owner of one partition.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Forwarded {
    pub method: String,
    /// Path and query, e.g. `/api/v1/devices?site=s1`.
    pub uri: String,
    pub content_type: Option<String>,
    /// The token the asker authenticated, and its role (the owner records the actor by it).
    pub caller: Option<(String, String)>,
    pub body: Bytes,
}

/// The owner's answer: an HTTP status and its (JSON) body.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

/// Serves a forwarded request for a partition this gateway holds.
pub type AnswerFn = Arc<dyn Fn(u16, Forwarded) -> BoxFuture<'static, Answer> + Send + Sync>;

/// Why a forwarded request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no gateway answers for partition {partition} right now (no lease holder, or it did not answer within {FORWARD_TIMEOUT:?}); try again in a few seconds")]
    NoOwner { partition: u16 },
    #[error("asking the owner of partition {partition}: {reason}")]
    Transport { partition: u16, reason: String },
}

/// Asks partition owners.
#[derive(Debug, Clone)]
pub struct Forwarder {
    client: async_nats::Client,
}

impl Forwarder {
    pub fn new(client: async_nats::Client) -> Forwarder {
        Forwarder { client }
    }

    /// The answer of `partition`'s lease holder.
    pub async fn ask(&self, partition: u16, request: &Forwarded) -> Result<Answer, Error> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(METHOD, request.method.as_str());
        headers.insert(URI, request.uri.as_str());
        if let Some(ct) = &request.content_type {
            headers.insert(CONTENT_TYPE, ct.as_str());
        }
        if let Some((name, role)) = &request.caller {
            headers.insert(CALLER, name.as_str());
            headers.insert(ROLE, role.as_str());
        }
        let nats_request = async_nats::Request::new().headers(headers).payload(request.body.clone()).timeout(Some(FORWARD_TIMEOUT));
        match self.client.send_request(format!("{API_PREFIX}.{partition}"), nats_request).await {
            Ok(message) => {
                let status = message.headers.as_ref().and_then(|h| h.get(STATUS)).and_then(|v| v.as_str().parse().ok());
                let status = status.ok_or_else(|| Error::Transport { partition, reason: "the answer has no status".into() })?;
                Ok(Answer { status, body: message.payload })
            }
            Err(e) => match e.kind() {
                async_nats::client::RequestErrorKind::TimedOut | async_nats::client::RequestErrorKind::NoResponders => Err(Error::NoOwner { partition }),
                async_nats::client::RequestErrorKind::Other => Err(Error::Transport { partition, reason: e.to_string() }),
            },
        }
    }
}

/// Answers `citywatch.api.{p}` for every partition this gateway holds, until `stop`. Each request
/// runs in its own task: a slow answer holds up no other.
pub async fn answer(client: async_nats::Client, leases: Arc<LeaseTable>, answer: AnswerFn, mut stop: watch::Receiver<bool>) -> Result<(), String> {
    let mut requests = client.subscribe(format!("{API_PREFIX}.*")).await.map_err(|e| format!("subscribing to {API_PREFIX}.*: {e}"))?;
    loop {
        let message = tokio::select! {
            m = requests.next() => match m {
                Some(m) => m,
                None => return Err("the API subscription ended".into()),
            },
            _ = stop.wait_for(|s| *s) => return Ok(()),
        };
        let Some(partition) = message.subject.as_str().rsplit('.').next().and_then(|p| p.parse::<u16>().ok()) else { continue };
        // Not ours: the holder answers (or nobody, and the asker times out).
        if !leases.holds(partition) {
            continue;
        }
        let Some(reply) = message.reply.clone() else { continue };
        let header = |name: &str| message.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_owned());
        let request = Forwarded {
            method: header(METHOD).unwrap_or_else(|| "GET".into()),
            uri: header(URI).unwrap_or_default(),
            content_type: header(CONTENT_TYPE),
            caller: header(CALLER).zip(header(ROLE)),
            body: message.payload.clone(),
        };
        let (client, answer) = (client.clone(), Arc::clone(&answer));
        tokio::spawn(async move {
            let Answer { status, body } = answer(partition, request).await;
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(STATUS, status.to_string().as_str());
            if let Err(e) = client.publish_with_headers(reply, headers, body).await {
                tracing::debug!(partition, error = %e, "cluster: sending a forwarded request's answer failed");
            }
        });
    }
}
