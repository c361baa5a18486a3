//! Leader-local delivery bookkeeping: which messages of a partition are leased to which
//! consumer until when, and which are ready to be (re)delivered.
//!
//! Leases are deliberately not replicated (yet): if leadership moves, the new leader starts
//! with every stored message deliverable, which redelivers whatever was in flight. That is
//! at-least-once by construction. Acks, on the other hand, always go through Raft.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use crate::model::{MailboxId, Position};

/// Identifies one consumer stream (random, chosen by the node that serves it).
pub type ConsumerId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lease {
    consumer: ConsumerId,
    expires: Instant,
    attempt: u32,
}

/// Delivery state of one mailbox partition.
#[derive(Debug, Default)]
pub struct PartitionCursor {
    /// Lowest sequence never handed out by this leader; everything below it is leased,
    /// ready, or acked.
    pub next_scan: u64,
    leased: BTreeMap<u64, Lease>,
    /// Released or expired messages waiting for redelivery, with their attempts so far.
    ready: BTreeMap<u64, u32>,
}

impl PartitionCursor {
    /// Moves every lease that ended before `now` back to ready.
    pub fn expire(&mut self, now: Instant) {
        let expired: Vec<u64> =
            self.leased.iter().filter(|(_, l)| l.expires <= now).map(|(seq, _)| *seq).collect();
        for seq in expired {
            if let Some(lease) = self.leased.remove(&seq) {
                self.ready.insert(seq, lease.attempt);
            }
        }
    }

    /// The lowest-sequence message waiting for redelivery and its attempts so far.
    pub fn pop_ready(&mut self) -> Option<(u64, u32)> {
        self.ready.pop_first()
    }

    pub fn lease(&mut self, seq: u64, consumer: ConsumerId, expires: Instant, attempt: u32) {
        self.leased.insert(seq, Lease { consumer, expires, attempt });
        if seq >= self.next_scan {
            self.next_scan = seq + 1;
        }
    }

    /// Gives back the leases of `consumer` (all of them, or only `only`).
    pub fn release(&mut self, consumer: ConsumerId, only: Option<&[u64]>) {
        let seqs: Vec<u64> = match only {
            Some(seqs) => seqs.to_vec(),
            None => self.leased.iter().filter(|(_, l)| l.consumer == consumer).map(|(s, _)| *s).collect(),
        };
        for seq in seqs {
            if let Some(lease) = self.leased.get(&seq).copied() {
                if lease.consumer == consumer {
                    self.leased.remove(&seq);
                    self.ready.insert(seq, lease.attempt);
                }
            }
        }
    }

    /// The message is acked: forget it.
    pub fn forget(&mut self, seq: u64) {
        self.leased.remove(&seq);
        self.ready.remove(&seq);
    }

    /// Whether a released or expired message is waiting for redelivery.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    pub fn in_flight(&self) -> usize {
        self.leased.len()
    }
}

/// Delivery state of every partition led by this node in one shard, valid for one term.
#[derive(Debug, Default)]
pub struct DeliveryTracker {
    term: u64,
    partitions: HashMap<(MailboxId, u32), PartitionCursor>,
}

impl DeliveryTracker {
    /// Leases from an earlier term are meaningless: a new leadership starts from scratch.
    pub fn start_term(&mut self, term: u64) {
        if self.term != term {
            self.term = term;
            self.partitions.clear();
        }
    }

    pub fn cursor(&mut self, mailbox: MailboxId, partition: u32) -> &mut PartitionCursor {
        self.partitions.entry((mailbox, partition)).or_default()
    }

    pub fn forget(&mut self, mailbox: MailboxId, partition: u32, seq: u64) {
        if let Some(c) = self.partitions.get_mut(&(mailbox, partition)) {
            c.forget(seq);
        }
    }

    pub fn release(&mut self, consumer: ConsumerId, mailbox: MailboxId, only: Option<&[Position]>) {
        for ((mb, partition), cursor) in self.partitions.iter_mut() {
            if *mb != mailbox {
                continue;
            }
            match only {
                None => cursor.release(consumer, None),
                Some(positions) => {
                    let seqs: Vec<u64> =
                        positions.iter().filter(|p| p.partition == *partition).map(|p| p.sequence).collect();
                    cursor.release(consumer, Some(&seqs));
                }
            }
        }
    }

    /// Drops all state (snapshot installed, leadership lost).
    pub fn clear(&mut self) {
        self.partitions.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn expired_and_released_leases_are_redelivered_lowest_first() {
        let now = Instant::now();
        let mut c = PartitionCursor::default();
        c.lease(0, 1, now + Duration::from_secs(10), 1);
        c.lease(1, 1, now, 1);
        c.lease(2, 2, now + Duration::from_secs(10), 1);
        assert_eq!(c.next_scan, 3);
        c.expire(now);
        assert_eq!(c.pop_ready(), Some((1, 1)));
        assert_eq!(c.pop_ready(), None);
        c.release(1, None);
        assert_eq!(c.pop_ready(), Some((0, 1)));
        // Releasing another consumer's lease does nothing.
        c.release(1, Some(&[2]));
        assert_eq!(c.in_flight(), 1);
        c.forget(2);
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn new_term_forgets_leases() {
        let mut t = DeliveryTracker::default();
        t.start_term(1);
        t.cursor(7, 0).lease(0, 1, Instant::now(), 1);
        t.start_term(1);
        assert_eq!(t.cursor(7, 0).in_flight(), 1);
        t.start_term(2);
        assert_eq!(t.cursor(7, 0).in_flight(), 0);
    }
}
