//! Running an exchange scenario ([`crate::flows`]): every system of the topology acts with its
//! own certificate, as the real information systems would.
//!
//! 1. **Setup**: the topology is applied (`kerwen_node::scenario::apply`), every sealed system
//!    gets an encryption key in the key store beside the CA, and the cluster's signing keys
//!    are fetched once, as a verifier would.
//! 2. **Probes**: every send the topology does not grant (each system to each service it
//!    neither owns nor is granted) is tried once; each must be refused with
//!    `PERMISSION_DENIED`.
//! 3. **Load**: each flow publishes at its rate within its window (open loop: latency counts
//!    from the intended send time). One consumer per receiving service, as its owner, opens
//!    sealed payloads, answers requests (replies sealed back when the flow is sealed) and acks
//!    everything; replies complete their requests at the requester's reply service.
//! 4. **Drain**: publishing stops; the run waits (up to `--drain`) until every message was
//!    delivered, every request answered and every ack's delivery receipt received.
//!
//! Evidence is checked as it arrives: each publish receipt against the message sent, and each
//! delivered message's receipt together with its ack's delivery receipt, all against the
//! signing keys fetched at setup. The warm-up setting does not apply: the whole run counts.
//!
//! Message ids are `<run>-f<flow>-<n>`; a reply's is the request's plus `.reply`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
use hdrhistogram::Histogram;
use kerwen_broker::evidence::{ArchivedMessage, KeyRing, MessageFacts, Receipt};
use kerwen_broker::request::HEADER_REPLY_TO;
use kerwen_node::client::{Client, Event};
use kerwen_node::receipts;
use kerwen_node::request_reply::reply_message;
use kerwen_node::scenario::{self, Topology};
use kerwen_node::sealed::KeyStore;
use kerwen_proto::v1::{AckReceipt, Delivery, Message, PublishResult};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::json;
use tokio::sync::{watch, Semaphore};
use tonic::Code;

use crate::cluster::Connection;
use crate::config::{format_bytes, Config, SizeDist};
use crate::flows::{Exchange, Flow, FlowKind};

/// Publishes in flight per flow; beyond that the flow's schedule waits (and the wait counts).
const INFLIGHT_PER_FLOW: usize = 32;
/// Deliveries a consumer stream may hold unacked.
const CONSUMER_CREDITS: u32 = 64;
/// Pause before reopening a failed consumer stream.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// Progress lines on stderr this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Probes of ungranted sends in flight at once.
const PROBE_CONCURRENCY: usize = 8;

/// Counters and latencies of one flow.
struct FlowStats {
    published: AtomicU64,
    published_bytes: AtomicU64,
    /// `PERMISSION_DENIED` on a flow the topology grants: an authorisation failure.
    denied: AtomicU64,
    /// Other publishes that failed after retries.
    failed: AtomicU64,
    /// First deliveries (send flows) or first replies (request flows).
    completed: AtomicU64,
    /// Deliveries or replies after the first.
    repeated: AtomicU64,
    /// Requests answered by the provider (replies stored, duplicates included).
    replies_sent: AtomicU64,
    reply_failures: AtomicU64,
    publish_receipts_verified: AtomicU64,
    delivery_receipts_verified: AtomicU64,
    receipt_failures: AtomicU64,
    opened: AtomicU64,
    open_failures: AtomicU64,
    /// Intended send time of every message or request not yet delivered or answered.
    outstanding: Mutex<HashMap<u64, Instant>>,
    /// Intended send → publish acknowledged, µs.
    publish_latency: Mutex<Histogram<u64>>,
    /// Intended send → delivered (send) or reply received (request), µs.
    end_to_end: Mutex<Histogram<u64>>,
}

fn histogram() -> Histogram<u64> {
    // 1 µs to an hour at 3 significant digits; the bounds are constants that are valid.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

fn record(h: &Mutex<Histogram<u64>>, since: Instant) {
    let us = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX).clamp(1, 3_600_000_000);
    if let Ok(mut h) = h.lock() {
        let _ = h.record(us);
    }
}

impl FlowStats {
    fn new() -> Self {
        FlowStats {
            published: AtomicU64::new(0),
            published_bytes: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            repeated: AtomicU64::new(0),
            replies_sent: AtomicU64::new(0),
            reply_failures: AtomicU64::new(0),
            publish_receipts_verified: AtomicU64::new(0),
            delivery_receipts_verified: AtomicU64::new(0),
            receipt_failures: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            open_failures: AtomicU64::new(0),
            outstanding: Mutex::new(HashMap::new()),
            publish_latency: Mutex::new(histogram()),
            end_to_end: Mutex::new(histogram()),
        }
    }

    fn outstanding(&self) -> usize {
        self.outstanding.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// The first delivery (or reply) of message `seq` completes it.
    fn complete(&self, seq: u64) {
        let intended = self.outstanding.lock().ok().and_then(|mut m| m.remove(&seq));
        match intended {
            Some(t) => {
                self.completed.fetch_add(1, Ordering::Relaxed);
                record(&self.end_to_end, t);
            }
            None => {
                self.repeated.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn forget(&self, seq: u64) {
        if let Ok(mut m) = self.outstanding.lock() {
            m.remove(&seq);
        }
    }

    fn count_receipt(&self, ok: bool, verified: &AtomicU64) {
        if ok {
            verified.fetch_add(1, Ordering::Relaxed);
        } else {
            self.receipt_failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A system's current encryption key, as senders seal to it.
#[derive(Clone)]
struct SealingKey {
    key_id: String,
    public_key: [u8; 32],
}

/// State shared by every task of the run.
struct Run {
    run_id: String,
    flows: Vec<Flow>,
    stats: Vec<FlowStats>,
    /// Cluster signing keys, fetched once at setup.
    signing_keys: KeyRing,
    /// Private encryption keys of the sealed systems.
    key_store: KeyStore,
    /// Public encryption keys by system.
    sealing_keys: HashMap<String, SealingKey>,
    request_timeout: Duration,
    payload_pool: Bytes,
    /// Ack delivery receipts each consumer still waits for.
    awaiting_receipts: Vec<AtomicUsize>,
    /// Messages in consumed mailboxes that are not this run's.
    foreign: AtomicU64,
}

impl Run {
    fn message_id(&self, flow: usize, seq: u64) -> String {
        format!("{}-f{flow}-{seq}", self.run_id)
    }

    /// The flow and sequence number of one of this run's message ids, and whether it is a reply.
    fn parse_id(&self, id: &str) -> Option<(usize, u64, bool)> {
        let (id, reply) = match id.strip_suffix(".reply") {
            Some(request) => (request, true),
            None => (id, false),
        };
        let rest = id.strip_prefix(&self.run_id)?.strip_prefix("-f")?;
        let (flow, seq) = rest.split_once('-')?;
        let flow: usize = flow.parse().ok()?;
        (flow < self.flows.len()).then_some(())?;
        Some((flow, seq.parse().ok()?, reply))
    }

    fn payload(&self, size: SizeDist, rng: &mut SmallRng) -> Vec<u8> {
        let size = size.sample(rng);
        crate::workload::payload_slice(&self.payload_pool, size, rng).to_vec()
    }

    /// `plaintext` sealed to the owner of `recipient`, or as it is when `sealed` is false.
    fn seal(&self, sealed: bool, recipient: &str, plaintext: Vec<u8>) -> anyhow::Result<Vec<u8>> {
        if !sealed {
            return Ok(plaintext);
        }
        let owner = owner_of(recipient);
        let key = self.sealing_keys.get(owner).with_context(|| format!("no encryption key of {owner}"))?;
        Ok(kerwen_node::sealed::seal(recipient, &key.key_id, &key.public_key, &plaintext)?)
    }
}

/// The system (subsystem) that owns a service id.
fn owner_of(service: &str) -> &str {
    service.rsplit_once('/').map_or(service, |(system, _)| system)
}

/// That `result` is a valid receipt for `sent`, signed by a trusted key.
fn publish_receipt_verifies(keys: &KeyRing, sent: &Message, result: &PublishResult) -> bool {
    let Ok(facts) = receipts::publish_facts(sent, result) else { return false };
    let Some(Ok(receipt)) = result.receipt.as_ref().map(receipts::from_proto) else { return false };
    receipt.verify_message(&facts, keys).is_ok()
}

/// How one flow went.
pub struct FlowReport {
    pub name: String,
    pub kind: FlowKind,
    pub json: serde_json::Value,
    pub problems: Vec<String>,
}

/// What an exchange run produced.
pub struct ExchangeOutcome {
    pub flows: Vec<FlowReport>,
    pub probes: u64,
    pub probes_refused: u64,
    /// Ungranted sends that were not refused as they should have been.
    pub probe_violations: Vec<String>,
    pub foreign: u64,
    pub duration: Duration,
    pub interrupted: bool,
}

impl ExchangeOutcome {
    /// Everything that went wrong; empty for a clean run.
    pub fn problems(&self) -> Vec<String> {
        let mut problems: Vec<String> = self.flows.iter().flat_map(|f| f.problems.iter().map(move |p| format!("{}: {p}", f.name))).collect();
        problems.extend(self.probe_violations.iter().cloned());
        if self.interrupted {
            problems.push("the run was interrupted".to_owned());
        }
        problems
    }
}

/// Applies the topology, runs the flows and reports on them.
pub async fn run(config: Arc<Config>, exchange: &Exchange, connection: Connection, interrupt: watch::Receiver<bool>) -> anyhow::Result<ExchangeOutcome> {
    let topology = &exchange.topology;
    let mut admin = connection.connect_admin().await.map_err(|s| anyhow::anyhow!("connecting as administrator: {}", s.message()))?;
    let applied = scenario::apply(&mut admin, topology).await?;
    eprintln!(
        "topology: {} systems, {} mailboxes ({} systems registered, {} mailboxes created, {} grants added now)",
        topology.systems.len(),
        topology.services().count(),
        applied.systems_registered,
        applied.mailboxes_created,
        applied.grants_added
    );
    let signing_keys = admin.signing_key_ring().await.map_err(|s| anyhow::anyhow!("fetching the signing keys: {}", s.message()))?;
    let keys_dir = connection.keys_dir().context("an exchange scenario needs a CA to issue the systems' certificates")?;
    let mut key_store = KeyStore::load(&keys_dir)?;
    let mut clients = HashMap::new();
    let mut sealing_keys = HashMap::new();
    for system in &topology.systems {
        let mut client = connection
            .as_subsystem(&system.id)?
            .connect()
            .await
            .map_err(|s| anyhow::anyhow!("connecting as {}: {}", system.id, s.message()))?;
        if system.sealed {
            let (key, _) = scenario::ensure_sealing_key(&mut client, &mut key_store, &system.id).await?;
            let public_key: [u8; 32] = key.public_key.as_ref().try_into().context("a 32-byte encryption key")?;
            sealing_keys.insert(system.id.clone(), SealingKey { key_id: key.key_id, public_key });
        }
        clients.insert(system.id.clone(), client);
    }

    let max_size = exchange.flows.iter().map(|f| f.size.max().max(f.reply_size.max())).max().unwrap_or(1024);
    let mut rng = SmallRng::seed_from_u64(config.seed);
    let payload_pool = crate::workload::payload_pool(max_size, &mut rng)?;
    let consumed = consumed_services(&exchange.flows);
    let run = Arc::new(Run {
        run_id: format!("x{:08x}", rng.next_u32()),
        flows: exchange.flows.clone(),
        stats: exchange.flows.iter().map(|_| FlowStats::new()).collect(),
        signing_keys,
        key_store,
        sealing_keys,
        request_timeout: config.request_timeout,
        payload_pool,
        awaiting_receipts: consumed.iter().map(|_| AtomicUsize::new(0)).collect(),
        foreign: AtomicU64::new(0),
    });

    let (consumers_stop_tx, consumers_stop) = watch::channel(false);
    let mut consumers = Vec::new();
    for (index, service) in consumed.iter().enumerate() {
        let client = clients.get(owner_of(service)).context("the owner of a consumed service")?.clone();
        consumers.push(tokio::spawn(consume(run.clone(), index, service.clone(), client, consumers_stop.clone())));
    }

    let (probes, probes_refused, probe_violations) = probe_ungranted(&run, topology, &clients).await;
    eprintln!("probes: {probes_refused} of {probes} ungranted sends refused");

    let start = Instant::now();
    let mut stop = interrupt.clone();
    let producers: Vec<_> = (0..run.flows.len())
        .map(|i| {
            let client = clients.get(&run.flows[i].from).cloned();
            tokio::spawn(produce(run.clone(), i, client, start, config.duration, stop.clone()))
        })
        .collect();
    let progress = (!config.quiet).then(|| tokio::spawn(progress(run.clone(), start)));
    for p in producers {
        p.await.context("a producer task")??;
    }
    let interrupted = *stop.borrow_and_update();

    // Drain: until everything sent arrived, was answered and its ack receipt came back.
    let deadline = Instant::now() + config.drain;
    while !interrupted && Instant::now() < deadline {
        let outstanding: usize = run.stats.iter().map(FlowStats::outstanding).sum();
        let awaiting: usize = run.awaiting_receipts.iter().map(|a| a.load(Ordering::Relaxed)).sum();
        if outstanding == 0 && awaiting == 0 {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    let _ = consumers_stop_tx.send(true);
    for c in consumers {
        let _ = tokio::time::timeout(Duration::from_secs(10), c).await;
    }
    if let Some(p) = progress {
        p.abort();
    }
    let duration = start.elapsed();
    let flows = run.flows.iter().zip(&run.stats).map(|(f, s)| flow_report(f, s, config.duration)).collect();
    Ok(ExchangeOutcome {
        flows,
        probes,
        probes_refused,
        probe_violations,
        foreign: run.foreign.load(Ordering::Relaxed),
        duration,
        interrupted: *interrupt.borrow(),
    })
}

/// The services some flow delivers to: flow targets and reply services, each once.
fn consumed_services(flows: &[Flow]) -> Vec<String> {
    let mut services: Vec<String> = flows.iter().flat_map(|f| std::iter::once(f.to.clone()).chain(f.reply_to.clone())).collect();
    services.sort();
    services.dedup();
    services
}

/// Tries every send the topology does not grant; returns (tried, refused, violations).
async fn probe_ungranted(run: &Run, topology: &Topology, clients: &HashMap<String, Client>) -> (u64, u64, Vec<String>) {
    let mut attempts = Vec::new();
    for system in &topology.systems {
        for service in topology.services() {
            if !topology.may_send(&system.id, &service.id) {
                attempts.push((system.id.clone(), service.id.clone()));
            }
        }
    }
    let tried = attempts.len() as u64;
    let results: Vec<Option<String>> = futures::stream::iter(attempts.into_iter().enumerate())
        .map(|(i, (from, to))| {
            let client = clients.get(&from).cloned();
            let id = format!("{}-probe-{i}", run.run_id);
            async move {
                let mut client = client?;
                let message = Message { id, recipient: to.clone(), payload: Bytes::from_static(b"not allowed"), ..Default::default() };
                match client.publish(vec![message]).await {
                    Err(s) if s.code() == Code::PermissionDenied => None,
                    Err(s) => Some(format!("{from} -> {to}: refused with {:?} instead of PERMISSION_DENIED: {}", s.code(), s.message())),
                    Ok(_) => Some(format!("{from} -> {to}: accepted, but the topology grants no such send")),
                }
            }
        })
        .buffer_unordered(PROBE_CONCURRENCY)
        .collect()
        .await;
    let violations: Vec<String> = results.into_iter().flatten().collect();
    (tried, tried - violations.len() as u64, violations)
}

/// One flow's schedule: message `k` is due at `start + window start + k / rate`.
async fn produce(
    run: Arc<Run>,
    index: usize,
    client: Option<Client>,
    start: Instant,
    duration: Duration,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let flow = &run.flows[index];
    let client = client.with_context(|| format!("no connection as {}", flow.from))?;
    let (from, until) = flow.active(duration);
    let interval = Duration::from_secs_f64(1.0 / flow.rate);
    let slots = Arc::new(Semaphore::new(INFLIGHT_PER_FLOW));
    let mut rng = SmallRng::seed_from_u64(index as u64 + 1);
    let mut tasks = tokio::task::JoinSet::new();
    for seq in 0u64.. {
        let offset = from + interval.mul_f64(seq as f64);
        if offset >= until {
            break;
        }
        let intended = start + offset;
        tokio::select! {
            _ = tokio::time::sleep_until(intended.into()) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let Ok(permit) = slots.clone().acquire_owned().await else { break };
        let plaintext = run.payload(flow.size, &mut rng);
        let mut message = Message {
            id: run.message_id(index, seq),
            recipient: flow.to.clone(),
            payload: run.seal(flow.sealed, &flow.to, plaintext)?.into(),
            ordering_key: (flow.ordering_keys > 0).then(|| format!("{}-{}", flow.name, rng.random_range(0..flow.ordering_keys))),
            ..Default::default()
        };
        if let Some(reply_to) = &flow.reply_to {
            message.headers.insert(HEADER_REPLY_TO.to_owned(), reply_to.clone());
        }
        if let Ok(mut m) = run.stats[index].outstanding.lock() {
            m.insert(seq, intended);
        }
        let (run, mut client) = (run.clone(), client.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let stats = &run.stats[index];
            let deadline = tokio::time::Instant::now() + run.request_timeout;
            match client.publish_until(&message, deadline).await {
                Ok(result) => {
                    record(&stats.publish_latency, intended);
                    stats.published.fetch_add(1, Ordering::Relaxed);
                    stats.published_bytes.fetch_add(message.payload.len() as u64, Ordering::Relaxed);
                    stats.count_receipt(publish_receipt_verifies(&run.signing_keys, &message, &result), &stats.publish_receipts_verified);
                }
                Err(s) => {
                    stats.forget(seq);
                    let counter = if s.code() == Code::PermissionDenied { &stats.denied } else { &stats.failed };
                    counter.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(flow = %run.flows[index].name, code = ?s.code(), "publish failed: {}", s.message());
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// One receiving service's consumer, as its owner; reopens its stream until told to stop.
async fn consume(run: Arc<Run>, index: usize, service: String, mut client: Client, mut stop: watch::Receiver<bool>) {
    // Facts and receipts of delivered messages, until their acks' delivery receipts arrive.
    let mut awaiting: HashMap<String, (MessageFacts, Receipt)> = HashMap::new();
    let mut rng = SmallRng::seed_from_u64(1000 + index as u64);
    while !*stop.borrow() {
        let mut sub = match client.subscribe(&service, CONSUMER_CREDITS).await {
            Ok(s) => s,
            Err(s) => {
                tracing::warn!(%service, "subscribing: {}", s.message());
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
        };
        loop {
            let event = tokio::select! {
                e = sub.next_event(Duration::from_millis(500)) => e,
                _ = stop.wait_for(|s| *s) => return,
            };
            let result = match event {
                Ok(Some(Event::Delivery(d))) => match handle_delivery(&run, &mut client, &mut rng, &mut awaiting, &d).await {
                    Ok(()) => match d.position {
                        Some(p) => sub.ack(vec![p]).await,
                        None => Ok(()),
                    },
                    Err(()) => match d.position {
                        Some(p) => sub.nack_after(vec![p], Duration::from_secs(1)).await,
                        None => Ok(()),
                    },
                }
                .and(sub.credit(1).await),
                Ok(Some(Event::Acked(_))) => {
                    for a in sub.take_ack_receipts() {
                        check_ack_receipt(&run, &mut awaiting, &a);
                    }
                    Ok(())
                }
                Ok(None) => Err(tonic::Status::unavailable("the server ended the stream")),
                Err(s) if s.code() == Code::DeadlineExceeded => Ok(()),
                Err(s) => Err(s),
            };
            run.awaiting_receipts[index].store(awaiting.len(), Ordering::Relaxed);
            if let Err(s) = result {
                tracing::warn!(%service, "consumer stream: {}", s.message());
                tokio::time::sleep(RETRY_PAUSE).await;
                break;
            }
        }
    }
}

/// Opens, checks and (for requests) answers one delivery. `Err` gives it back for redelivery.
async fn handle_delivery(
    run: &Run,
    client: &mut Client,
    rng: &mut SmallRng,
    awaiting: &mut HashMap<String, (MessageFacts, Receipt)>,
    d: &Delivery,
) -> Result<(), ()> {
    let Some(m) = d.message.as_ref() else { return Ok(()) };
    let Some((index, seq, is_reply)) = run.parse_id(&m.id) else {
        run.foreign.fetch_add(1, Ordering::Relaxed);
        return Ok(());
    };
    let (flow, stats) = (&run.flows[index], &run.stats[index]);
    match (receipts::delivery_facts(d), d.receipt.as_ref().map(receipts::from_proto)) {
        (Ok(facts), Some(Ok(receipt))) => {
            awaiting.insert(m.id.clone(), (facts, receipt));
        }
        _ => {
            stats.receipt_failures.fetch_add(1, Ordering::Relaxed);
        }
    }
    if flow.sealed {
        let counter = if run.key_store.open(&m.recipient, &m.payload).is_ok() { &stats.opened } else { &stats.open_failures };
        counter.fetch_add(1, Ordering::Relaxed);
    }
    if flow.kind == FlowKind::Request && !is_reply {
        let reply_to = m.headers.get(HEADER_REPLY_TO).cloned().unwrap_or_default();
        let payload = run.seal(flow.sealed, &reply_to, run.payload(flow.reply_size, rng)).map_err(|e| {
            tracing::warn!(flow = %flow.name, "sealing a reply: {e:#}");
            stats.reply_failures.fetch_add(1, Ordering::Relaxed);
        })?;
        let reply = reply_message(d, payload).map_err(|s| {
            tracing::warn!(flow = %flow.name, "building a reply: {}", s.message());
            stats.reply_failures.fetch_add(1, Ordering::Relaxed);
        })?;
        let deadline = tokio::time::Instant::now() + run.request_timeout;
        match client.publish_until(&reply, deadline).await {
            Ok(result) => {
                stats.replies_sent.fetch_add(1, Ordering::Relaxed);
                stats.count_receipt(publish_receipt_verifies(&run.signing_keys, &reply, &result), &stats.publish_receipts_verified);
            }
            Err(s) => {
                tracing::warn!(flow = %flow.name, "replying: {}", s.message());
                stats.reply_failures.fetch_add(1, Ordering::Relaxed);
                return Err(());
            }
        }
    } else {
        stats.complete(seq);
    }
    Ok(())
}

/// Checks an ack's delivery receipt together with the message's own receipt.
fn check_ack_receipt(run: &Run, awaiting: &mut HashMap<String, (MessageFacts, Receipt)>, a: &AckReceipt) {
    let Some((index, _, _)) = run.parse_id(&a.message_id) else { return };
    let stats = &run.stats[index];
    let Some((facts, receipt)) = awaiting.remove(&a.message_id) else {
        // An ack of a delivery whose receipt already failed to parse (counted then).
        return;
    };
    let ok = receipts::ack_from_proto(a)
        .is_ok_and(|delivery| ArchivedMessage { facts, receipt, delivery: Some(delivery) }.verify(&run.signing_keys).is_ok());
    stats.count_receipt(ok, &stats.delivery_receipts_verified);
}

async fn progress(run: Arc<Run>, start: Instant) {
    loop {
        tokio::time::sleep(PROGRESS_EVERY).await;
        let sum = |f: fn(&FlowStats) -> u64| run.stats.iter().map(f).sum::<u64>();
        eprintln!(
            "{:>4}s  published {}  delivered or answered {}  replies sent {}  outstanding {}",
            start.elapsed().as_secs(),
            sum(|s| s.published.load(Ordering::Relaxed)),
            sum(|s| s.completed.load(Ordering::Relaxed)),
            sum(|s| s.replies_sent.load(Ordering::Relaxed)),
            run.stats.iter().map(FlowStats::outstanding).sum::<usize>(),
        );
    }
}

fn quantiles_ms(h: &Mutex<Histogram<u64>>) -> serde_json::Value {
    let Ok(h) = h.lock() else { return json!(null) };
    if h.is_empty() {
        return json!(null);
    }
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    json!({"p50": ms(0.5), "p99": ms(0.99), "max": h.max() as f64 / 1000.0, "count": h.len()})
}

fn flow_report(flow: &Flow, s: &FlowStats, duration: Duration) -> FlowReport {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let (published, completed, outstanding) = (get(&s.published), get(&s.completed), s.outstanding() as u64);
    let mut problems = Vec::new();
    let mut problem = |bad: bool, what: String| {
        if bad {
            problems.push(what);
        }
    };
    problem(published == 0, "nothing was published".to_owned());
    problem(get(&s.denied) > 0, format!("{} publishes refused as unauthorised on a granted flow", get(&s.denied)));
    problem(get(&s.failed) > 0, format!("{} publishes failed", get(&s.failed)));
    problem(outstanding > 0, format!("{outstanding} {} by the end", if flow.kind == FlowKind::Request { "requests unanswered" } else { "messages undelivered" }));
    problem(get(&s.receipt_failures) > 0, format!("{} receipts did not verify", get(&s.receipt_failures)));
    problem(get(&s.open_failures) > 0, format!("{} sealed payloads did not open", get(&s.open_failures)));
    problem(get(&s.reply_failures) > 0, format!("{} replies failed", get(&s.reply_failures)));
    let json = json!({
        "name": flow.name,
        "kind": flow.kind.name(),
        "from": flow.from,
        "to": flow.to,
        "reply_to": flow.reply_to,
        "sealed": flow.sealed,
        "size": flow.size.to_string(),
        "rate_per_s": flow.rate,
        "window": [flow.window.0, flow.window.1],
        "planned": flow.planned(duration).ceil(),
        "published": published,
        "published_bytes": get(&s.published_bytes),
        "unauthorised": get(&s.denied),
        "failed": get(&s.failed),
        "completed": completed,
        "repeated": get(&s.repeated),
        "outstanding": outstanding,
        "replies_sent": get(&s.replies_sent),
        "reply_failures": get(&s.reply_failures),
        "receipts": {
            "publish_verified": get(&s.publish_receipts_verified),
            "delivery_verified": get(&s.delivery_receipts_verified),
            "failed": get(&s.receipt_failures),
        },
        "sealed_opened": get(&s.opened),
        "sealed_open_failures": get(&s.open_failures),
        "publish_ack_ms": quantiles_ms(&s.publish_latency),
        "end_to_end_ms": quantiles_ms(&s.end_to_end),
    });
    FlowReport { name: flow.name.clone(), kind: flow.kind, json, problems }
}

/// The summary table.
pub fn summary(config: &Config, outcome: &ExchangeOutcome) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "exchange scenario {} ({:.0} s)", config.name, outcome.duration.as_secs_f64());
    let _ = writeln!(
        out,
        "{:<32} {:<7} {:>9} {:>10} {:>9} {:>10} {:>10} {:>10} {:>9}",
        "FLOW", "KIND", "PUBLISHED", "BYTES", "DONE", "E2E p50", "E2E p99", "RECEIPTS", "UNAUTH"
    );
    for f in &outcome.flows {
        let j = &f.json;
        let ms = |q: &str| j["end_to_end_ms"][q].as_f64().map_or_else(|| "-".to_owned(), |v| format!("{v:.1}ms"));
        let n = |k: &str| j[k].as_u64().unwrap_or(0);
        let receipts = j["receipts"]["publish_verified"].as_u64().unwrap_or(0) + j["receipts"]["delivery_verified"].as_u64().unwrap_or(0);
        let _ = writeln!(
            out,
            "{:<32} {:<7} {:>9} {:>10} {:>9} {:>10} {:>10} {:>10} {:>9}",
            f.name,
            f.kind.name(),
            n("published"),
            format_bytes(n("published_bytes")),
            n("completed"),
            ms("p50"),
            ms("p99"),
            receipts,
            n("unauthorised"),
        );
    }
    let _ = writeln!(out, "ungranted sends refused: {} of {}", outcome.probes_refused, outcome.probes);
    let problems = outcome.problems();
    if problems.is_empty() {
        let _ = writeln!(out, "result: OK: no authorisation failures on granted flows, every ungranted send refused, every receipt verified");
    } else {
        let _ = writeln!(out, "result: {} problems", problems.len());
        for p in problems {
            let _ = writeln!(out, "  - {p}");
        }
    }
    out
}

/// The JSON report.
pub fn json_report(config: &Config, exchange: &Exchange, environment: serde_json::Value, outcome: &ExchangeOutcome) -> serde_json::Value {
    let total = |path: &[&str]| -> u64 {
        outcome.flows.iter().map(|f| path.iter().fold(&f.json, |v, k| &v[*k]).as_u64().unwrap_or(0)).sum()
    };
    json!({
        "name": config.name,
        "description": config.description,
        "scenario_file": config.scenario_file,
        "duration_s": outcome.duration.as_secs_f64(),
        "measured_duration_s": config.duration.as_secs_f64(),
        "rate_scale": exchange.rate_scale,
        "environment": environment,
        "flows": outcome.flows.iter().map(|f| f.json.clone()).collect::<Vec<_>>(),
        "totals": {
            "published": total(&["published"]),
            "completed": total(&["completed"]),
            "unauthorised_on_granted_flows": total(&["unauthorised"]),
            "receipts_verified": total(&["receipts", "publish_verified"]) + total(&["receipts", "delivery_verified"]),
            "receipts_failed": total(&["receipts", "failed"]),
            "sealed_opened": total(&["sealed_opened"]),
        },
        "ungranted_probes": {"tried": outcome.probes, "refused": outcome.probes_refused, "violations": outcome.probe_violations},
        "foreign_messages": outcome.foreign,
        "problems": outcome.problems(),
        "ok": outcome.problems().is_empty(),
    })
}
