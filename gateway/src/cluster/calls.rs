//! Bounded calls to JetStream: how long one call of cluster mode may wait, running a batch of
//! calls together, and the waits between retries.
//!
//! The client's own request timeout (15 s, set for stream creation) is many lease TTLs. When a
//! NATS node dies, a call to a stream or consumer whose leader died with it waits for the new
//! leader (RAFT, seconds) or for that timeout; left unbounded, one such call held a whole lease
//! round, or a partition's takeover, behind it. So every call on a path that must get through
//! while the cluster heals is bounded here and tried again. Not here: what the calls do.

use std::time::Duration;

/// The longest one JetStream call of the lease loop may wait: a quarter of the lease TTL (at
/// least 250 ms). With every call bounded, a round (renewals, announcement and listing
/// together; then releases and lease reads together; then takes together) ends within three
/// quarters of a TTL, so a lease renewed at its start is renewed again before it runs out.
pub fn call_timeout(ttl: Duration) -> Duration {
    (ttl / 4).max(Duration::from_millis(250))
}

/// The longest one JetStream call of a partition's worker (takeover reads, consumer set-up)
/// or of a push channel may wait before it is tried again: a lease TTL, at least 2 s. Longer
/// than the lease loop's, since these calls may carry a partition's whole subject list; short
/// enough that a call to a leader that died is given up well within a takeover.
pub fn worker_call_timeout(ttl: Duration) -> Duration {
    ttl.max(Duration::from_secs(2))
}

/// How often one read of a takeover is tried (each bounded) before the whole step is retried.
pub const READ_ATTEMPTS: usize = 3;

/// `call` within `limit`; its error, or the timeout, as text.
pub async fn bounded<T, E: std::fmt::Display>(limit: Duration, call: impl std::future::Future<Output = Result<T, E>>) -> Result<T, String> {
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {limit:?}")),
    }
}

/// `call` for every item at once, each within `limit`; the answers in the items' order.
pub async fn bounded_each<'a, I, T, E, F, Fut>(limit: Duration, items: impl IntoIterator<Item = I>, call: F) -> Vec<Result<T, String>>
where
    E: std::fmt::Display,
    F: Fn(I) -> Fut,
    Fut: std::future::Future<Output = Result<T, E>> + 'a,
{
    futures_util::future::join_all(items.into_iter().map(|item| bounded(limit, call(item)))).await
}

/// `call`, each attempt within `limit`, up to `attempts` times with [`waits`] between them;
/// the last error if none answered.
pub async fn retried<T, E, F, Fut>(limit: Duration, attempts: usize, mut call: F) -> Result<T, String>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut waits = waits();
    let mut attempt = 1;
    loop {
        match bounded(limit, call()).await {
            Ok(v) => return Ok(v),
            Err(e) if attempt >= attempts.max(1) => return Err(e),
            Err(_) => {
                attempt += 1;
                tokio::time::sleep(waits.next().unwrap_or(MAX_WAIT)).await;
            }
        }
    }
}

/// The first wait before a retry.
const FIRST_WAIT: Duration = Duration::from_millis(200);
/// The longest wait between retries.
const MAX_WAIT: Duration = Duration::from_secs(2);

/// The waits between retries of a step that must get through (a partition's takeover, the
/// city's incident view): 200 ms, doubling, at most 2 s — retried soon, since a new RAFT
/// leader is usually there within seconds, and without hammering a cluster that is down.
pub fn waits() -> impl Iterator<Item = Duration> {
    std::iter::successors(Some(FIRST_WAIT), |w| Some((*w * 2).min(MAX_WAIT)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap() {
        let w: Vec<u64> = waits().take(6).map(|d| d.as_millis() as u64).collect();
        assert_eq!(w, [200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(call_timeout(Duration::from_secs(3)), Duration::from_millis(750));
        assert_eq!(call_timeout(Duration::from_millis(400)), Duration::from_millis(250));
        assert_eq!(worker_call_timeout(Duration::from_secs(1)), Duration::from_secs(2));
        assert_eq!(worker_call_timeout(Duration::from_secs(30)), Duration::from_secs(30));
    }

    /// A pending call never answers, so the outcome does not hang on the machine's speed.
    #[tokio::test]
    async fn a_call_that_does_not_answer_is_given_up_and_tried_again() {
        let mut tries = 0;
        let answer = retried(Duration::from_millis(20), 3, || {
            tries += 1;
            let hang = tries < 3;
            async move {
                if hang {
                    std::future::pending::<()>().await;
                }
                Ok::<_, String>(tries)
            }
        })
        .await;
        assert_eq!(answer, Ok(3));
        let failed = retried(Duration::from_millis(10), 2, || async { Err::<(), _>("refused") }).await;
        assert_eq!(failed, Err("refused".to_owned()));
        let each = bounded_each(Duration::from_millis(10), [1, 2], |n| async move { if n == 1 { Ok::<_, String>(n) } else { std::future::pending().await } }).await;
        assert_eq!(each, vec![Ok(1), Err("no answer within 10ms".to_owned())]);
    }
}
