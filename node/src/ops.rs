//! The operations port: plain HTTP for orchestrators and monitoring, apart from the mutual-TLS
//! APIs so that probes and scrapers need no client certificate. It serves nothing a client
//! could use to read or change data.
//!
//! - `GET /livez`: 200 while the process serves.
//! - `GET /readyz`: 200 once the node has joined the cluster and every group it hosts has a
//!   leader and has applied what it holds; 503 with the reason otherwise.
//! - `GET|POST /drain-leadership`: hands every group this node leads to the others and stops
//!   campaigning (a preStop hook before SIGTERM); 200 once it leads none, 503 if some are
//!   still led after [`DRAIN_TIMEOUT`].
//! - `GET /metrics`: Prometheus text. Counters and histograms of the hot paths are recorded
//!   where they happen (`metrics` macros, also in the broker library); gauges of Raft, storage,
//!   mailboxes and certificates are sampled here every [`SAMPLE_INTERVAL`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use kerwen_broker::model::{GroupId, NodeId, METADATA_GROUP};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;

use crate::runtime::{hosts_per, leads_per, matched_per, now_unix_ms, NodeRuntime};

/// How often gauges are sampled.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Entries a group may hold appended but not applied and still count as caught up.
const READY_MAX_APPLY_LAG: u64 = 1_000;
/// How long a leader may go without a quorum's answer and still count as ready (two
/// election timeouts at most; heartbeats go every 500 ms).
const READY_MAX_QUORUM_SILENCE_MS: u64 = 5_000;
/// Entries a follower may be behind its leader and still count towards a healthy quorum.
const QUORUM_MAX_REPLICATION_LAG: u64 = 10_000;
/// Per-mailbox gauges read partition records: sample them less often than Raft's.
const MAILBOX_SAMPLE_EVERY: u64 = 5;
/// Walking the data directory for its size: every so many samples.
const DISK_SAMPLE_EVERY: u64 = 10;

/// The process's Prometheus recorder, installed on first use. Several nodes in one process
/// (tests, the embedded load generator) share it.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            const SECONDS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
            const COUNTS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0, 16384.0];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full("kerwen_storage_entries_per_fsync".into()), COUNTS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full("kerwen_raft_groups_per_append_batch".into()), COUNTS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full("kerwen_evidence_messages_per_signature".into()), COUNTS));
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                // Only reachable with an empty bucket list, which the constants are not.
                Err(e) => {
                    tracing::error!(error = %e, "metric buckets refused; histograms fall back to summaries");
                    PrometheusBuilder::new().build_recorder()
                }
            };
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("another metrics recorder is installed; /metrics shows only what it does not take");
            }
            handle
        })
        .clone()
}

/// Serves the operations port until `stop` fires, and samples gauges meanwhile.
pub async fn serve(listener: tokio::net::TcpListener, runtime: Arc<NodeRuntime>, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let handle = prometheus();
    spawn_sampler(runtime.clone(), handle.clone(), stop.clone());
    let app = Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .route("/drain-leadership", get(drain).post(drain))
        .with_state(OpsState { runtime, handle });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}

#[derive(Clone)]
struct OpsState {
    runtime: Arc<NodeRuntime>,
    handle: PrometheusHandle,
}

async fn readyz(State(state): State<OpsState>) -> (StatusCode, String) {
    match readiness(&state.runtime) {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
    }
}

/// How long `/drain-leadership` waits for successors (within a preStop hook's grace period).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

async fn drain(State(state): State<OpsState>) -> (StatusCode, String) {
    match state.runtime.drain_leadership(DRAIN_TIMEOUT).await.as_slice() {
        [] => (StatusCode::OK, "drained: this node leads no group\n".into()),
        led => (StatusCode::SERVICE_UNAVAILABLE, format!("still leading groups {led:?} after {DRAIN_TIMEOUT:?}\n")),
    }
}

async fn render_metrics(State(state): State<OpsState>) -> ([(axum::http::header::HeaderName, &'static str); 1], String) {
    (
        [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.handle.render(),
    )
}

/// Why this node should not get client traffic yet, if it should not: it is not a member of
/// the cluster, or a group it hosts has no leader or has not applied what it holds.
pub fn readiness(runtime: &NodeRuntime) -> Result<(), String> {
    let node = runtime.node_id();
    if runtime.is_draining() {
        return Err("draining: this node is handing its groups over before it stops".into());
    }
    for (group, raft) in runtime.all_rafts() {
        let metrics = raft.metrics();
        let m = metrics.borrow();
        if m.running_state.is_err() {
            return Err(format!("group {group} has stopped"));
        }
        if !hosts_per(&m, node) {
            // A node hosts the replicas placed on it, and every node the metadata group.
            if group == METADATA_GROUP {
                return Err(format!("node {node} is not (yet) a member of the cluster's metadata group"));
            }
            continue;
        }
        if m.current_leader.is_none() {
            return Err(format!("group {group} has no leader"));
        }
        // openraft 0.9 keeps a leader that lost its quorum leading: ask when a quorum last
        // answered it.
        let leading = leads_per(&m, node);
        let alone = m.membership_config.membership().voter_ids().count() <= 1;
        if leading && !alone && m.millis_since_quorum_ack.is_none_or(|ms| ms > READY_MAX_QUORUM_SILENCE_MS) {
            return Err(format!("group {group}: this node leads it but no quorum has answered recently"));
        }
        let applied = m.last_applied.map_or(0, |l| l.index);
        let lag = m.last_log_index.unwrap_or(0).saturating_sub(applied);
        if lag > READY_MAX_APPLY_LAG {
            return Err(format!("group {group} has {lag} entries to apply"));
        }
    }
    Ok(())
}

/// What the sampler remembers between rounds to turn observations into counters.
#[derive(Default)]
struct Sampled {
    /// Per group: the (term, leader) last seen and the last snapshot's index.
    leaders: HashMap<GroupId, (u64, Option<NodeId>)>,
    snapshots: HashMap<GroupId, Option<u64>>,
    stalled: bool,
}

fn spawn_sampler(runtime: Arc<NodeRuntime>, handle: PrometheusHandle, mut stop: watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut sampled = Sampled::default();
        // Event counters show from the start, at zero, rather than appear with the first event.
        metrics::counter!("kerwen_rocksdb_stalls_total").absolute(0);
        let mut every = tokio::time::interval(SAMPLE_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for round in 0u64.. {
            tokio::select! {
                _ = every.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            sample_raft(&runtime, &mut sampled);
            sample_storage(&runtime, &mut sampled, round % DISK_SAMPLE_EVERY == 0);
            if round % MAILBOX_SAMPLE_EVERY == 0 {
                sample_mailboxes(&runtime);
            }
            sample_evidence_and_tls(&runtime);
            // Histograms keep their samples until drained; draining once a second bounds memory.
            handle.run_upkeep();
        }
    });
}

fn sample_raft(runtime: &NodeRuntime, sampled: &mut Sampled) {
    let node = runtime.node_id();
    let mut under_quorum = 0u64;
    for (group, raft) in runtime.all_rafts() {
        let metrics = raft.metrics();
        let m = metrics.borrow();
        if !hosts_per(&m, node) {
            // No replica here: the group's own replicas report it.
            continue;
        }
        let label = group.to_string();
        let leading = leads_per(&m, node);
        metrics::gauge!("kerwen_raft_term", "group" => label.clone()).set(m.current_term as f64);
        metrics::gauge!("kerwen_raft_is_leader", "group" => label.clone()).set(if leading { 1.0 } else { 0.0 });
        metrics::gauge!("kerwen_raft_has_leader", "group" => label.clone()).set(if m.current_leader.is_some() { 1.0 } else { 0.0 });
        let last = m.last_log_index.unwrap_or(0);
        let applied = m.last_applied.map_or(0, |l| l.index);
        let first = m.purged.map_or(0, |l| l.index + 1);
        metrics::gauge!("kerwen_raft_apply_lag_entries", "group" => label.clone()).set(last.saturating_sub(applied) as f64);
        metrics::gauge!("kerwen_raft_log_entries", "group" => label.clone()).set(last.saturating_sub(first).saturating_add(1) as f64);

        let seen = (m.current_term, m.current_leader);
        let previous = sampled.leaders.insert(group, seen);
        if previous.is_some_and(|p| p != seen && seen.1.is_some()) {
            metrics::counter!("kerwen_raft_leader_changes_total", "group" => label.clone()).increment(1);
        }
        let snapshot = m.snapshot.map(|l| l.index);
        if sampled.snapshots.insert(group, snapshot).is_some_and(|before| before != snapshot) {
            metrics::counter!("kerwen_raft_snapshots_total", "group" => label.clone()).increment(1);
        }

        // Commit lag as the leader sees it: how far the slowest voter of a quorum trails.
        let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
        let quorum = voters.len() / 2 + 1;
        if leading {
            let matched = |id: &NodeId| -> Option<u64> {
                if *id == node {
                    return Some(last);
                }
                matched_per(&m, *id)
            };
            let mut behind: Vec<u64> = voters.iter().map(|id| matched(id).map_or(u64::MAX, |i| last.saturating_sub(i))).collect();
            behind.sort_unstable();
            let commit_lag = behind.get(quorum - 1).copied().unwrap_or(u64::MAX);
            metrics::gauge!("kerwen_raft_commit_lag_entries", "group" => label).set(if commit_lag == u64::MAX { f64::NAN } else { commit_lag as f64 });
            let healthy = behind.iter().filter(|b| **b <= QUORUM_MAX_REPLICATION_LAG).count();
            if healthy < quorum {
                under_quorum += 1;
            }
        } else {
            metrics::gauge!("kerwen_raft_commit_lag_entries", "group" => label).set(0.0);
            // A group with no leader cannot have a quorum; count it once, on its lowest member.
            if m.current_leader.is_none() && voters.iter().min() == Some(&node) {
                under_quorum += 1;
            }
        }
    }
    metrics::gauge!("kerwen_raft_replicas_under_quorum").set(under_quorum as f64);
    // Shards are placed statically until the scaling work lands: no move is ever running.
    metrics::gauge!("kerwen_shard_moves_in_progress").set(0.0);
}

fn sample_storage(runtime: &NodeRuntime, sampled: &mut Sampled, walk_disk: bool) {
    let db = runtime.store.db();
    let stopped = db.property_int_value("rocksdb.is-write-stopped").ok().flatten().unwrap_or(0) > 0;
    let delayed = db.property_int_value("rocksdb.actual-delayed-write-rate").ok().flatten().unwrap_or(0) > 0;
    let stalled = stopped || delayed;
    if stalled && !sampled.stalled {
        metrics::counter!("kerwen_rocksdb_stalls_total").increment(1);
    }
    sampled.stalled = stalled;
    metrics::gauge!("kerwen_runtime_scheduling_delay_seconds").set(runtime.store.scheduling_delay().as_secs_f64());
    metrics::gauge!("kerwen_storage_gather_quiet_seconds").set(runtime.store.gather_window().quiet.as_secs_f64());
    if walk_disk {
        let dir = &runtime.config.data_dir;
        metrics::gauge!("kerwen_storage_disk_bytes").set(dir_size(dir) as f64);
        if let Some((free, capacity)) = filesystem_space(dir) {
            metrics::gauge!("kerwen_storage_disk_free_bytes").set(free as f64);
            metrics::gauge!("kerwen_storage_disk_capacity_bytes").set(capacity as f64);
        }
    }
}

/// Per mailbox, over the shards this node leads (other nodes report zero, so a sum over the
/// cluster counts each message once): pending messages, leases in flight, dead letters.
fn sample_mailboxes(runtime: &NodeRuntime) {
    let now = now_unix_ms();
    // The shards led now, each with its leases in flight per mailbox.
    let led: HashMap<GroupId, _> = runtime
        .led_shards()
        .map(|(group, shard)| (*group, (shard, shard.view.in_flight_by_mailbox(now))))
        .collect();
    for info in runtime.meta_view().mailboxes() {
        let (mut pending, mut leased, mut dead) = (0u64, 0u64, 0u64);
        for (group, partitions) in info.partitions_by_shard() {
            let Some((shard, in_flight)) = led.get(&group) else { continue };
            pending += shard.view.stats(info.id, &partitions).map_or(0, |s| s.messages);
            leased += in_flight.get(&info.id).copied().unwrap_or(0) as u64;
        }
        for (group, partitions) in info.dead_letter_partitions_by_shard() {
            if let Some((shard, _)) = led.get(&group) {
                dead += shard.view.stats(info.id, &partitions).map_or(0, |s| s.messages);
            }
        }
        let mailbox = info.service.clone();
        metrics::gauge!("kerwen_consumer_lag_messages", "mailbox" => mailbox.clone()).set(pending as f64);
        metrics::gauge!("kerwen_leases_in_flight", "mailbox" => mailbox.clone()).set(leased as f64);
        metrics::gauge!("kerwen_dead_letters", "mailbox" => mailbox).set(dead as f64);
    }
}

fn sample_evidence_and_tls(runtime: &NodeRuntime) {
    let (used, budget) = runtime.evidence_usage();
    metrics::gauge!("kerwen_evidence_bytes").set(used as f64);
    metrics::gauge!("kerwen_evidence_budget_bytes").set(budget as f64);
    if let Some(not_after) = runtime.peers.tls().and_then(|tls| tls.certificate_not_after()) {
        metrics::gauge!("kerwen_tls_certificate_expiry_timestamp_seconds").set(not_after as f64);
    }
}

/// Bytes of the files under `dir` (RocksDB's files and the node's keys).
fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

/// Free (to unprivileged writers) and total bytes of the filesystem holding `dir`.
fn filesystem_space(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid NUL-terminated string and `stat` a writable statvfs.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    let block = stat.f_frsize as u64;
    Some((stat.f_bavail as u64 * block, stat.f_blocks as u64 * block))
}
