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

use backon::BackoffBuilder as _;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::sink::{DeliveryError, Sink};
use super::{drop_reason, now_ms, ChannelState, RetryConfig};
use crate::incidents::manager::{ChannelQueue, Received};
use crate::incidents::store::IncidentStore;
use crate::model::OutboxItem;

pub use crate::model::Outcome;

/// How often [`Sink::tick`] is called.
const TICK: std::time::Duration = std::time::Duration::from_secs(1);

/// Where outcomes go: `(channel, seq, outcome)`, to the incident manager.
pub type Outcomes = mpsc::Sender<(Arc<str>, i64, Outcome)>;

/// One channel's dispatcher as built, before it runs: the channel's sink and state, its
/// undelivered items from the durable outbox, the retry policy and the outbox to re-read when
/// its queue overflowed (`None`: nothing to re-read, as in tests without a store).
pub struct Dispatcher {
    pub sink: Arc<dyn Sink>,
    pub state: Arc<ChannelState>,
    pub backlog: Vec<OutboxItem>,
    pub retry: RetryConfig,
    pub outbox: Option<Arc<IncidentStore>>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher").field("channel", self.state.channel()).field("backlog", &self.backlog.len()).finish_non_exhaustive()
    }
}

impl Dispatcher {
    /// See [`run`].
    pub async fn run(self, new_items: ChannelQueue, done: Outcomes) {
        run(self, new_items, done).await
    }
}

/// Delivers one channel's items until `new_items` closes (the incident manager stopped: the
/// gateway is shutting down).
///
/// - `backlog` (the channel's undelivered items from the durable outbox) goes first, in `seq`
///   order; an item from `new_items` whose `seq` is not above the highest seen is a copy of one
///   already queued or delivered and is ignored.
/// - When `new_items` overflowed, the manager left items out (they are in the outbox): the
///   dispatcher takes what is queued and re-reads its pending items from `outbox`.
/// - One item at a time, strictly in `seq` order (see the module docs on head-of-line).
/// - A transient failure is retried until delivered, waiting with `backon`'s exponential
///   backoff with jitter, each wait at most `retry.max`; a refusal is retried the same way up to
///   `retry.give_up_after_attempts` times, then the item is dropped as `rejected`.
/// - Every delivered or dropped item is reported on `done` as `(channel, seq, outcome)`.
/// - When `new_items` closes, the current attempt is finished (each is bounded by the sink's
///   timeout) and the loop returns, also out of a backoff wait. What is left stays in the
///   durable outbox for the next start: it is neither dropped nor reported.
pub async fn run(dispatcher: Dispatcher, mut new_items: ChannelQueue, done: Outcomes) {
    let Dispatcher { sink, state, backlog, retry, outbox } = dispatcher;
    let channel = Arc::clone(state.channel());
    let mut queue = Queue::default();
    let mut backlog = backlog;
    backlog.sort_by_key(|item| item.seq);
    for item in backlog {
        queue.accept(item);
    }
    queue.publish(&state);

    let mut backoff = backoff(&retry);
    // Set while backing off: the head is not tried before then.
    let mut retry_at: Option<Instant> = None;
    // Refusals of the head item so far.
    let mut refusals: u32 = 0;
    let mut next_tick = Instant::now() + TICK;

    loop {
        // Take whatever has arrived without waiting, so `pending` is honest even while a long
        // backlog is being delivered back to back.
        loop {
            match new_items.try_recv() {
                Ok(item) => queue.accept(item),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    queue.publish(&state);
                    return;
                }
            }
        }
        if new_items.lagged() {
            catch_up(&mut new_items, &mut queue, outbox.as_ref(), &channel).await;
        }
        queue.publish(&state);

        if Instant::now() >= next_tick {
            next_tick = Instant::now() + TICK;
            // Only re-posts, each bounded by the sink's timeout.
            sink.tick(now_ms()).await;
            continue;
        }

        if let (None, Some(item)) = (retry_at, queue.items.front()) {
            // An attempt, once started, finishes (see `Sink::deliver`).
            let result = sink.deliver(item).await;
            let now = now_ms();
            match result {
                Ok(()) => {
                    let failed_before = state.record_delivered(now);
                    if failed_before > 0 {
                        tracing::info!(%channel, failed_attempts = failed_before, "push channel delivering again");
                    }
                    backoff = self::backoff(&retry);
                    refusals = 0;
                    if let Some(item) = queue.items.pop_front() {
                        report(&done, item, Outcome::Delivered).await;
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
                            backoff = self::backoff(&retry);
                            refusals = 0;
                            if let Some(item) = queue.items.pop_front() {
                                report(&done, item, Outcome::Dropped { reason: drop_reason::REJECTED }).await;
                            }
                            continue;
                        }
                    }
                    let wait = backoff.next().unwrap_or(retry.max.0);
                    retry_at = Some(Instant::now() + wait);
                    state.set_next_retry(Some(now + wait.as_millis() as i64));
                }
            }
            continue;
        }

        tokio::select! {
            received = new_items.recv() => match received {
                Received::Item(item) => queue.accept(item),
                // Caught up at the top of the loop.
                Received::Overflowed => {}
                // The manager stopped: what is left stays in the outbox.
                Received::Closed => break,
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

/// The retry waits: exponential from `retry.initial`, each wait at most `retry.max`. backon's
/// jitter adds up to the current delay again, so the delays run from half of each bound.
fn backoff(retry: &RetryConfig) -> backon::ExponentialBackoff {
    let max = retry.max.0.max(retry.initial.0);
    backon::ExponentialBuilder::new()
        .with_min_delay(retry.initial.0 / 2)
        .with_max_delay(max / 2)
        .with_jitter()
        .without_max_times()
        .build()
}

/// After an overflow: what is queued, then the channel's pending items re-read from the outbox
/// (duplicates of queued or delivered items are dropped by `seq` in [`Queue::accept`]).
async fn catch_up(new_items: &mut ChannelQueue, queue: &mut Queue, outbox: Option<&Arc<IncidentStore>>, channel: &Arc<str>) {
    for item in new_items.catch_up() {
        queue.accept(item);
    }
    let Some(store) = outbox else { return };
    let (store, name) = (Arc::clone(store), Arc::clone(channel));
    match tokio::task::spawn_blocking(move || store.pending(&name)).await {
        Ok(Ok(items)) => {
            tracing::info!(%channel, pending = items.len(), "push channel queue overflowed; backlog re-read from the outbox");
            for item in items {
                queue.accept(item);
            }
        }
        Ok(Err(e)) => {
            tracing::warn!(%channel, error = %e, "outbox not readable; trying again");
            new_items.retry_catch_up();
        }
        Err(e) => {
            tracing::warn!(%channel, error = %e, "outbox read failed; trying again");
            new_items.retry_catch_up();
        }
    }
}

/// The outbox marks the item; if it has gone (the gateway is stopping), the item stays
/// unmarked and is sent again next start, which receivers de-duplicate by `id` + `revision`.
/// Waits while the manager's outcome queue is full (it pushes back; nothing is dropped).
async fn report(done: &Outcomes, item: OutboxItem, outcome: Outcome) {
    let _ = done.send((item.channel, item.seq, outcome)).await;
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
        let mut waits = backoff(&retry);
        let ceilings = [100, 200, 400, 800, 1000, 1000, 1000];
        for ceiling in ceilings {
            let wait = waits.next().expect("retries forever");
            assert!(wait <= std::time::Duration::from_millis(ceiling), "{wait:?} > {ceiling} ms");
            assert!(wait >= std::time::Duration::from_millis(ceiling / 2), "{wait:?} < {ceiling}/2 ms");
        }
        assert!(backoff(&retry).next().expect("first wait") <= std::time::Duration::from_millis(100));
    }
}
