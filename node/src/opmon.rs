//! Operational monitoring, after X-Road's op-monitor: one record per exchange a node handled
//! (a message published through it, delivered by it, or acked through it) with who sent it to
//! whom, its id and size, when, how long it took and whether it succeeded; and per recipient
//! service, its health over the last ten minutes. `kerwen opmon` queries every node's records.
//!
//! Records are kept in memory, per node, in a bounded buffer: the newest `--opmon-records`
//! (oldest dropped first, counted in `kerwen_opmon_records_dropped_total`), none older than
//! `--opmon-retention-ms`. They are monitoring data, not evidence: the replicated, signed
//! record of what was accepted and delivered is the evidence log, which this does not replace.
//! A node's records do not survive its restart.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use kerwen_broker::model::NodeId;
use serde::{Deserialize, Serialize};

/// The window of [`ServiceHealth`], as X-Road's health data.
pub const HEALTH_WINDOW_MS: i64 = 600_000;
/// Records one query returns when it names no limit, and the most it may ask for.
pub const DEFAULT_QUERY_LIMIT: usize = 1_000;
pub const MAX_QUERY_LIMIT: usize = 100_000;

/// What the node did with the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ExchangeKind {
    /// A publish through this node: from the request's arrival to its answer.
    Publish,
    /// A delivery streamed by this node: from the message's acceptance to its delivery.
    Deliver,
    /// An ack through this node: from the message's acceptance to the ack's commit.
    Ack,
}

impl ExchangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Publish => "publish",
            Self::Deliver => "deliver",
            Self::Ack => "ack",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Publish, Self::Deliver, Self::Ack].into_iter().find(|k| k.as_str() == s)
    }
}

/// One exchange as a node saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpRecord {
    pub kind: ExchangeKind,
    pub node: NodeId,
    /// When the exchange ended on this node (answer sent, delivery streamed, ack committed).
    pub at_unix_ms: i64,
    /// The caller: the publishing or consuming subsystem (an admin or node URI otherwise).
    pub client: String,
    /// The message's sender subsystem, its recipient service and id.
    pub sender: String,
    pub recipient: String,
    pub message_id: String,
    pub payload_bytes: u64,
    /// When the cluster accepted the message (0 when a publish was refused).
    pub accepted_unix_ms: i64,
    /// See [`ExchangeKind`].
    pub duration_ms: u64,
    /// The delivery attempt (delivery and ack; 0 for a publish).
    pub attempt: u32,
    /// The message was already stored (a publish retried within the dedup window).
    pub duplicate: bool,
    /// Why it failed (gRPC code and message); `None` when it succeeded.
    pub fault: Option<String>,
}

impl OpRecord {
    pub fn succeeded(&self) -> bool {
        self.fault.is_none()
    }
}

/// Which records a query wants. Empty strings match anything.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OpmonQuery {
    pub from_unix_ms: i64,
    pub to_unix_ms: i64,
    pub kind: Option<ExchangeKind>,
    pub sender: String,
    pub recipient: String,
    pub message_id: String,
    pub failed_only: bool,
    /// Records of exchanges this subsystem took part in only (as client, sender or owner of
    /// the recipient service): a subsystem sees its own traffic, an operator everything.
    pub party: Option<String>,
    pub limit: usize,
}

impl OpmonQuery {
    fn party_matches(party: &str, r: &OpRecord) -> bool {
        r.client == party || r.sender == party || r.recipient.strip_prefix(party).is_some_and(|rest| rest.starts_with('/'))
    }

    fn matches(&self, r: &OpRecord) -> bool {
        (self.from_unix_ms..=self.to_unix_ms).contains(&r.at_unix_ms)
            && self.kind.is_none_or(|k| k == r.kind)
            && (self.sender.is_empty() || r.sender == self.sender)
            && (self.recipient.is_empty() || r.recipient == self.recipient)
            && (self.message_id.is_empty() || r.message_id == self.message_id)
            && (!self.failed_only || !r.succeeded())
            && self.party.as_deref().is_none_or(|p| Self::party_matches(p, r))
    }
}

/// A recipient service's publishes over the last [`HEALTH_WINDOW_MS`], as X-Road's health data.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceHealth {
    pub service: String,
    pub successes: u64,
    pub failures: u64,
    /// Publish durations of the successes, in milliseconds.
    pub min_ms: u64,
    pub max_ms: u64,
    pub total_ms: u64,
    pub last_success_unix_ms: i64,
    pub last_failure_unix_ms: i64,
}

impl ServiceHealth {
    pub fn average_ms(&self) -> f64 {
        if self.successes == 0 { 0.0 } else { self.total_ms as f64 / self.successes as f64 }
    }

    fn add(&mut self, r: &OpRecord) {
        if r.succeeded() {
            self.min_ms = if self.successes == 0 { r.duration_ms } else { self.min_ms.min(r.duration_ms) };
            self.max_ms = self.max_ms.max(r.duration_ms);
            self.total_ms += r.duration_ms;
            self.successes += 1;
            self.last_success_unix_ms = self.last_success_unix_ms.max(r.at_unix_ms);
        } else {
            self.failures += 1;
            self.last_failure_unix_ms = self.last_failure_unix_ms.max(r.at_unix_ms);
        }
    }

    fn merge(&mut self, other: &ServiceHealth) {
        if other.successes > 0 {
            self.min_ms = if self.successes == 0 { other.min_ms } else { self.min_ms.min(other.min_ms) };
        }
        self.max_ms = self.max_ms.max(other.max_ms);
        self.total_ms += other.total_ms;
        self.successes += other.successes;
        self.failures += other.failures;
        self.last_success_unix_ms = self.last_success_unix_ms.max(other.last_success_unix_ms);
        self.last_failure_unix_ms = self.last_failure_unix_ms.max(other.last_failure_unix_ms);
    }
}

/// What one node (or, merged, the cluster) answers to a query.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OpmonAnswer {
    /// Oldest first; at most the query's limit (the newest ones).
    pub records: Vec<OpRecord>,
    /// Per recipient service the query's filters allow, by service id.
    pub health: Vec<ServiceHealth>,
    /// Matching records left out by the limit.
    pub truncated: u64,
}

impl OpmonAnswer {
    /// Folds another node's answer in, keeping the newest `limit` records.
    pub fn merge(&mut self, other: OpmonAnswer, limit: usize) {
        self.records.extend(other.records);
        self.records.sort_by(|a, b| (a.at_unix_ms, a.node).cmp(&(b.at_unix_ms, b.node)));
        let excess = self.records.len().saturating_sub(limit);
        self.records.drain(..excess);
        self.truncated += other.truncated + excess as u64;
        let mut health: BTreeMap<String, ServiceHealth> = self.health.drain(..).map(|h| (h.service.clone(), h)).collect();
        for h in other.health {
            health.entry(h.service.clone()).or_insert_with(|| ServiceHealth { service: h.service.clone(), ..Default::default() }).merge(&h);
        }
        self.health = health.into_values().collect();
    }
}

/// The node's buffer of records.
pub struct OpMonitor {
    capacity: usize,
    retention_ms: i64,
    records: Mutex<VecDeque<OpRecord>>,
}

impl OpMonitor {
    /// A buffer of at most `capacity` records (0 keeps none) younger than `retention_ms`.
    pub fn new(capacity: usize, retention_ms: u64) -> Self {
        Self { capacity, retention_ms: i64::try_from(retention_ms).unwrap_or(i64::MAX), records: Mutex::new(VecDeque::new()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<OpRecord>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Files records (and counts them in the exchange metrics).
    pub fn record(&self, records: impl IntoIterator<Item = OpRecord>) {
        let records: Vec<OpRecord> = records.into_iter().collect();
        let mut counts: BTreeMap<(ExchangeKind, bool, &str, &str), u64> = BTreeMap::new();
        for r in &records {
            *counts.entry((r.kind, r.succeeded(), &r.sender, &r.recipient)).or_default() += 1;
        }
        for ((kind, ok, sender, recipient), n) in counts {
            let outcome = if ok { "success" } else { "failure" };
            let labels = [
                ("kind", kind.as_str().to_owned()),
                ("outcome", outcome.to_owned()),
                ("sender", sender.to_owned()),
                ("recipient", recipient.to_owned()),
            ];
            metrics::counter!("kerwen_exchanges_total", &labels).increment(n);
        }
        if self.capacity == 0 {
            return;
        }
        let mut dropped = 0u64;
        {
            let mut buffer = self.lock();
            for r in records {
                if buffer.len() >= self.capacity {
                    buffer.pop_front();
                    dropped += 1;
                }
                buffer.push_back(r);
            }
        }
        if dropped > 0 {
            metrics::counter!("kerwen_opmon_records_dropped_total").increment(dropped);
        }
    }

    /// Drops records past the retention (called periodically).
    pub fn expire(&self, now_unix_ms: i64) {
        let cutoff = now_unix_ms.saturating_sub(self.retention_ms);
        let mut buffer = self.lock();
        while buffer.front().is_some_and(|r| r.at_unix_ms < cutoff) {
            buffer.pop_front();
        }
    }

    /// This node's records matching `query` (the newest `query.limit`) and the health of the
    /// services they concern over the ten minutes before `now_unix_ms`.
    pub fn query(&self, query: &OpmonQuery, now_unix_ms: i64) -> OpmonAnswer {
        let buffer = self.lock();
        let mut matching: Vec<&OpRecord> = buffer.iter().filter(|r| query.matches(r)).collect();
        let truncated = matching.len().saturating_sub(query.limit);
        let records = matching.drain(truncated..).cloned().collect();
        let window = OpmonQuery { from_unix_ms: now_unix_ms - HEALTH_WINDOW_MS, to_unix_ms: now_unix_ms, kind: Some(ExchangeKind::Publish), failed_only: false, ..query.clone() };
        let mut health: BTreeMap<&str, ServiceHealth> = BTreeMap::new();
        for r in buffer.iter().filter(|r| window.matches(r)) {
            health.entry(&r.recipient).or_insert_with(|| ServiceHealth { service: r.recipient.clone(), ..Default::default() }).add(r);
        }
        OpmonAnswer { records, health: health.into_values().collect(), truncated: truncated as u64 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: ExchangeKind, at: i64, id: &str, fault: Option<&str>) -> OpRecord {
        OpRecord {
            kind,
            node: 1,
            at_unix_ms: at,
            client: "TM/GOV/A/x".into(),
            sender: "TM/GOV/A/x".into(),
            recipient: "TM/GOV/B/y/inbox".into(),
            message_id: id.into(),
            payload_bytes: 10,
            accepted_unix_ms: at,
            duration_ms: at as u64 % 7,
            attempt: 0,
            duplicate: false,
            fault: fault.map(str::to_owned),
        }
    }

    fn all() -> OpmonQuery {
        OpmonQuery { to_unix_ms: i64::MAX, limit: DEFAULT_QUERY_LIMIT, ..Default::default() }
    }

    #[test]
    fn a_full_buffer_drops_its_oldest_records_and_retention_expires_old_ones() {
        let monitor = OpMonitor::new(3, 1_000);
        monitor.record((1..=5).map(|i| record(ExchangeKind::Publish, i * 100, &format!("m{i}"), None)));
        let ids: Vec<_> = monitor.query(&all(), 600).records.into_iter().map(|r| r.message_id).collect();
        assert_eq!(ids, ["m3", "m4", "m5"]);
        monitor.expire(1_450);
        let ids: Vec<_> = monitor.query(&all(), 1_450).records.into_iter().map(|r| r.message_id).collect();
        assert_eq!(ids, ["m5"]);
    }

    #[test]
    fn queries_filter_limit_to_the_newest_and_scope_to_a_party() {
        let monitor = OpMonitor::new(100, u64::MAX);
        monitor.record([
            record(ExchangeKind::Publish, 1, "a", None),
            record(ExchangeKind::Publish, 2, "b", Some("PERMISSION_DENIED: no grant")),
            record(ExchangeKind::Ack, 3, "a", None),
            OpRecord { sender: "TM/GOV/C/z".into(), client: "TM/GOV/C/z".into(), ..record(ExchangeKind::Publish, 4, "c", None) },
        ]);
        let ids = |q: OpmonQuery| monitor.query(&q, 10).records.into_iter().map(|r| r.message_id).collect::<Vec<_>>();
        assert_eq!(ids(OpmonQuery { failed_only: true, ..all() }), ["b"]);
        assert_eq!(ids(OpmonQuery { kind: Some(ExchangeKind::Ack), ..all() }), ["a"]);
        assert_eq!(ids(OpmonQuery { message_id: "a".into(), ..all() }), ["a", "a"]);
        assert_eq!(ids(OpmonQuery { limit: 2, ..all() }), ["a", "c"]);
        assert_eq!(ids(OpmonQuery { party: Some("TM/GOV/C/z".into()), ..all() }), ["c"]);
        assert_eq!(ids(OpmonQuery { party: Some("TM/GOV/B/y".into()), ..all() }).len(), 4, "the recipient's owner sees all");
        assert!(ids(OpmonQuery { party: Some("TM/GOV/B/yy".into()), ..all() }).is_empty(), "a prefix is not an owner");
        let health = monitor.query(&all(), 10).health;
        assert_eq!(health.len(), 1);
        assert_eq!((health[0].successes, health[0].failures, health[0].last_failure_unix_ms), (2, 1, 2));
    }

    #[test]
    fn merged_answers_keep_the_newest_records_and_add_up_health() {
        let (one, two) = (OpMonitor::new(10, u64::MAX), OpMonitor::new(10, u64::MAX));
        one.record([record(ExchangeKind::Publish, 1, "a", None), record(ExchangeKind::Publish, 5, "c", None)]);
        two.record([OpRecord { node: 2, ..record(ExchangeKind::Publish, 3, "b", Some("UNAVAILABLE: x")) }]);
        let q = OpmonQuery { limit: 2, ..all() };
        let mut answer = one.query(&q, 10);
        answer.merge(two.query(&q, 10), 2);
        let ids: Vec<_> = answer.records.iter().map(|r| r.message_id.as_str()).collect();
        assert_eq!(ids, ["b", "c"]);
        assert_eq!(answer.truncated, 1);
        let h = &answer.health[0];
        assert_eq!((h.successes, h.failures, h.min_ms, h.max_ms), (2, 1, 1, 5));
    }
}
