//! Delivery bookkeeping of one data shard.
//!
//! Two kinds of state live here:
//! - a mirror of the replicated [`DeliveryState`] of every message that has been delivered at
//!   least once (attempts, lease, earliest redelivery). `apply` keeps it in step on every
//!   replica and it is rebuilt from the store when a shard opens or installs a snapshot, so a
//!   new leader knows every lease, attempt count and back-off of the old one;
//! - the leader's own choices in flight, valid for one term: how far the scan for
//!   never-delivered messages has got, and which messages a fetch has picked whose lease
//!   command has not been applied yet (so two concurrent fetches never pick the same one).
//!
//! Choosing what to deliver happens here and on the leader only; deciding is `apply`'s job,
//! which re-checks every pick against the replicated state.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::model::{DeliveryState, MailboxId, Position};

/// Identifies one consumer stream (random, chosen by the node that serves it).
pub type ConsumerId = u64;

/// Delivery state of one mailbox partition.
#[derive(Debug, Default)]
pub struct PartitionDelivery {
    /// Mirror of the replicated state of messages delivered at least once.
    states: BTreeMap<u64, DeliveryState>,
    /// Leader-local: lowest sequence the scan for never-delivered messages has not passed.
    pub next_scan: u64,
    /// Leader-local: picked by a fetch whose lease command is in flight.
    reserved: BTreeSet<u64>,
}

impl PartitionDelivery {
    /// Messages delivered before whose redelivery is due at `now`, lowest sequence first.
    pub fn due(&self, now_unix_ms: i64) -> impl Iterator<Item = u64> + '_ {
        self.states
            .iter()
            .filter(move |(seq, state)| !self.reserved.contains(seq) && is_due(state, now_unix_ms))
            .map(|(seq, _)| *seq)
    }

    /// Whether the message has been delivered before or is being leased right now: the scan
    /// for never-delivered messages skips it.
    pub fn is_known(&self, seq: u64) -> bool {
        self.states.contains_key(&seq) || self.reserved.contains(&seq)
    }

    /// Whether a new lease of the message may be granted at `now`.
    pub fn may_lease(&self, seq: u64, now_unix_ms: i64) -> bool {
        !self.reserved.contains(&seq) && self.states.get(&seq).is_none_or(|s| is_due(s, now_unix_ms))
    }

    pub fn reserve(&mut self, seq: u64) {
        self.reserved.insert(seq);
    }

    pub fn in_flight(&self, now_unix_ms: i64) -> usize {
        self.states.values().filter(|s| s.leased_at(now_unix_ms)).count()
    }
}

fn is_due(state: &DeliveryState, now_unix_ms: i64) -> bool {
    !state.leased_at(now_unix_ms) && state.ready_at() <= now_unix_ms
}

/// Delivery state of every partition of one shard.
#[derive(Debug, Default)]
pub struct DeliveryTracker {
    /// The leader term the leader-local parts belong to.
    term: u64,
    partitions: HashMap<(MailboxId, u32), PartitionDelivery>,
}

impl DeliveryTracker {
    /// The leader-local parts of an earlier term are meaningless: start them over. The
    /// replicated mirror stays.
    pub fn start_term(&mut self, term: u64) {
        if self.term != term {
            self.term = term;
            for p in self.partitions.values_mut() {
                p.next_scan = 0;
                p.reserved.clear();
            }
        }
    }

    /// Messages under an unexpired lease at `now`, per mailbox (for metrics).
    pub fn in_flight_by_mailbox(&self, now_unix_ms: i64) -> HashMap<MailboxId, usize> {
        let mut by_mailbox = HashMap::new();
        for ((mailbox, _), p) in &self.partitions {
            *by_mailbox.entry(*mailbox).or_default() += p.in_flight(now_unix_ms);
        }
        by_mailbox
    }

    pub fn partition(&mut self, mailbox: MailboxId, partition: u32) -> &mut PartitionDelivery {
        self.partitions.entry((mailbox, partition)).or_default()
    }

    /// The replicated delivery state of a message, if it has been delivered.
    pub fn state(&self, mailbox: MailboxId, position: Position) -> Option<&DeliveryState> {
        self.partitions.get(&(mailbox, position.partition))?.states.get(&position.sequence)
    }

    /// Mirrors a change of the replicated state (`None`: the message was acked or moved).
    pub fn set_state(&mut self, mailbox: MailboxId, position: Position, state: Option<DeliveryState>) {
        match state {
            Some(state) => {
                self.partition(mailbox, position.partition).states.insert(position.sequence, state);
            }
            None => {
                if let Some(p) = self.partitions.get_mut(&(mailbox, position.partition)) {
                    p.states.remove(&position.sequence);
                }
            }
        }
    }

    /// A fetch's lease command has been applied or has failed. On failure, the scan for
    /// never-delivered messages goes back so the picks are found again.
    pub fn unreserve(&mut self, mailbox: MailboxId, positions: &[Position], failed: bool) {
        for pos in positions {
            let p = self.partition(mailbox, pos.partition);
            p.reserved.remove(&pos.sequence);
            if failed && !p.states.contains_key(&pos.sequence) {
                p.next_scan = p.next_scan.min(pos.sequence);
            }
        }
    }

    /// Positions of `mailbox` currently leased to `consumer` (expired leases included: the
    /// consumer may still be working on them).
    pub fn leases_of(&self, mailbox: MailboxId, consumer: ConsumerId) -> Vec<Position> {
        let mut out = Vec::new();
        for ((mb, partition), p) in &self.partitions {
            if *mb != mailbox {
                continue;
            }
            for (seq, state) in &p.states {
                if state.lease().is_some_and(|(c, _)| c == consumer) {
                    out.push(Position { partition: *partition, sequence: *seq });
                }
            }
        }
        out.sort();
        out
    }

    /// Up to `budget` messages whose lease has expired after their last allowed attempt:
    /// they belong in the dead-letter queue.
    pub fn exhausted(&self, now_unix_ms: i64, budget: usize) -> Vec<(MailboxId, Position)> {
        let mut out = Vec::new();
        for ((mailbox, partition), p) in &self.partitions {
            for (seq, state) in &p.states {
                if out.len() >= budget {
                    return out;
                }
                if state.exhausted() && state.lease().is_some() && !state.leased_at(now_unix_ms) {
                    out.push((*mailbox, Position { partition: *partition, sequence: *seq }));
                }
            }
        }
        out
    }

    /// Drops all state (before a rebuild from the store).
    pub fn clear(&mut self) {
        self.partitions.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AttemptOutcome, RedeliveryPolicy};

    const POLICY: RedeliveryPolicy = RedeliveryPolicy { max_attempts: 3, backoff_initial_ms: 100, backoff_max_ms: 250 };

    fn leased(consumer: u64, at: i64, until: i64) -> DeliveryState {
        let mut s = DeliveryState { attempts: 0, history: Vec::new(), not_before_unix_ms: 0, policy: POLICY };
        s.record_lease(consumer, at, until, POLICY);
        s
    }

    #[test]
    fn an_expired_lease_is_due_after_its_backoff() {
        let mut t = DeliveryTracker::default();
        let pos = Position { partition: 0, sequence: 4 };
        t.set_state(7, pos, Some(leased(1, 0, 1_000)));
        let p = t.partition(7, 0);
        assert!(!p.may_lease(4, 999), "still leased");
        assert!(!p.may_lease(4, 1_050), "expired, but the 100 ms back-off has not passed");
        assert!(p.may_lease(4, 1_100));
        assert_eq!(p.due(1_100).collect::<Vec<_>>(), vec![4]);
        p.reserve(4);
        assert!(!p.may_lease(4, 1_100), "reserved by a fetch in flight");
        assert!(p.is_known(4));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        assert_eq!(POLICY.backoff_ms(1), 100);
        assert_eq!(POLICY.backoff_ms(2), 200);
        assert_eq!(POLICY.backoff_ms(3), 250);
        assert_eq!(POLICY.backoff_ms(200), 250);
        assert_eq!(RedeliveryPolicy::UNLIMITED.backoff_ms(9), 0);
    }

    #[test]
    fn exhausted_leases_are_found_once_expired() {
        let mut t = DeliveryTracker::default();
        let pos = Position { partition: 1, sequence: 0 };
        let mut s = leased(1, 0, 10);
        s.end_lease(AttemptOutcome::Nacked { at_unix_ms: 5 });
        s.record_lease(2, 20, 30, POLICY);
        s.end_lease(AttemptOutcome::Nacked { at_unix_ms: 25 });
        s.record_lease(3, 40, 50, POLICY);
        t.set_state(7, pos, Some(s));
        assert!(t.exhausted(49, 10).is_empty());
        assert_eq!(t.exhausted(50, 10), vec![(7, pos)]);
        assert_eq!(t.leases_of(7, 3), vec![pos]);
        assert!(t.leases_of(7, 1).is_empty());
    }

    #[test]
    fn a_new_term_forgets_the_scan_and_reservations_but_not_the_replicated_state() {
        let mut t = DeliveryTracker::default();
        t.start_term(1);
        let pos = Position { partition: 0, sequence: 2 };
        t.set_state(7, pos, Some(leased(1, 0, 100)));
        t.partition(7, 0).next_scan = 9;
        t.partition(7, 0).reserve(5);
        t.start_term(2);
        assert_eq!(t.partition(7, 0).next_scan, 0);
        assert!(!t.partition(7, 0).is_known(5));
        assert!(t.state(7, pos).is_some());
    }

    #[test]
    fn a_failed_lease_rewinds_the_scan() {
        let mut t = DeliveryTracker::default();
        let p = t.partition(7, 0);
        p.reserve(3);
        p.reserve(4);
        p.next_scan = 5;
        t.unreserve(7, &[Position { partition: 0, sequence: 3 }, Position { partition: 0, sequence: 4 }], true);
        assert_eq!(t.partition(7, 0).next_scan, 3);
    }
}
