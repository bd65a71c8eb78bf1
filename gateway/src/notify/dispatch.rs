//! The per-channel dispatcher: takes one channel's outbox items in `seq` order, hands them to
//! the channel's [`Sink`] one at a time, retries with backoff, and reports each outcome back
//! to the outbox. It decides when to try; the sinks decide how to send.
//!
//! Ordering is head-of-line on purpose: while the oldest item fails, nothing after it on the
//! same channel is tried. That is what keeps every incident's revisions in order at the
//! receiver (revision 3 never arrives before revision 2), at the price of one failing change
//! holding up the rest of its channel until it is delivered or, if refused, given up on.
//! Channels are independent: a webhook that is down does not hold up MQTT.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::sink::{DeliveryError, Sink};
use super::{drop_reason, now_ms, ChannelState, RetryConfig};
use crate::model::OutboxItem;

pub use crate::model::Outcome;

/// How often [`Sink::tick`] is called.
const TICK: std::time::Duration = std::time::Duration::from_secs(1);

/// One channel's dispatcher as built, before it runs: the channel's sink and state, its
/// undelivered items from the durable outbox, and the retry policy.
pub struct Dispatcher {
    pub sink: Arc<dyn Sink>,
    pub state: Arc<ChannelState>,
    pub backlog: Vec<OutboxItem>,
    pub retry: RetryConfig,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher").field("channel", self.state.channel()).field("backlog", &self.backlog.len()).finish_non_exhaustive()
    }
}

impl Dispatcher {
    /// See [`run`].
    pub async fn run(self, new_items: mpsc::UnboundedReceiver<OutboxItem>, done: mpsc::UnboundedSender<(Arc<str>, i64, Outcome)>, shutdown: watch::Receiver<bool>) {
        run(self, new_items, done, shutdown).await
    }
}

/// Delivers one channel's items until `shutdown` turns true (or its sender goes away), or
/// until `new_items` is closed and everything queued is delivered.
///
/// - `backlog` (the channel's undelivered items from the durable outbox) goes first, in `seq`
///   order; an item from `new_items` whose `seq` is not above the highest seen is a copy of one
///   already queued or delivered and is ignored.
/// - One item at a time, strictly in `seq` order (see the module docs on head-of-line).
/// - A transient failure is retried until delivered, waiting with exponential backoff and full
///   jitter between `retry.initial` and `retry.max`; a refusal is retried the same way up to
///   `retry.give_up_after_attempts` times, then the item is dropped as `rejected`.
/// - Every delivered or dropped item is reported on `done` as `(channel, seq, outcome)`.
/// - On shutdown the current attempt is finished (each is bounded by the sink's timeout) and
///   the loop returns, also out of a backoff wait. What is left stays in the durable outbox
///   for the next start: it is neither dropped nor reported.
///
/// Input: `new_items` from the outbox; output: `done`; and the shutdown signal.
pub async fn run(
    dispatcher: Dispatcher,
    mut new_items: mpsc::UnboundedReceiver<OutboxItem>,
    done: mpsc::UnboundedSender<(Arc<str>, i64, Outcome)>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Dispatcher { sink, state, backlog, retry } = dispatcher;
    let channel = Arc::clone(state.channel());
    let mut queue = Queue::default();
    let mut backlog = backlog;
    backlog.sort_by_key(|item| item.seq);
    for item in backlog {
        queue.accept(item);
    }
    queue.publish(&state);

    let mut inbox_open = true;
    let mut backoff = Backoff::new(&retry);
    // Set while backing off: the head is not tried before then.
    let mut retry_at: Option<Instant> = None;
    // Refusals of the head item so far.
    let mut refusals: u32 = 0;
    let mut next_tick = Instant::now() + TICK;

    loop {
        if *shutdown.borrow() {
            break;
        }
        // Take whatever has arrived without waiting, so `pending` is honest even while a long
        // backlog is being delivered back to back.
        while inbox_open {
            match new_items.try_recv() {
                Ok(item) => queue.accept(item),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => inbox_open = false,
            }
        }
        queue.publish(&state);

        if Instant::now() >= next_tick {
            next_tick = Instant::now() + TICK;
            // Only re-posts; safe to abandon midway when stopping.
            tokio::select! {
                () = sink.tick(now_ms()) => {}
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
            continue;
        }

        if let (None, Some(item)) = (retry_at, queue.items.front()) {
            // Not raced with shutdown: an attempt, once started, finishes (see `Sink::deliver`).
            let result = sink.deliver(item).await;
            let now = now_ms();
            match result {
                Ok(()) => {
                    let failed_before = state.record_delivered(now);
                    if failed_before > 0 {
                        tracing::info!(%channel, failed_attempts = failed_before, "push channel delivering again");
                    }
                    backoff.reset();
                    refusals = 0;
                    if let Some(item) = queue.items.pop_front() {
                        report(&done, item, Outcome::Delivered);
                    }
                }
                Err(error) => {
                    let message = error.to_string();
                    let failures = state.record_failure(&message);
                    if failures == 1 {
                        tracing::warn!(%channel, seq = item.seq, error = %message, "push channel failing; retrying with backoff");
                    }
                    if matches!(error, DeliveryError::Permanent(_)) {
                        refusals += 1;
                        if refusals >= retry.give_up_after_attempts {
                            tracing::warn!(
                                %channel,
                                seq = item.seq,
                                incident = %item.incident.id,
                                revision = item.incident.revision,
                                attempts = refusals,
                                error = %message,
                                "push channel receiver refused an incident change; dropped it"
                            );
                            state.record_dropped(drop_reason::REJECTED);
                            backoff.reset();
                            refusals = 0;
                            if let Some(item) = queue.items.pop_front() {
                                report(&done, item, Outcome::Dropped { reason: drop_reason::REJECTED });
                            }
                            continue;
                        }
                    }
                    let wait = backoff.next_wait();
                    retry_at = Some(Instant::now() + wait);
                    state.set_next_retry(Some(now + wait.as_millis() as i64));
                }
            }
            continue;
        }

        if !inbox_open && queue.items.is_empty() {
            break;
        }
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => break,
            received = new_items.recv(), if inbox_open => match received {
                Some(item) => queue.accept(item),
                None => inbox_open = false,
            },
            () = sleep_until_some(retry_at) => {
                retry_at = None;
                state.set_next_retry(None);
            }
            () = tokio::time::sleep_until(next_tick) => {}
        }
    }
    queue.publish(&state);
}

/// The outbox marks the item; if it has gone (the gateway is stopping), the item stays
/// unmarked and is sent again next start, which receivers de-duplicate by `id` + `revision`.
fn report(done: &mpsc::UnboundedSender<(Arc<str>, i64, Outcome)>, item: OutboxItem, outcome: Outcome) {
    let _ = done.send((item.channel, item.seq, outcome));
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// This channel's items not yet delivered, in `seq` order.
#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<OutboxItem>,
    /// Highest `seq` ever queued.
    last_seq: Option<i64>,
}

impl Queue {
    fn accept(&mut self, item: OutboxItem) {
        if self.last_seq.is_some_and(|last| item.seq <= last) {
            tracing::trace!(seq = item.seq, "already queued or delivered; ignored");
            return;
        }
        self.last_seq = Some(item.seq);
        self.items.push_back(item);
    }

    /// The oldest pending change is the head's: `seq` is commit order.
    fn publish(&self, state: &ChannelState) {
        state.set_queue(self.items.len(), self.items.front().map(|item| item.incident.updated_ms));
    }
}

/// Exponential backoff with full jitter: the n-th wait is uniform in `[0, min(max, initial·2ⁿ⁻¹)]`.
#[derive(Debug)]
struct Backoff {
    initial: std::time::Duration,
    max: std::time::Duration,
    failures: u32,
}

impl Backoff {
    fn new(retry: &RetryConfig) -> Backoff {
        Backoff { initial: retry.initial.0, max: retry.max.0.max(retry.initial.0), failures: 0 }
    }

    fn reset(&mut self) {
        self.failures = 0;
    }

    fn next_wait(&mut self) -> std::time::Duration {
        let ceiling = self.initial.saturating_mul(1u32 << self.failures.min(31)).min(self.max);
        self.failures = self.failures.saturating_add(1);
        jitter(ceiling)
    }
}

/// Uniform in `[0, ceiling]`. Spreading retries is all it is for, so std's randomly keyed
/// hasher is random enough and spares a dependency.
fn jitter(ceiling: std::time::Duration) -> std::time::Duration {
    use std::hash::{BuildHasher, Hasher};
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    std::time::Duration::from_nanos(hasher.finish() % nanos.saturating_add(1))
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn backoff_grows_to_max_and_stays_within_it() {
        let retry = RetryConfig {
            initial: crate::units::Duration(std::time::Duration::from_millis(100)),
            max: crate::units::Duration(std::time::Duration::from_millis(1000)),
            give_up_after_attempts: 3,
        };
        let mut backoff = Backoff::new(&retry);
        let ceilings = [100, 200, 400, 800, 1000, 1000, 1000];
        for ceiling in ceilings {
            let wait = backoff.next_wait();
            assert!(wait <= std::time::Duration::from_millis(ceiling), "{wait:?} > {ceiling} ms");
        }
        backoff.reset();
        assert!(backoff.next_wait() <= std::time::Duration::from_millis(100));
    }
}
