//! Store-and-forward: messages a device could not send while its link was down.
//!
//! A fixed-capacity ring, no heap. When it is full the oldest message is dropped and counted,
//! so the newest state always gets through. Messages keep their original `seq` and `ts`; the
//! device loop replays them in order before anything new. Not a persistent store: a power
//! cycle empties it.

use heapless::Deque;

use crate::wire::Uplink;

/// The ring of unsent messages, capacity `N`.
#[derive(Debug)]
pub struct StoreAndForward<const N: usize> {
    queue: Deque<Uplink, N>,
    dropped: u32,
}

impl<const N: usize> Default for StoreAndForward<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> StoreAndForward<N> {
    pub const fn new() -> Self {
        StoreAndForward { queue: Deque::new(), dropped: 0 }
    }

    /// Keeps `message`; when full, evicts and returns the oldest (already counted as dropped).
    pub fn push(&mut self, message: Uplink) -> Option<Uplink> {
        let evicted = if self.queue.is_full() {
            self.dropped = self.dropped.wrapping_add(1);
            self.queue.pop_front()
        } else {
            None
        };
        // Invariant: there is room, the branch above made some when the ring was full.
        let _ = self.queue.push_back(message);
        evicted
    }

    /// The oldest message, to replay next.
    pub fn front(&self) -> Option<&Uplink> {
        self.queue.front()
    }

    /// Removes the oldest message once it has been handed to the transport.
    pub fn pop_front(&mut self) -> Option<Uplink> {
        self.queue.pop_front()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub const fn capacity(&self) -> usize {
        N
    }

    /// Messages evicted because the ring was full, since boot (wraps).
    pub fn dropped(&self) -> u32 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Event, EventKind};

    fn event(seq: u32) -> Uplink {
        Uplink::Event(Event::new(seq, Some(1_000 + u64::from(seq)), EventKind::Tamper))
    }

    #[test]
    fn keeps_order_and_drops_the_oldest_when_full() {
        let mut ring = StoreAndForward::<3>::new();
        for seq in 0..3 {
            assert_eq!(ring.push(event(seq)), None);
        }
        assert_eq!(ring.push(event(3)), Some(event(0)));
        assert_eq!(ring.push(event(4)), Some(event(1)));
        assert_eq!(ring.dropped(), 2);
        assert_eq!(ring.len(), 3);
        let replayed: std::vec::Vec<_> = core::iter::from_fn(|| ring.pop_front()).filter_map(|m| m.seq()).collect();
        assert_eq!(replayed, [2, 3, 4]);
        assert!(ring.is_empty());
    }

    #[test]
    fn replay_keeps_original_timestamps() {
        let mut ring = StoreAndForward::<4>::new();
        ring.push(event(7));
        match ring.front() {
            Some(Uplink::Event(e)) => assert_eq!(e.ts, Some(1_007)),
            other => panic!("unexpected {other:?}"),
        }
    }
}
