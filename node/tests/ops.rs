//! The operations port of real `kerwen serve` processes: every metric family an SRE relies on
//! shows on a loaded node with sane values and Prometheus names, and `/readyz` follows the
//! node's quorum while `/livez` stays up; draining and SIGTERM hand leadership over without
//! failing a client's publish.

mod harness;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use harness::{ack_all, consume_all_of, create_mailbox, eventually, message, publish_retry, Cluster, Consumer, ProcessCluster};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MAILBOX: &str = "TM/GOV/MINCOM/registry/ops";
const MESSAGES: usize = 40;

/// Families every node shows once it has served a publish, a delivery and an ack (on the
/// cluster as a whole: per-mailbox counters show on the node that did the work).
const FAMILIES: &[&str] = &[
    "kerwen_publish_messages_total",
    "kerwen_publish_bytes_total",
    "kerwen_delivered_messages_total",
    "kerwen_delivered_bytes_total",
    "kerwen_acked_messages_total",
    "kerwen_acked_bytes_total",
    "kerwen_exchanges_total",
    "kerwen_publish_duration_seconds",
    "kerwen_end_to_end_seconds",
    "kerwen_consumer_lag_messages",
    "kerwen_leases_in_flight",
    "kerwen_dead_letters",
    "kerwen_raft_term",
    "kerwen_raft_is_leader",
    "kerwen_raft_has_leader",
    "kerwen_raft_commit_lag_entries",
    "kerwen_raft_apply_lag_entries",
    "kerwen_raft_log_entries",
    "kerwen_raft_replicas_under_quorum",
    "kerwen_shard_moves_in_progress",
    "kerwen_raft_groups_per_append_batch",
    "kerwen_storage_fsyncs_total",
    "kerwen_storage_entries_per_fsync",
    "kerwen_storage_fsync_duration_seconds",
    "kerwen_storage_gather_quiet_seconds",
    "kerwen_runtime_scheduling_delay_seconds",
    "kerwen_storage_disk_bytes",
    "kerwen_storage_disk_free_bytes",
    "kerwen_storage_disk_capacity_bytes",
    "kerwen_rocksdb_stalls_total",
    "kerwen_evidence_batches_total",
    "kerwen_evidence_messages_per_signature",
    "kerwen_evidence_bytes",
    "kerwen_evidence_budget_bytes",
    "kerwen_tls_handshake_failures_total",
    "kerwen_tls_certificate_expiry_timestamp_seconds",
];

/// Bound on one GET of the operations port.
const HTTP_TIMEOUT: Duration = Duration::from_secs(15);

/// A GET of the operations port: the status code and the body.
async fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    harness::http_get(addr, path, HTTP_TIMEOUT).await
}

/// Sample lines of a Prometheus text page: `name{labels}` → value.
fn samples(page: &str) -> BTreeMap<String, f64> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Sum of the samples of one family (all label sets), excluding histogram buckets.
fn family_sum(samples: &BTreeMap<String, f64>, name: &str) -> f64 {
    samples.iter().filter(|(s, _)| s.as_str() == name || s.starts_with(&format!("{name}{{"))).map(|(_, v)| v).sum()
}

/// Every `# TYPE` line follows Prometheus naming: counters end in `_total`, and every family
/// is Kerwen's own.
fn check_naming(page: &str) -> Result<()> {
    for line in page.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut parts = line.split_whitespace().skip(2);
        let (name, kind) = (parts.next().context("TYPE name")?, parts.next().context("TYPE kind")?);
        ensure!(name.starts_with("kerwen_"), "{name} is not in the kerwen_ namespace");
        ensure!((kind == "counter") == name.ends_with("_total"), "{name} is a {kind}: only counters end in _total");
        if kind == "histogram" {
            // A duration, or a count per something (entries per fsync, groups per batch).
            ensure!(name.ends_with("_seconds") || name.contains("_per_"), "histogram {name} has no unit");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loaded_node_shows_every_metric_family_with_sane_values() {
    let cluster = ProcessCluster::builder().start().await.expect("cluster start");
    scenario_metrics(&cluster).await.expect("scenario failed");
}

async fn scenario_metrics(cluster: &ProcessCluster) -> Result<()> {
    create_mailbox(cluster, 1, MAILBOX, 4).await?;
    // Every publish through node 1, so the operational records below name it.
    let mut client = cluster.client(1).await?.without_direct_routing();
    let mut ids = HashSet::new();
    for chunk in 0..4 {
        let batch: Vec<_> = (0..MESSAGES / 4)
            .map(|i| message(format!("m-{chunk}-{i}"), MAILBOX, None, format!("payload {chunk} {i}").into_bytes()))
            .collect();
        ids.extend(batch.iter().map(|m| m.id.clone()));
        publish_retry(&mut client, &batch, Duration::from_secs(10), Duration::from_secs(30)).await?;
    }
    // One refused publish: a mailbox that does not exist.
    let refused = client.publish(vec![message("m-refused", NO_SUCH_MAILBOX, None, b"x".to_vec())]).await;
    ensure!(refused.is_err(), "a publish to a missing mailbox was accepted");
    let mut consumer = Consumer::open(&mut cluster.client(2).await?.without_direct_routing(), MAILBOX, 64).await?;
    let delivered = consume_all_of(&mut consumer, &ids, Duration::from_secs(30), Duration::from_millis(300)).await?;
    ack_all(&mut consumer, &delivered).await?;
    // A client without a certificate: one refused handshake on node 3's client port.
    let mut plain = tokio::net::TcpStream::connect(cluster.endpoint(3)).await?;
    plain.write_all(b"GET / HTTP/1.1\r\n\r\n").await?;
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut sink)).await;

    let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
    let pages = eventually("every family on the cluster's /metrics", Duration::from_secs(30), || async {
        let mut pages = BTreeMap::new();
        for node in cluster.node_ids() {
            let (status, page) = http_get(&cluster.http_endpoint(node), "/metrics").await?;
            ensure!(status == 200, "node {node}: /metrics answered {status}");
            pages.insert(node, page);
        }
        let all: String = pages.values().cloned().collect();
        let missing: Vec<_> = FAMILIES.iter().filter(|f| !all.contains(&format!("# TYPE {f} "))).collect();
        ensure!(missing.is_empty(), "missing families: {missing:?}");
        let acked: f64 = pages.values().map(|p| family_sum(&samples(p), "kerwen_acked_messages_total")).sum();
        ensure!(acked >= MESSAGES as f64, "acks counted so far: {acked}");
        // Gauges are sampled once a second, and on two busy cores a group may be between
        // leaders for a moment: wait until every node has seen a leader of every group.
        for (node, page) in &pages {
            let s = samples(page);
            for group in cluster.groups() {
                let has_leader = s.get(&format!("kerwen_raft_has_leader{{group=\"{group}\"}}")).copied();
                ensure!(has_leader == Some(1.0), "node {node}, group {group}: has_leader {has_leader:?}");
            }
            let under = family_sum(&s, "kerwen_raft_replicas_under_quorum");
            ensure!(under == 0.0, "node {node}: {under} groups under quorum on a healthy cluster");
        }
        Ok(Some(pages))
    })
    .await?;

    for (node, page) in &pages {
        check_naming(page).with_context(|| format!("node {node}"))?;
        let s = samples(page);
        ensure!(family_sum(&s, "kerwen_storage_fsyncs_total") > 0.0, "node {node}: no fsync counted");
        let expiry = family_sum(&s, "kerwen_tls_certificate_expiry_timestamp_seconds");
        ensure!(expiry > now_s, "node {node}: certificate expiry {expiry} is not in the future");
        let (free, capacity) = (family_sum(&s, "kerwen_storage_disk_free_bytes"), family_sum(&s, "kerwen_storage_disk_capacity_bytes"));
        ensure!(free > 0.0 && free <= capacity, "node {node}: disk free {free} of {capacity}");
        ensure!(family_sum(&s, "kerwen_storage_disk_bytes") > 0.0, "node {node}: empty data dir");
    }
    let sum = |family: &str| -> f64 { pages.values().map(|p| family_sum(&samples(p), family)).sum() };
    ensure!(sum("kerwen_publish_messages_total") == MESSAGES as f64, "published {}", sum("kerwen_publish_messages_total"));
    ensure!(sum("kerwen_delivered_messages_total") >= MESSAGES as f64, "delivered {}", sum("kerwen_delivered_messages_total"));
    ensure!(sum("kerwen_end_to_end_seconds_count") >= MESSAGES as f64, "end-to-end samples {}", sum("kerwen_end_to_end_seconds_count"));
    ensure!(sum("kerwen_evidence_batches_total") >= 1.0, "no signed batch counted");
    let handshakes = pages[&3].lines().any(|l| l.starts_with("kerwen_tls_handshake_failures_total{") && l.contains("port=\"client\""));
    ensure!(handshakes, "node 3 did not count the refused handshake");
    let lag = eventually("consumer lag back to zero", Duration::from_secs(30), || async {
        let mut lag = 0.0;
        for node in cluster.node_ids() {
            lag += family_sum(&samples(&http_get(&cluster.http_endpoint(node), "/metrics").await?.1), "kerwen_consumer_lag_messages");
        }
        Ok((lag == 0.0).then_some(lag))
    })
    .await?;
    ensure!(lag == 0.0);
    // Deliveries and acks are counted per sender too.
    let by_sender = format!("sender=\"{SENDER}\"");
    for family in ["kerwen_delivered_messages_total", "kerwen_acked_messages_total", "kerwen_acked_bytes_total"] {
        let labelled = pages.values().any(|p| p.lines().any(|l| l.starts_with(&format!("{family}{{")) && l.contains(&by_sender)));
        ensure!(labelled, "{family} has no series for sender {SENDER}");
    }
    scenario_opmon(cluster, &ids).await?;
    cluster.check_no_crash()
}

/// The subsystem the harness's default client acts as, the sender of the scenario's messages.
const SENDER: &str = "TM/GOV/MINCOM/registry";
const NO_SUCH_MAILBOX: &str = "TM/GOV/MINCOM/registry/nowhere";

/// Operational monitoring after `scenario_metrics`: any node answers for all of them, with a
/// record per publish (node 1), delivery and ack (node 2), the refused publish with its fault,
/// per-service health; a subsystem sees only its own exchanges; `kerwen opmon` prints them.
async fn scenario_opmon(cluster: &ProcessCluster, ids: &HashSet<String>) -> Result<()> {
    use kerwen_proto::v1::OperationalDataRequest;
    let query = |kind: &str| OperationalDataRequest { kind: kind.into(), limit: 10_000, ..Default::default() };
    let admin = cluster.admin_client(3).await?;
    let answer = eventually("every ack in the operational data", Duration::from_secs(30), || {
        let admin = admin.clone();
        async move {
            let r = admin.admin().operational_data(query("")).await?.into_inner();
            let acks = r.records.iter().filter(|e| e.kind == "ack").count();
            Ok((acks >= MESSAGES).then_some(r))
        }
    })
    .await?;
    ensure!(answer.unanswered.is_empty(), "nodes did not answer: {:?}", answer.unanswered);
    let of = |kind: &str| answer.records.iter().filter(|e| e.kind == kind && ids.contains(&e.message_id)).collect::<Vec<_>>();
    let published = of("publish");
    ensure!(published.len() == MESSAGES, "{} publish records for {MESSAGES} messages", published.len());
    for e in &published {
        ensure!(e.node == 1 && e.succeeded && e.sender == SENDER && e.client == SENDER, "publish record {e:?}");
        ensure!(e.recipient == MAILBOX && e.payload_bytes > 0 && e.accepted_unix_ms > 0 && !e.duplicate, "publish record {e:?}");
    }
    for kind in ["deliver", "ack"] {
        let records = of(kind);
        let messages: HashSet<&str> = records.iter().map(|e| e.message_id.as_str()).collect();
        ensure!(messages.len() == MESSAGES, "{kind} records cover {} of {MESSAGES} messages", messages.len());
        for e in records {
            ensure!(e.node == 2 && e.succeeded && e.sender == SENDER && e.attempt >= 1, "{kind} record {e:?}");
            ensure!(e.at_unix_ms >= e.accepted_unix_ms && e.duration_ms == (e.at_unix_ms - e.accepted_unix_ms) as u64, "{kind} record {e:?}");
        }
    }
    let refused: Vec<_> = answer.records.iter().filter(|e| e.message_id == "m-refused").collect();
    ensure!(refused.len() == 1 && !refused[0].succeeded && !refused[0].fault.is_empty(), "refused publish: {refused:?}");
    let health = answer.health.iter().find(|h| h.service == MAILBOX).context("no health of the mailbox")?;
    ensure!(health.successes == MESSAGES as u64 && health.failures == 0 && health.max_duration_ms >= health.min_duration_ms, "{health:?}");
    let missing = answer.health.iter().find(|h| h.service == NO_SUCH_MAILBOX).context("no health of the missing mailbox")?;
    ensure!(missing.failures == 1 && missing.last_failure_unix_ms > 0, "{missing:?}");

    // Filters, and a subsystem's view: its own traffic only.
    let failed = admin.admin().operational_data(OperationalDataRequest { failed_only: true, ..query("") }).await?.into_inner();
    ensure!(failed.records.iter().all(|e| !e.succeeded) && failed.records.len() == 1, "failed only: {:?}", failed.records);
    let own = cluster.client(1).await?.admin().operational_data(query("publish")).await?.into_inner();
    ensure!(own.records.len() == MESSAGES + 1, "the sender sees its {} publishes: {}", MESSAGES + 1, own.records.len());
    let stranger = "TM/GOV/MINEDU/schools";
    cluster.register(stranger).await?;
    let theirs = cluster.client_as(1, stranger).await?.admin().operational_data(query("")).await?.into_inner();
    ensure!(theirs.records.is_empty() && theirs.health.is_empty(), "a stranger sees {} records", theirs.records.len());

    // The CLI, as an operator.
    let endpoint = cluster.endpoint(2);
    let out = cluster.admin_cli(&["opmon", "--json", "--kind", "ack", "--sender", SENDER, "--endpoint", endpoint.as_str()]).output()?;
    ensure!(out.status.success(), "kerwen opmon: {}", String::from_utf8_lossy(&out.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let acks = printed["records"].as_array().context("records")?;
    ensure!(acks.len() >= MESSAGES && acks.iter().all(|e| e["kind"] == "ack"), "kerwen opmon printed {} acks", acks.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_quorum_and_livez_stays_up() {
    let cluster = ProcessCluster::builder().start().await.expect("cluster start");
    scenario_readiness(&cluster).await.expect("scenario failed");
}

async fn wait_ready(cluster: &ProcessCluster, node: u64, ready: bool) -> Result<String> {
    let what = format!("node {node} /readyz {}", if ready { "200" } else { "503" });
    eventually(&what, Duration::from_secs(45), || async {
        let (status, body) = http_get(&cluster.http_endpoint(node), "/readyz").await?;
        Ok(((status == 200) == ready && (status == 200 || status == 503)).then_some(body))
    })
    .await
}

async fn scenario_readiness(cluster: &ProcessCluster) -> Result<()> {
    for node in cluster.node_ids() {
        wait_ready(cluster, node, true).await?;
    }
    cluster.stop(2).await?;
    cluster.stop(3).await?;
    let why = wait_ready(cluster, 1, false).await?;
    ensure!(why.contains("not ready"), "{why}");
    let (live, _) = http_get(&cluster.http_endpoint(1), "/livez").await?;
    ensure!(live == 200, "/livez answered {live} while the node runs without a quorum");
    cluster.start(2).await?;
    cluster.start(3).await?;
    for node in cluster.node_ids() {
        wait_ready(cluster, node, true).await?;
    }
    match http_get(&cluster.http_endpoint(1), "/no-such-page").await? {
        (404, _) => {}
        (status, _) => bail!("an unknown path answered {status}"),
    }
    cluster.check_no_crash()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_leadership_hands_every_group_over_and_the_node_keeps_serving_clients() {
    let cluster = ProcessCluster::builder().start().await.expect("cluster start");
    scenario_drain(&cluster).await.expect("scenario failed");
}

async fn scenario_drain(cluster: &ProcessCluster) -> Result<()> {
    create_mailbox(cluster, 1, MAILBOX, 4).await?;
    let leaders = cluster.wait_leaders(&[1, 2, 3], &[], Duration::from_secs(30)).await?;
    // Drain the node leading the metadata group (it leads at least that one).
    let node = leaders[&0];
    let started = std::time::Instant::now();
    let (status, body) = http_get(&cluster.http_endpoint(node), "/drain-leadership").await?;
    ensure!(status == 200, "drain answered {status}: {body}");
    harness::trace(format!("node {node} drained in {:?}", started.elapsed()));
    let after = cluster.wait_leaders(&[1, 2, 3], &[node], Duration::from_secs(30)).await?;
    ensure!(after.values().all(|l| *l != node), "node {node} still leads: {after:?}");
    let (ready, why) = http_get(&cluster.http_endpoint(node), "/readyz").await?;
    ensure!(ready == 503 && why.contains("draining"), "a draining node must not be ready: {ready} {why}");
    // Its client port still works: requests are forwarded to the new leaders.
    let mut client = cluster.client(node).await?;
    let batch: Vec<_> = (0..8).map(|i| message(format!("after-drain-{i}"), MAILBOX, None, b"x".to_vec())).collect();
    let ids: HashSet<String> = batch.iter().map(|m| m.id.clone()).collect();
    publish_retry(&mut client, &batch, Duration::from_secs(10), Duration::from_secs(30)).await?;
    let mut consumer = Consumer::open(&mut cluster.client(node).await?.without_direct_routing(), MAILBOX, 64).await?;
    let delivered = consume_all_of(&mut consumer, &ids, Duration::from_secs(30), Duration::from_millis(300)).await?;
    ack_all(&mut consumer, &delivered).await?;
    // Draining again is harmless and answers at once.
    let (again, _) = http_get(&cluster.http_endpoint(node), "/drain-leadership").await?;
    ensure!(again == 200, "a second drain answered {again}");
    cluster.check_no_crash()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_a_leader_under_load_fails_no_publish_and_exits_within_10s() {
    let cluster = ProcessCluster::builder().shutdown_drain_ms(5_000).start().await.expect("cluster start");
    scenario_sigterm(&cluster).await.expect("scenario failed");
}

/// Publishes batches of 10 through a client of every node until `stop`; every batch must be
/// accepted within the client's retry budget. Returns the accepted ids and the failures.
async fn produce_until(cluster: &ProcessCluster, producer: usize, stop: Arc<AtomicBool>) -> Result<(Vec<String>, Vec<String>)> {
    let mut client = cluster.client_any().await?;
    let (mut accepted, mut failures) = (Vec::new(), Vec::new());
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let batch: Vec<_> = (0..10).map(|i| message(format!("p{producer}-{n}-{i}"), MAILBOX, None, vec![b'x'; 256])).collect();
        n += 1;
        match publish_retry(&mut client, &batch, Duration::from_secs(5), Duration::from_secs(20)).await {
            Ok(_) => accepted.extend(batch.into_iter().map(|m| m.id)),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    Ok((accepted, failures))
}

async fn scenario_sigterm(cluster: &ProcessCluster) -> Result<()> {
    create_mailbox(cluster, 1, MAILBOX, 4).await?;
    let leaders = cluster.wait_leaders(&[1, 2, 3], &[], Duration::from_secs(30)).await?;
    let mut led: BTreeMap<u64, usize> = BTreeMap::new();
    for node in leaders.values() {
        *led.entry(*node).or_default() += 1;
    }
    let victim = led.iter().max_by_key(|(_, n)| **n).map(|(node, _)| *node).context("no leader")?;
    let stop = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..2).map(|p| produce_until(cluster, p, stop.clone())).collect();
    let chaos = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let started = std::time::Instant::now();
        let stopped = cluster.stop(victim).await;
        let took = started.elapsed();
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, Ordering::Relaxed);
        stopped.map(|()| took)
    };
    let (took, outcomes) = tokio::join!(chaos, futures::future::join_all(producers));
    let took = took?;

    ensure!(took < Duration::from_secs(10), "node {victim} took {took:?} to exit after SIGTERM");
    let mut ids = HashSet::new();
    for outcome in outcomes {
        let (accepted, failures) = outcome?;
        ensure!(failures.is_empty(), "{} publishes failed despite retries; first: {}", failures.len(), failures[0]);
        ids.extend(accepted);
    }
    ensure!(ids.len() >= 100, "only {} messages published under load", ids.len());
    harness::trace(format!("node {victim} (leading {} groups) exited {took:?} after SIGTERM; {} messages published", led[&victim], ids.len()));
    // Nothing accepted is lost: every message is delivered by the remaining nodes.
    let survivor = cluster.running()[0];
    let mut consumer = Consumer::open(&mut cluster.client(survivor).await?.without_direct_routing(), MAILBOX, 1000).await?;
    let delivered = consume_all_of(&mut consumer, &ids, Duration::from_secs(60), Duration::from_millis(300)).await?;
    ack_all(&mut consumer, &delivered).await?;
    cluster.start(victim).await?;
    cluster.check_no_crash()
}
