//! Reading a partition's recent past back on takeover: the messages of the partition the
//! ingest stream stored since now − `[cluster] replay_window`, up to the partition consumer's
//! ack floor (what the previous owner had taken in; everything after it the consumer delivers
//! anyway), so the new owner's rule engine rebuilds its windows from them (fed as
//! [`crate::ingest::Origin::Replayed`]: evaluated at their own time, not stored, counted nor
//! acknowledged again — see `decode` for that and the incident book for what their signals may
//! change).
//!
//! Read without a consumer, like the rest of a takeover ([`super::adopt`]): batched direct gets
//! (`$JS.API.DIRECT.GET.{stream}` with `batch`, `next_by_subj` and `start_time`, nats-server ≥
//! 2.11; answered by any replica, a batch ending with a `204 EOB` status), since a consumer's
//! creation goes through the meta leader, which right after a NATS node died did not answer for
//! 10–60 s. async-nats 0.46 has no call for a batched get, so the request is written here (its
//! single-message direct gets would cost one round trip per message). Bounded: each batch within
//! the worker's call limit, the whole read by a deadline, and at most [`MAX_MESSAGES`] (the
//! newest are kept); a replay cut short is logged, and the partition is consumed anyway.
//!
//! The same reads serve a catch-up ([`Start::Seq`]): what a consumer delivered after its ack
//! floor and nobody acknowledged, read back in stream order before the consumer's next pull
//! (see `ownership` and `relay`).
//!
//! Not here: the ack floor (the partition's worker asks its consumer) and the messages' fate.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use async_nats::jetstream::message::StreamMessage;
use futures_util::StreamExt as _;

/// Messages asked for per batched get.
const BATCH: usize = 256;
/// The most messages one takeover replays; past it the oldest are dropped.
pub const MAX_MESSAGES: usize = 20_000;
/// The status a batched direct get ends each batch with (`EOB`).
const END_OF_BATCH: u16 = 204;

/// Where a [`read`] begins.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    /// At the first message stored at or after this time (ms since the epoch); past
    /// [`MAX_MESSAGES`] the oldest are dropped (a replay wants the newest).
    At(i64),
    /// At this stream sequence; the read stops at [`MAX_MESSAGES`] (a catch-up wants them in
    /// order from the first).
    Seq(u64),
}

/// What [`read`] found: the messages in stream order, and how far it got.
#[derive(Debug, Default)]
pub struct Window {
    pub messages: VecDeque<StreamMessage>,
    /// Older messages of the window left out to stay within [`MAX_MESSAGES`] ([`Start::At`]).
    pub dropped: usize,
    /// The read stopped at the deadline (or at [`MAX_MESSAGES`], [`Start::Seq`]) before
    /// `up_to_seq`: the newest part is missing.
    pub cut_short: bool,
}

/// The messages of `stream` on `filter` from `start` with a sequence up to `up_to_seq`, oldest
/// first; each batch within `limit`, none started after `deadline`.
pub async fn read(client: &async_nats::Client, stream: &str, filter: &str, start: Start, up_to_seq: u64, limit: Duration, deadline: Instant) -> Result<Window, String> {
    let mut window = Window::default();
    // The first batch asks by time or by sequence, every later one by the sequence after the
    // last message read.
    let (start_time, mut next_seq) = match start {
        Start::At(ms) => (Some(format!("{:.3}", jiff::Timestamp::from_millisecond(ms).map_err(|_| format!("no time for {ms} ms"))?)), None),
        Start::Seq(seq) => (None, Some(seq)),
    };
    loop {
        if Instant::now() >= deadline {
            window.cut_short = true;
            return Ok(window);
        }
        let mut request = serde_json::json!({ "batch": BATCH, "next_by_subj": filter });
        match next_seq {
            Some(seq) => request["seq"] = seq.into(),
            None => request["start_time"] = start_time.clone().into(),
        }
        let batch = tokio::time::timeout(limit, one_batch(client, stream, request.to_string())).await.map_err(|_| format!("no batch within {limit:?}"))??;
        let full = batch.len() >= BATCH;
        for message in batch {
            if message.sequence > up_to_seq {
                return Ok(window);
            }
            next_seq = Some(message.sequence + 1);
            if matches!(start, Start::Seq(_)) && window.messages.len() >= MAX_MESSAGES {
                window.cut_short = true;
                return Ok(window);
            }
            window.messages.push_back(message);
            if window.messages.len() > MAX_MESSAGES {
                window.messages.pop_front();
                window.dropped += 1;
            }
        }
        if !full || next_seq.is_some_and(|s| s > up_to_seq) {
            return Ok(window);
        }
    }
}

/// One batched direct get: the messages up to the batch's end (`204 EOB`); none when nothing
/// matches (`404`).
async fn one_batch(client: &async_nats::Client, stream: &str, request: String) -> Result<Vec<StreamMessage>, String> {
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await.map_err(|e| e.to_string())?;
    client.publish_with_reply(format!("$JS.API.DIRECT.GET.{stream}"), inbox, request.into()).await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    while let Some(answer) = answers.next().await {
        match answer.status.map(|s| s.as_u16()) {
            None => out.push(StreamMessage::try_from(answer).map_err(|e| format!("a replayed message: {e}"))?),
            Some(END_OF_BATCH) => break,
            Some(404) => break,
            Some(code) => return Err(format!("direct get answered {code} {}", answer.description.unwrap_or_default())),
        }
    }
    let _ = answers.unsubscribe().await;
    Ok(out)
}
