//! The chaos matrix of issue 8, on real containers: a 3-node cluster of the project's image
//! (`kerwen:dev`, from `scripts/image`) on a private Docker network, under continuous load,
//! survives one fault after the other, each followed by healing:
//!
//! 1. SIGKILL of the metadata group's leader (`docker kill`), then `docker start`;
//! 2. a rolling restart: per node `/drain-leadership`, `docker stop -t 20` (SIGTERM, graceful
//!    shutdown, exit code 0 expected), `docker start`, all `/readyz` 200 before the next;
//! 3. a partition isolating the metadata group's leader (`docker network disconnect` for 10 s,
//!    then `docker network connect`);
//! 4. the leader of data shard 1 paused (`docker pause` for 10 s, `docker unpause`);
//! 5. a full disk: node 3's data directory is a small tmpfs mounted on the host; the test
//!    fills it with a file until ENOSPC and keeps it full, under extra load (a third producer
//!    of 32 KiB messages), until the node logs ENOSPC (RocksDB writes into its preallocated
//!    log for a while) and 10 s longer, then deletes the file; if the node exited, or does not
//!    become ready and catch up by itself within 20 s, the test starts (or restarts) its
//!    container, and the table's notes say so.
//!
//! Load: two producers publish batches of 10 messages with unique ids through a client that
//! knows all three nodes; a publish counts as acknowledged once it is answered OK (retried with
//! the same ids, rotating the endpoints, for up to 60 s). One consumer acks every delivery and
//! records its id, position and attempt; it resubscribes through another node when its stream
//! fails or stays silent for 8 s (a paused or cut-off node does not close it).
//!
//! After each fault: every acknowledged message is delivered (within 120 s), no message id is
//! stored at two positions (its acknowledged position and every delivered one must be the same;
//! delivering the same position again is at-least-once redelivery, counted apart), and all three
//! `/readyz` answer 200 — with the faulted node caught up with its groups' leaders — within
//! 60 s of the healing step. The table at the end has one row per fault; any failing row fails
//! the test. Ignored by default (it needs Docker and the image): `scripts/chaos` runs it.

mod harness;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use harness::docker::DockerCluster;
use harness::{delivered_id, delivered_pos, message, publish_retry, trace, Consumer, NodeId};
use kerwen_node::client::{Client, Event};
use kerwen_proto::v1::{CreateMailboxRequest, Message, Position};

const MAILBOX: &str = "TM/GOV/MINCOM/registry/chaos";
const PRODUCERS: usize = 2;
const BATCH: usize = 10;
/// Pause between two batches of one producer: at most ~200 messages/s in all, modest on two
/// cores that also run three nodes.
const BATCH_INTERVAL: Duration = Duration::from_millis(100);
/// How long one batch is retried (rotating endpoints) before the producer gives up on it.
const PUBLISH_BUDGET: Duration = Duration::from_secs(60);
/// A healed cluster must answer 200 on every `/readyz` within this.
const RECOVERY_BOUND: Duration = Duration::from_secs(60);
/// Every acknowledged message must be delivered within this after the load of a fault stops.
const DELIVERY_BOUND: Duration = Duration::from_secs(120);
/// How long a fault lasts (partition, pause, full disk).
const FAULT_DURATION: Duration = Duration::from_secs(10);
/// How long a node with a freed disk gets to recover by itself before it is (re)started.
const SELF_HEAL_GRACE: Duration = Duration::from_secs(20);
/// The consumer resubscribes elsewhere after this long without any event.
const CONSUMER_SILENCE: Duration = Duration::from_secs(8);
/// The whole matrix (after the cluster started) must end within this.
const MATRIX_BOUND: Duration = Duration::from_secs(12 * 60);
/// The node whose data directory is a tmpfs, and its size.
const DISK_NODE: NodeId = 3;
const DISK_BYTES: u64 = 512 << 20;
/// How long the full disk may take to be felt (the node logs ENOSPC): RocksDB preallocates its
/// write-ahead log (fallocate, up to 64 MiB), so a node writes on for a while into space it
/// already holds, until a memtable flush or a new log file needs new blocks.
const ENOSPC_WAIT_BOUND: Duration = Duration::from_secs(60);
/// What RocksDB's errors say on a full disk (strerror(ENOSPC)).
const ENOSPC_TEXT: &str = "No space left on device";

// ---------------------------------------------------------------------------------------------
// What the load saw
// ---------------------------------------------------------------------------------------------

/// One delivery the consumer received.
struct Received {
    id: String,
    pos: (u32, u64),
    attempt: u32,
    at: Instant,
}

#[derive(Default)]
struct Ledger {
    /// Acknowledged publishes: id → the position the cluster answered, and when.
    acked: HashMap<String, ((u32, u64), Instant)>,
    /// Batches given up after [`PUBLISH_BUDGET`] (outcome unknown: they may be stored), per phase.
    given_up: BTreeMap<usize, usize>,
    deliveries: Vec<Received>,
}

/// Message ids are `f{phase}-p{producer}-{batch}-{i}`.
fn phase_of(id: &str) -> Option<usize> {
    id.strip_prefix('f')?.split('-').next()?.parse().ok()
}

fn lock(ledger: &Mutex<Ledger>) -> std::sync::MutexGuard<'_, Ledger> {
    // A panicking load task must not hide the others' records.
    ledger.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------------

/// Publishes batches until `stop`; each batch is retried with the same ids (so a retry of a
/// stored batch is answered from the dedup record) until acknowledged or [`PUBLISH_BUDGET`]
/// passes. The client fails over by itself on transport errors; after a failed or timed-out
/// attempt (a paused node accepts connections but never answers) the producer reconnects with
/// the endpoints rotated.
async fn produce(cluster: Arc<DockerCluster>, ledger: Arc<Mutex<Ledger>>, phase: usize, producer: usize, load: Load, stop: Arc<AtomicBool>) {
    let mut first = producer;
    let mut client: Option<Client> = None;
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let batch: Vec<Message> = (0..load.batch)
            .map(|i| {
                let id = format!("f{phase}-p{producer}-{n:06}-{i}");
                let mut payload = format!("chaos payload of {id} ").into_bytes();
                payload.resize(payload.len().max(load.payload_bytes), b'.');
                message(id, MAILBOX, None, payload)
            })
            .collect();
        n += 1;
        let deadline = Instant::now() + PUBLISH_BUDGET;
        loop {
            if client.is_none() {
                match cluster.client_from(first).await {
                    Ok(c) => client = Some(c),
                    Err(e) => {
                        if Instant::now() > deadline {
                            trace(format!("producer {producer}: giving up on a batch: {e:#}"));
                            *lock(&ledger).given_up.entry(phase).or_default() += 1;
                            break;
                        }
                        first += 1;
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        continue;
                    }
                }
            }
            let Some(c) = client.as_mut() else { continue };
            match publish_retry(c, &batch, Duration::from_secs(4), Duration::from_secs(4)).await {
                Ok((resp, _)) => {
                    let now = Instant::now();
                    let mut l = lock(&ledger);
                    for r in resp.results {
                        if let Some(p) = r.position {
                            l.acked.insert(r.id, ((p.partition, p.sequence), now));
                        }
                    }
                    break;
                }
                Err(e) => {
                    if Instant::now() > deadline {
                        trace(format!("producer {producer}: giving up on a batch after {PUBLISH_BUDGET:?}: {e:#}"));
                        *lock(&ledger).given_up.entry(phase).or_default() += 1;
                        break;
                    }
                    first += 1;
                    client = None;
                    // A refusal (not retried by publish_retry) must not turn into a busy loop.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        tokio::time::sleep(BATCH_INTERVAL).await;
    }
}

/// What one producer sends.
#[derive(Debug, Clone, Copy)]
struct Load {
    batch: usize,
    payload_bytes: usize,
}

/// The steady load: small messages.
const LIGHT: Load = Load { batch: BATCH, payload_bytes: 0 };
/// The extra load of the full-disk fault, until the disk is freed: enough bytes per second
/// for the node to need new disk blocks within seconds, so it really meets the full disk.
const HEAVY: Load = Load { batch: 4, payload_bytes: 32 << 10 };

/// Consumes and acks until `stop`, recording every delivery. Resubscribes through the next
/// endpoint when the stream fails or stays silent for [`CONSUMER_SILENCE`].
async fn consume(cluster: Arc<DockerCluster>, ledger: Arc<Mutex<Ledger>>, stop: Arc<AtomicBool>) {
    let mut first = 0usize;
    let mut subscriptions = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let opened = async {
            // Pinned to the endpoint: the consumer's own rotation is what recovers it here.
            let mut client = cluster.client_from(first).await?.without_direct_routing();
            let endpoint = client.endpoint().to_owned();
            Ok::<_, anyhow::Error>((Consumer::open(&mut client, MAILBOX, 256).await?, endpoint))
        };
        let (mut consumer, endpoint) = match opened.await {
            Ok(c) => c,
            Err(e) => {
                trace(format!("consumer: subscribing failed: {e:#}"));
                first += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        subscriptions += 1;
        if subscriptions > 1 {
            trace(format!("consumer: subscription {subscriptions} through {endpoint}"));
        }
        let mut to_ack: Vec<Position> = Vec::new();
        let mut last_event = Instant::now();
        let mut last_flush = Instant::now();
        let why = loop {
            if stop.load(Ordering::Relaxed) {
                if !to_ack.is_empty() {
                    let _ = consumer.ack(std::mem::take(&mut to_ack)).await;
                }
                break None;
            }
            match consumer.next_event(Duration::from_millis(200)).await {
                Ok(Some(Event::Delivery(d))) => {
                    last_event = Instant::now();
                    match (delivered_id(&d), delivered_pos(&d), d.position) {
                        (Ok(id), Ok(pos), Some(p)) => {
                            lock(&ledger).deliveries.push(Received { id, pos, attempt: d.attempt, at: Instant::now() });
                            to_ack.push(p);
                        }
                        _ => trace(format!("consumer: malformed delivery {d:?}")),
                    }
                }
                Ok(Some(Event::Acked(_))) => last_event = Instant::now(),
                Ok(None) => {}
                Err(e) => break Some(format!("{e:#}")),
            }
            if !to_ack.is_empty() && (to_ack.len() >= 64 || last_flush.elapsed() >= Duration::from_millis(200)) {
                if let Err(e) = consumer.ack(std::mem::take(&mut to_ack)).await {
                    break Some(format!("{e:#}"));
                }
                last_flush = Instant::now();
            }
            if last_event.elapsed() > CONSUMER_SILENCE {
                break Some(format!("no event for {CONSUMER_SILENCE:?}"));
            }
        };
        match why {
            None => break,
            Some(why) => {
                // Silence between faults is normal (nothing to deliver): only other ends are logged.
                if !why.starts_with("no event") {
                    trace(format!("consumer: stream through {endpoint} ended ({why}); resubscribing elsewhere"));
                }
                first += 1;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Fault {
    Kill,
    RollingRestart,
    Partition,
    Pause,
    FullDisk,
}

impl Fault {
    const ALL: [Fault; 5] = [Fault::Kill, Fault::RollingRestart, Fault::Partition, Fault::Pause, Fault::FullDisk];

    fn name(self) -> &'static str {
        match self {
            Fault::Kill => "SIGKILL of a node",
            Fault::RollingRestart => "rolling restart",
            Fault::Partition => "partition of the leader",
            Fault::Pause => "paused node",
            Fault::FullDisk => "full disk",
        }
    }
}

/// What happened during one fault.
#[derive(Default, Clone)]
struct Outcome {
    /// Healing step to healthy again.
    recovery: Option<Duration>,
    notes: Vec<String>,
    errors: Vec<String>,
}

/// Waits until every `/readyz` is 200 and `node` has applied, in every group, what that group's
/// leader had applied when the wait started (it replicates again, not just answers probes).
async fn wait_recovered(cluster: &DockerCluster, node: NodeId, started: Instant, bound: Duration) -> Result<Duration> {
    let deadline = started + bound;
    let left = deadline.saturating_duration_since(Instant::now());
    cluster.wait_all_ready(left).await?;
    let others: Vec<NodeId> = cluster.node_ids().into_iter().filter(|n| *n != node).collect();
    let mut targets = BTreeMap::new();
    for g in cluster.groups() {
        let left = deadline.saturating_duration_since(Instant::now());
        let leader = cluster.leader_of(g, &cluster.node_ids(), left.max(Duration::from_secs(1))).await?;
        let status = cluster.status(leader).await?;
        let applied = status.groups.iter().find(|s| s.group == g).map(|s| s.last_applied_index).unwrap_or(0);
        targets.insert(g, applied);
    }
    loop {
        let behind: Result<Vec<String>> = async {
            let st = cluster.status(node).await?;
            Ok(targets
                .iter()
                .filter_map(|(g, target)| {
                    let applied = st.groups.iter().find(|s| s.group == *g).map(|s| s.last_applied_index).unwrap_or(0);
                    (applied < *target).then(|| format!("group {g}: {applied} < {target}"))
                })
                .collect())
        }
        .await;
        match behind {
            Ok(b) if b.is_empty() => break,
            other if Instant::now() > deadline => bail!("node {node} did not catch up within {bound:?} (others: {others:?}; {other:?})"),
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    // Readiness again, now that the node caught up (a leadership may have moved meanwhile).
    let left = deadline.saturating_duration_since(Instant::now());
    cluster.wait_all_ready(left.max(Duration::from_secs(1))).await?;
    Ok(started.elapsed())
}

/// Runs one fault and its healing. `heavy_stop` ends the extra load of the full-disk fault.
async fn run_fault(cluster: &DockerCluster, fault: Fault, out: &mut Outcome, heavy_stop: &AtomicBool) -> Result<()> {
    let all = cluster.node_ids();
    match fault {
        Fault::Kill => {
            let victim = cluster.leader_of(0, &all, Duration::from_secs(30)).await?;
            out.notes.push(format!("killed node {victim} (metadata leader)"));
            cluster.kill(victim).await?;
            tokio::time::sleep(Duration::from_secs(5)).await;
            let healing = Instant::now();
            cluster.start(victim).await?;
            out.recovery = Some(wait_recovered(cluster, victim, healing, RECOVERY_BOUND).await?);
        }
        Fault::RollingRestart => {
            let mut worst = Duration::ZERO;
            let mut exits = Vec::new();
            for node in all.clone() {
                let (status, body) = cluster.http(node, "/drain-leadership", Duration::from_secs(25)).await?;
                if status != 200 {
                    out.notes.push(format!("node {node}: drain answered {status} {}", body.trim()));
                }
                let code = cluster.stop(node, Duration::from_secs(20)).await?;
                exits.push(format!("{node}:{code}"));
                if code != 0 {
                    out.errors.push(format!("node {node} exited with code {code} after SIGTERM (expected 0)"));
                }
                let healing = Instant::now();
                cluster.start(node).await?;
                let took = wait_recovered(cluster, node, healing, RECOVERY_BOUND).await?;
                worst = worst.max(took);
            }
            out.notes.push(format!("drain+stop+start of each node; exit codes {}", exits.join(",")));
            out.recovery = Some(worst);
        }
        Fault::Partition => {
            let victim = cluster.leader_of(0, &all, Duration::from_secs(30)).await?;
            let began = Instant::now();
            cluster.disconnect(victim).await?;
            let majority: Vec<NodeId> = all.iter().copied().filter(|n| *n != victim).collect();
            match cluster.leader_of(0, &majority, FAULT_DURATION).await {
                Ok(l) => out.notes.push(format!("isolated node {victim} (metadata leader); node {l} took over in {:.1}s", began.elapsed().as_secs_f64())),
                Err(e) => out.errors.push(format!("no new metadata leader while node {victim} was isolated: {e:#}")),
            }
            tokio::time::sleep(FAULT_DURATION.saturating_sub(began.elapsed())).await;
            let healing = Instant::now();
            cluster.connect_network(victim).await?;
            out.recovery = Some(wait_recovered(cluster, victim, healing, RECOVERY_BOUND).await?);
        }
        Fault::Pause => {
            let victim = cluster.leader_of(1, &all, Duration::from_secs(30)).await?;
            out.notes.push(format!("paused node {victim} (leader of shard 1)"));
            cluster.pause(victim).await?;
            tokio::time::sleep(FAULT_DURATION).await;
            let healing = Instant::now();
            cluster.unpause(victim).await?;
            out.recovery = Some(wait_recovered(cluster, victim, healing, RECOVERY_BOUND).await?);
        }
        Fault::FullDisk => {
            let node = DISK_NODE;
            let enospc_before = cluster.log_count(node, ENOSPC_TEXT).await?;
            let (used, size) = cluster.disk_usage(node)?;
            let filled = cluster.fill_disk(node)?;
            let full_at = Instant::now();
            // Keep it full (the node may free space: compactions, purged logs) until the node
            // meets it, under the heavy load.
            let mut felt = None;
            while full_at.elapsed() < ENOSPC_WAIT_BOUND {
                tokio::time::sleep(Duration::from_millis(500)).await;
                cluster.fill_disk(node)?;
                if cluster.log_count(node, ENOSPC_TEXT).await? > enospc_before {
                    felt = Some(full_at.elapsed());
                    break;
                }
            }
            out.notes.push(format!("node {node}: {} of {} MiB used, filled {} MiB until ENOSPC", used >> 20, size >> 20, filled >> 20));
            match felt {
                Some(after) => out.notes.push(format!("the node met ENOSPC {:.1}s later", after.as_secs_f64())),
                None => out.errors.push(format!("node {node} logged no {ENOSPC_TEXT:?} within {ENOSPC_WAIT_BOUND:?}: the full disk did not bite")),
            }
            // The load goes on for a while against the full disk.
            let held = Instant::now();
            let mut exited_while_full = None;
            while held.elapsed() < FAULT_DURATION {
                tokio::time::sleep(Duration::from_millis(500)).await;
                cluster.fill_disk(node)?;
                if exited_while_full.is_none() {
                    let state = cluster.state(node).await?;
                    if !state.running() {
                        exited_while_full = Some(state);
                    }
                }
            }
            cluster.free_disk(node)?;
            // The heavy load was only there to make the node meet the full disk.
            heavy_stop.store(true, Ordering::Relaxed);
            let healing = Instant::now();
            let enospc = cluster.log_count(node, ENOSPC_TEXT).await?.saturating_sub(enospc_before);
            out.notes.push(format!("{enospc} log line(s) with {ENOSPC_TEXT:?}; file deleted after {:.0}s of full disk", full_at.elapsed().as_secs_f64()));
            let state = cluster.state(node).await?;
            if !state.running() {
                trace(cluster.log_tail(node, 10).await);
                out.notes.push(format!("node exited with code {} while the disk was full; recovery: docker start", state.exit_code));
                cluster.start(node).await?;
            } else {
                match wait_recovered(cluster, node, Instant::now(), SELF_HEAL_GRACE).await {
                    Ok(_) => out.notes.push("node kept running and recovered by itself once space was freed".into()),
                    Err(e) => {
                        trace(format!("node {node} did not recover by itself: {e:#}"));
                        trace(cluster.log_tail(node, 10).await);
                        out.notes.push(format!(
                            "node kept running but did not recover by itself within {}s; recovery: docker restart",
                            SELF_HEAL_GRACE.as_secs()
                        ));
                        cluster.restart(node, Duration::from_secs(20)).await?;
                    }
                }
            }
            if let Some(s) = exited_while_full {
                trace(format!("node {node} exited while the disk was full: {s:?}"));
            }
            out.recovery = Some(wait_recovered(cluster, node, healing, RECOVERY_BOUND).await?);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The matrix
// ---------------------------------------------------------------------------------------------

struct Row {
    fault: &'static str,
    acked: usize,
    delivered: usize,
    lost: usize,
    duplicates: usize,
    redeliveries: usize,
    recovery: Option<Duration>,
    notes: Vec<String>,
    errors: Vec<String>,
}

impl Row {
    fn pass(&self) -> bool {
        self.acked > 0
            && self.lost == 0
            && self.duplicates == 0
            && self.recovery.is_some_and(|r| r <= RECOVERY_BOUND)
            && self.errors.is_empty()
    }
}

/// The row of `phase` from everything recorded so far.
fn tally(ledger: &Ledger, phase: usize, fault: Fault, out: Outcome) -> Row {
    let acked: BTreeMap<&str, (u32, u64)> =
        ledger.acked.iter().filter(|(id, _)| phase_of(id) == Some(phase)).map(|(id, (p, _))| (id.as_str(), *p)).collect();
    let mut positions: BTreeMap<&str, BTreeSet<(u32, u64)>> = BTreeMap::new();
    let mut first_delivery: HashMap<&str, &Received> = HashMap::new();
    let mut deliveries = 0usize;
    let mut retried_attempts = 0usize;
    for d in ledger.deliveries.iter().filter(|d| phase_of(&d.id) == Some(phase)) {
        positions.entry(d.id.as_str()).or_default().insert(d.pos);
        first_delivery.entry(d.id.as_str()).or_insert(d);
        deliveries += 1;
        if d.attempt > 1 {
            retried_attempts += 1;
        }
    }
    let distinct_deliveries: usize = positions.values().map(BTreeSet::len).sum();
    let delivered = positions.len();
    let lost: Vec<&str> = acked.keys().copied().filter(|id| !positions.contains_key(id)).collect();
    // An id's acknowledged position counts too: delivered elsewhere is a second copy.
    for (id, p) in &acked {
        positions.entry(id).or_default().insert(*p);
    }
    let duplicates: Vec<(&str, &BTreeSet<(u32, u64)>)> = positions.iter().filter(|(_, ps)| ps.len() > 1).map(|(id, ps)| (*id, ps)).collect();
    let mut notes = out.notes;
    let mut errors = out.errors;
    if let Some(given_up) = ledger.given_up.get(&phase) {
        notes.push(format!("{given_up} batch(es) never acknowledged within {}s of retries", PUBLISH_BUDGET.as_secs()));
    }
    if retried_attempts > 0 {
        notes.push(format!("{retried_attempts} deliveries with attempt > 1"));
    }
    // Publish acknowledged → first delivered: the slowest, and any past the delivery bound.
    let mut waits: Vec<(Duration, &str)> = ledger
        .acked
        .iter()
        .filter(|(id, _)| phase_of(id) == Some(phase))
        .filter_map(|(id, (_, at))| first_delivery.get(id.as_str()).map(|d| (d.at.saturating_duration_since(*at), id.as_str())))
        .collect();
    waits.sort();
    // Deliveries usually come before the publisher has its answer; say so only when one lagged.
    if let Some((slowest, id)) = waits.last().filter(|(w, _)| *w >= Duration::from_secs(1)) {
        notes.push(format!("slowest first delivery {:.1}s after its publish was acknowledged ({id})", slowest.as_secs_f64()));
    }
    let late: Vec<String> = waits
        .iter()
        .filter(|(w, _)| *w > DELIVERY_BOUND)
        .map(|(w, id)| format!("{id} at {:?} after {:.0}s, attempt {}", acked[id], w.as_secs_f64(), first_delivery[id].attempt))
        .collect();
    if !late.is_empty() {
        errors.push(format!("{} acknowledged message(s) delivered only after {}s: {}", late.len(), DELIVERY_BOUND.as_secs(), late.join(", ")));
    }
    if !lost.is_empty() {
        errors.push(format!("lost (first 10): {:?}", &lost[..lost.len().min(10)]));
    }
    if !duplicates.is_empty() {
        errors.push(format!("stored at several positions (first 5): {:?}", &duplicates[..duplicates.len().min(5)]));
    }
    Row {
        fault: fault.name(),
        acked: acked.len(),
        delivered,
        lost: lost.len(),
        duplicates: duplicates.len(),
        redeliveries: deliveries - distinct_deliveries,
        recovery: out.recovery,
        notes,
        errors,
    }
}

/// Waits until every acknowledged message of `phase` was delivered, or `bound` passes.
async fn wait_delivered(ledger: &Mutex<Ledger>, phase: usize, bound: Duration) -> Result<()> {
    let deadline = Instant::now() + bound;
    loop {
        let missing = {
            let l = lock(ledger);
            let delivered: std::collections::HashSet<&str> =
                l.deliveries.iter().filter(|d| phase_of(&d.id) == Some(phase)).map(|d| d.id.as_str()).collect();
            l.acked
                .iter()
                .filter(|(id, _)| phase_of(id) == Some(phase) && !delivered.contains(id.as_str()))
                .map(|(id, (p, _))| format!("{id} at {p:?}"))
                .collect::<Vec<_>>()
        };
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} acknowledged messages of phase {phase} not delivered within {bound:?} (first: {:?})", missing.len(), &missing[..missing.len().min(5)]);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn print_table(rows: &[Row]) {
    let header = ["fault", "published (acked)", "delivered", "lost", "duplicates", "redeliveries", "recovery s", "verdict"];
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            [
                r.fault.to_owned(),
                r.acked.to_string(),
                r.delivered.to_string(),
                r.lost.to_string(),
                r.duplicates.to_string(),
                r.redeliveries.to_string(),
                r.recovery.map(|d| format!("{:.1}", d.as_secs_f64())).unwrap_or_else(|| "-".into()),
                if r.pass() { "PASS".into() } else { "FAIL".into() },
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cols: Vec<&str>| -> String {
        let parts: Vec<String> = cols.iter().zip(&widths).enumerate().map(|(i, (c, &w))| if i == 0 { format!("{c:<w$}") } else { format!("{c:>w$}") }).collect();
        format!("| {} |", parts.join(" | "))
    };
    println!();
    println!("chaos matrix (3 containers of the kerwen image; recovery = healing step to all /readyz 200 and the faulted node caught up; bound {}s)", RECOVERY_BOUND.as_secs());
    println!("{}", line(header.to_vec()));
    println!("|{}|", widths.iter().map(|w| "-".repeat(w + 2)).collect::<Vec<_>>().join("|"));
    for row in &cells {
        println!("{}", line(row.iter().map(String::as_str).collect()));
    }
    println!();
    for r in rows {
        println!("- {}: {}", r.fault, r.notes.join("; "));
        for e in &r.errors {
            println!("  ERROR: {e}");
        }
    }
    println!();
}

async fn create_mailbox(cluster: &DockerCluster) -> Result<()> {
    let req = CreateMailboxRequest {
        service: MAILBOX.to_owned(),
        partitions: 4,
        // Short leases and back-off: a delivery stranded on a stream through a faulted node is
        // redelivered within seconds; many attempts, so nothing goes to the dead letters.
        lease_ms: 10_000,
        max_attempts: 1000,
        backoff_initial_ms: 500,
        backoff_max_ms: 2_000,
        ..Default::default()
    };
    let mut client = cluster.client_from(0).await?;
    let info = tokio::time::timeout(Duration::from_secs(30), client.create_mailbox_with(req))
        .await
        .map_err(|_| anyhow!("CreateMailbox timed out"))?
        .map_err(|s| anyhow!("CreateMailbox: {s:?}"))?;
    trace(format!("mailbox {MAILBOX} created: partitions on shards {:?}", info.partition_shards));
    for node in cluster.node_ids() {
        harness::eventually(&format!("mailbox known on node {node}"), Duration::from_secs(30), || async {
            let mut c = cluster.client_of(node).await?;
            match tokio::time::timeout(Duration::from_secs(5), c.describe_mailbox(MAILBOX)).await {
                Ok(Ok(_)) => Ok(Some(())),
                Ok(Err(s)) => Err(anyhow!("DescribeMailbox: {s:?}")),
                Err(_) => Err(anyhow!("DescribeMailbox timed out")),
            }
        })
        .await?;
    }
    Ok(())
}

async fn matrix(cluster: Arc<DockerCluster>, rows: &Mutex<Vec<Row>>) -> Result<()> {
    create_mailbox(&cluster).await?;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let consumer_stop = Arc::new(AtomicBool::new(false));
    let consumer = tokio::spawn(consume(cluster.clone(), ledger.clone(), consumer_stop.clone()));
    let mut result = Ok(());
    let mut outcomes = Vec::new();
    for (i, fault) in Fault::ALL.into_iter().enumerate() {
        let phase = i + 1;
        trace(format!("===== fault {phase}: {} =====", fault.name()));
        let stop = Arc::new(AtomicBool::new(false));
        let heavy_stop = Arc::new(AtomicBool::new(false));
        let mut loads = vec![(LIGHT, stop.clone()); PRODUCERS];
        if matches!(fault, Fault::FullDisk) {
            loads.push((HEAVY, heavy_stop.clone()));
        }
        let producers: Vec<_> = loads
            .into_iter()
            .enumerate()
            .map(|(p, (load, stop))| tokio::spawn(produce(cluster.clone(), ledger.clone(), phase, p, load, stop)))
            .collect();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut out = Outcome::default();
        let faulted = run_fault(&cluster, fault, &mut out, &heavy_stop).await;
        if let Err(e) = &faulted {
            out.errors.push(format!("{e:#}"));
        }
        // Load goes on a little on the healed cluster, then stops; an in-flight batch ends
        // within its publish budget.
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, Ordering::Relaxed);
        heavy_stop.store(true, Ordering::Relaxed);
        for p in producers {
            if tokio::time::timeout(PUBLISH_BUDGET + Duration::from_secs(15), p).await.is_err() {
                out.errors.push("a producer did not stop in time".into());
            }
        }
        if let Err(e) = wait_delivered(&ledger, phase, DELIVERY_BOUND).await {
            out.errors.push(format!("{e:#}"));
        }
        // A quiet moment, so redeliveries caused by this fault are seen in its row.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let row = tally(&lock(&ledger), phase, fault, out.clone());
        outcomes.push((phase, fault, out));
        trace(format!(
            "fault {phase} ({}): acked {} delivered {} lost {} duplicates {} redeliveries {} recovery {:?} -> {}",
            row.fault,
            row.acked,
            row.delivered,
            row.lost,
            row.duplicates,
            row.redeliveries,
            row.recovery,
            if row.pass() { "PASS" } else { "FAIL" }
        ));
        rows.lock().unwrap_or_else(|e| e.into_inner()).push(row);
        if faulted.is_err() {
            // The cluster may not be healthy: the next faults would say nothing.
            result = faulted.context(format!("fault {phase} ({})", fault.name()));
            break;
        }
    }
    consumer_stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(10), consumer).await;
    // Deliveries that came after a row was counted (late redeliveries, stragglers) count too:
    // every row again, from the final records.
    let final_rows: Vec<Row> = {
        let l = lock(&ledger);
        outcomes.into_iter().map(|(phase, fault, out)| tally(&l, phase, fault, out)).collect()
    };
    *rows.lock().unwrap_or_else(|e| e.into_inner()) = final_rows;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Docker engine and the kerwen:dev image: run scripts/chaos"]
async fn chaos_matrix_on_real_containers() {
    let wall = Instant::now();
    let image = std::env::var("KERWEN_CHAOS_IMAGE").unwrap_or_else(|_| "kerwen:dev".to_owned());
    DockerCluster::engine_has_image(&image).await.expect("Docker engine and image");
    let cluster = Arc::new(
        DockerCluster::builder()
            .tmpfs_data_dir(DISK_NODE, DISK_BYTES)
            // Quick enough shutdowns for the rolling restart, within docker stop's 20 s.
            .env("KERWEN_SHUTDOWN_DRAIN_MS", "5000")
            .start()
            .await
            .expect("container cluster start"),
    );
    let rows = Mutex::new(Vec::new());
    let outcome = match tokio::time::timeout(MATRIX_BOUND, matrix(cluster.clone(), &rows)).await {
        Ok(r) => r,
        Err(_) => Err(anyhow!("the chaos matrix did not finish within {MATRIX_BOUND:?}")),
    };
    let rows = rows.into_inner().unwrap_or_else(|e| e.into_inner());
    print_table(&rows);
    println!("chaos: wall time of the matrix test {:.0}s", wall.elapsed().as_secs_f64());
    let failing: Vec<&str> = rows.iter().filter(|r| !r.pass()).map(|r| r.fault).collect();
    let missing = Fault::ALL.len() - rows.len();
    if outcome.is_err() || !failing.is_empty() || missing > 0 {
        for id in cluster.node_ids() {
            eprintln!("{}", cluster.log_tail(id, 30).await);
        }
    }
    if let Err(e) = outcome {
        panic!("chaos matrix aborted: {e:#}");
    }
    assert!(failing.is_empty(), "faults failing: {failing:?}");
    assert_eq!(missing, 0, "not every fault ran");
}
