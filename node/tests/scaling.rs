//! Adding and removing nodes (issue 7): a cluster grown from 3 to 5 nodes under load ends
//! with balanced replicas; a drained node under load gives up every replica and is removed
//! and killed without loss; the metadata leader killed in the middle of a move leaves every
//! group whole; `kerwen node shrink N` (the Helm chart's scale-down hook) removes every node
//! above N and does nothing the second time; a client sends publishes straight to the shard
//! leaders and keeps doing so after a leader dies, and opens a subscription at its shard's
//! leader; a mailbox grows and every ordering key
//! keeps its partition and order. Real `kerwen serve` processes; every check polls with a
//! bound.

mod harness;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use harness::*;
use kerwen_node::cli::node::balanced;
use kerwen_node::client::Client;
use kerwen_proto::v1::{ClusterStatusResponse, Message};
use tonic::Code;

const MAILBOX: &str = "TM/GOV/MINCOM/registry/scaling";
const BATCH: usize = 20;
/// Longest the moves of a test may take to settle.
const SETTLE: Duration = Duration::from_secs(180);

fn builder(nodes: u64, spare: u64) -> ClusterBuilder {
    ProcessCluster::builder().nodes(nodes).spare_nodes(spare).shards(6).default_partitions(6).lease_ms(5_000).request_timeout_ms(5_000)
}

/// What the producer had acknowledged and what the consumer received.
#[derive(Default)]
struct Outcome {
    acked: Vec<String>,
    /// Ids of batches published more than once (a retry may have stored the first attempt).
    ambiguous: HashSet<String>,
    /// (id, attempt) of every delivery.
    delivered: Vec<(String, u32)>,
}

/// A producer publishing batches through `producer_nodes` and a consumer acking everything
/// it receives through `consumer_node`, both until stopped.
struct Load {
    stop_producer: Arc<AtomicBool>,
    stop_consumer: Arc<AtomicBool>,
    batches: Arc<AtomicUsize>,
    delivered: Arc<Mutex<Vec<(String, u32)>>>,
    producer: tokio::task::JoinHandle<Result<Outcome>>,
    consumer: tokio::task::JoinHandle<Result<()>>,
}

impl Load {
    async fn start(cluster: &ProcessCluster, producer_nodes: &[NodeId], consumer_nodes: &[NodeId]) -> Result<Self> {
        let (stop_producer, stop_consumer) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let batches = Arc::new(AtomicUsize::new(0));
        let delivered = Arc::new(Mutex::new(Vec::new()));
        let tls = cluster.subsystem_tls(TEST_SUBSYSTEM)?;
        let mut publisher = cluster.client_with(producer_nodes, tls.clone()).await?;
        let producer = {
            let (stop, batches) = (stop_producer.clone(), batches.clone());
            tokio::spawn(async move {
                let mut out = Outcome::default();
                let mut b = 0;
                while !stop.load(Ordering::SeqCst) {
                    let msgs = batch("s", MAILBOX, b * BATCH, BATCH, 16);
                    let (_, attempts) = publish_retry(&mut publisher, &msgs, Duration::from_secs(10), Duration::from_secs(60))
                        .await
                        .with_context(|| format!("batch {b}"))?;
                    for m in &msgs {
                        out.acked.push(m.id.clone());
                        if attempts > 1 {
                            out.ambiguous.insert(m.id.clone());
                        }
                    }
                    batches.fetch_add(1, Ordering::SeqCst);
                    b += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(out)
            })
        };
        // Pinned to `consumer_nodes` (no routed subscription), so the stream avoids the node
        // the test drains or kills.
        let mut subscriber = cluster.client_with(consumer_nodes, tls).await?.without_direct_routing();
        let consumer = {
            let (stop, delivered) = (stop_consumer.clone(), delivered.clone());
            tokio::spawn(async move {
                // Runs until told to stop; a failed subscription is opened again (its leases
                // are released or expire, and the messages come again).
                let mut reopened = 0;
                while !stop.load(Ordering::SeqCst) {
                    let mut consumer = match Consumer::open(&mut subscriber, MAILBOX, 200).await {
                        Ok(c) => c,
                        Err(e) => {
                            trace(format!("consumer: subscribe failed: {e:#}"));
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        }
                    };
                    let failed = loop {
                        if stop.load(Ordering::SeqCst) {
                            break None;
                        }
                        match consumer.next(Duration::from_millis(500)).await {
                            Ok(Some(d)) => {
                                delivered.lock().unwrap().push((delivered_id(&d)?, d.attempt));
                                if let Err(e) = consumer.ack(positions_of(&[d])).await {
                                    break Some(e);
                                }
                            }
                            Ok(None) => {}
                            Err(e) => break Some(e),
                        }
                    };
                    if let Some(e) = failed {
                        reopened += 1;
                        trace(format!("consumer: subscription ended ({e:#}); reopening ({reopened})"));
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                Ok(())
            })
        };
        Ok(Self { stop_producer, stop_consumer, batches, delivered, producer, consumer })
    }

    /// Waits until `more` batches were acknowledged (failing at once if the producer gave up).
    async fn wait_batches(&mut self, more: usize, what: &str) -> Result<()> {
        let target = self.batches.load(Ordering::SeqCst) + more;
        let reached = eventually(what, Duration::from_secs(90), || {
            let n = self.batches.load(Ordering::SeqCst);
            let gave_up = self.producer.is_finished();
            async move {
                ensure!(!gave_up, "the producer stopped");
                Ok((n >= target).then_some(()))
            }
        })
        .await;
        if reached.is_err() && self.producer.is_finished() {
            let producer = std::mem::replace(&mut self.producer, tokio::spawn(async { Ok(Outcome::default()) }));
            producer.await.map_err(|e| anyhow!("producer panicked: {e}"))?.context("the producer failed")?;
        }
        reached
    }

    /// Stops publishing, waits until every acknowledged message (and every id of `extra`)
    /// was delivered, stops the consumer and checks: nothing lost, nothing delivered twice
    /// that was neither published twice nor redelivered.
    async fn finish(self, extra: &[String]) -> Result<Outcome> {
        let Load { stop_producer, stop_consumer, delivered, producer, consumer, .. } = self;
        stop_producer.store(true, Ordering::SeqCst);
        let mut outcome = producer.await.map_err(|e| anyhow!("producer panicked: {e}"))??;
        let expected: HashSet<String> = outcome.acked.iter().chain(extra).cloned().collect();
        let all_in = eventually("every acknowledged message delivered", Duration::from_secs(120), || {
            let seen: HashSet<String> = delivered.lock().unwrap().iter().map(|(id, _)| id.clone()).collect();
            let missing: Vec<String> = expected.iter().filter(|id| !seen.contains(*id)).cloned().collect();
            let total = expected.len();
            async move {
                if missing.is_empty() {
                    Ok(Some(()))
                } else {
                    Err(anyhow!("{} of {total} expected messages not delivered yet, e.g. {:?}", missing.len(), &missing[..missing.len().min(5)]))
                }
            }
        })
        .await;
        stop_consumer.store(true, Ordering::SeqCst);
        consumer.await.map_err(|e| anyhow!("consumer panicked: {e}"))??;
        all_in?;
        outcome.delivered = delivered.lock().unwrap().clone();
        let mut times: HashMap<&str, Vec<u32>> = HashMap::new();
        for (id, attempt) in &outcome.delivered {
            times.entry(id).or_default().push(*attempt);
        }
        let bad: Vec<&&str> = times
            .iter()
            .filter(|(id, attempts)| attempts.len() > 1 && !outcome.ambiguous.contains(**id) && attempts.iter().all(|a| *a <= 1))
            .map(|(id, _)| id)
            .take(10)
            .collect();
        ensure!(bad.is_empty(), "delivered more than once though published once and never redelivered: {bad:?}");
        trace(format!(
            "load: {} messages acknowledged, {} deliveries, {} ambiguous publishes",
            outcome.acked.len(),
            outcome.delivered.len(),
            outcome.ambiguous.len()
        ));
        Ok(outcome)
    }
}

/// Replica counts per node from `node`'s status, with the whole status for messages.
async fn placement(cluster: &ProcessCluster, node: NodeId) -> Result<(BTreeMap<u64, (String, u32)>, ClusterStatusResponse)> {
    let status = cluster.status(node).await?;
    let counts = status.nodes.iter().map(|n| (n.id, (n.state.clone(), n.replicas))).collect();
    Ok((counts, status))
}

/// Every data group has `rf` voters on distinct nodes and no learner; the metadata group has
/// `rf` voters and every other node of `nodes` as a learner.
fn whole(status: &ClusterStatusResponse, groups: usize, rf: usize, nodes: &[NodeId]) -> Result<()> {
    ensure!(status.replicas.len() == groups, "{} of {groups} groups answered", status.replicas.len());
    for g in &status.replicas {
        ensure!(g.voters.len() == rf, "group {}: voters {:?}", g.group, g.voters);
        if g.group == 0 {
            ensure!(g.voters.len() + g.learners.len() == nodes.len(), "metadata group: {:?} + learners {:?}", g.voters, g.learners);
        } else {
            ensure!(g.learners.is_empty(), "group {}: learners {:?} left", g.group, g.learners);
        }
        ensure!(g.voters.iter().chain(&g.learners).all(|n| nodes.contains(n)), "group {} on {:?} + {:?}", g.group, g.voters, g.learners);
    }
    Ok(())
}

/// Waits until `node` reports balanced replicas over `nodes` (all active), no move left.
async fn wait_balanced(cluster: &ProcessCluster, node: NodeId, nodes: &[NodeId]) -> Result<ClusterStatusResponse> {
    eventually("replicas balanced", SETTLE, || async {
        cluster.check_no_crash()?;
        let (counts, status) = placement(cluster, node).await?;
        let active: Vec<u64> = counts.iter().filter(|(_, (state, _))| state == "active").map(|(id, _)| *id).collect();
        if active != nodes || !balanced(&status) {
            bail!("not balanced: {counts:?}, moves {:?}", status.moves);
        }
        whole(&status, cluster.groups().len(), 3, nodes)?;
        Ok(Some(status))
    })
    .await
}

/// Waits until the groups' leaders are spread: every active node leads within one group of
/// every other.
async fn wait_leaders_balanced(cluster: &ProcessCluster, node: NodeId) -> Result<Vec<(u64, u32)>> {
    eventually("leaders balanced", SETTLE, || async {
        let status = cluster.status(node).await?;
        let leads: Vec<(u64, u32)> = status.nodes.iter().filter(|n| n.state == "active").map(|n| (n.id, n.leaders)).collect();
        let (min, max) = (leads.iter().map(|l| l.1).min(), leads.iter().map(|l| l.1).max());
        if status.replicas.len() != cluster.groups().len() || max.zip(min).is_none_or(|(max, min)| max > min + 1) {
            bail!("leaders per node {leads:?} ({} groups answered)", status.replicas.len());
        }
        Ok(Some(leads))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_grows_from_three_to_five_nodes_under_load() {
    let cluster = builder(3, 2).start().await.expect("cluster start");
    scenario_grow(&cluster).await.expect("scenario failed");
}

async fn scenario_grow(cluster: &ProcessCluster) -> Result<()> {
    create_mailbox(cluster, 1, MAILBOX, 6).await?;
    wait_balanced(cluster, 1, &[1, 2, 3]).await?;
    let started = Instant::now();
    let mut load = Load::start(cluster, &[1, 2, 3], &[2, 3, 1]).await?;
    load.wait_batches(5, "5 batches before the join").await?;
    cluster.join(4).await?;
    cluster.join(5).await?;
    let status = wait_balanced(cluster, 1, &[1, 2, 3, 4, 5]).await?;
    let counts: Vec<(u64, u32)> = status.nodes.iter().map(|n| (n.id, n.replicas)).collect();
    trace(format!("balanced after {:?}: replicas per node {counts:?}", started.elapsed()));
    let leads = wait_leaders_balanced(cluster, 1).await?;
    trace(format!("leaders balanced after {:?}: {leads:?}", started.elapsed()));
    // The new nodes serve clients too (forwarding to leaders elsewhere).
    let via_new = batch("new", MAILBOX, 0, BATCH, 4);
    let mut client = cluster.client(5).await?;
    publish_retry(&mut client, &via_new, Duration::from_secs(10), Duration::from_secs(30)).await?;
    load.wait_batches(5, "5 batches after the moves").await?;
    let outcome = load.finish(&via_new.iter().map(|m| m.id.clone()).collect::<Vec<_>>()).await?;
    ensure!(outcome.acked.len() >= 10 * BATCH);
    wait_pending(cluster, 4, MAILBOX, 0, Duration::from_secs(30)).await?;
    ensure!(started.elapsed() < Duration::from_secs(300), "took {:?}", started.elapsed());
    cluster.check_no_crash()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_a_drained_node_is_removed_and_killed_without_loss() {
    let cluster = builder(4, 0).start().await.expect("cluster start");
    scenario_drain(&cluster).await.expect("scenario failed");
}

async fn scenario_drain(cluster: &ProcessCluster) -> Result<()> {
    create_mailbox(cluster, 1, MAILBOX, 6).await?;
    wait_balanced(cluster, 1, &[1, 2, 3, 4]).await?;
    let mut admin = cluster.admin_client(1).await?;
    let refused = admin.remove_node(2).await.expect_err("removing an active node");
    ensure!(refused.code() == Code::FailedPrecondition, "{refused:?}");

    let mut load = Load::start(cluster, &[1, 3, 4], &[3, 4, 1]).await?;
    load.wait_batches(5, "5 batches before the drain").await?;
    admin.drain_node(2).await.map_err(|s| anyhow!("drain: {s:?}"))?;
    eventually("node 2 holds no replica", SETTLE, || async {
        cluster.check_no_crash()?;
        let (counts, status) = placement(cluster, 1).await?;
        if counts.get(&2).map(|c| c.1) != Some(0) || status.replicas.len() != cluster.groups().len() {
            bail!("replicas per node {counts:?}, moves {:?}", status.moves);
        }
        whole(&status, cluster.groups().len(), 3, &[1, 3, 4])?;
        Ok(Some(()))
    })
    .await?;
    // The metadata group may be between leaders for a moment (a handover): retry that.
    eventually("node 2 removed", Duration::from_secs(30), || {
        let mut admin = admin.clone();
        async move {
            match admin.remove_node(2).await {
                Ok(()) => Ok(Some(())),
                Err(s) if s.code() == Code::Unavailable => Err(anyhow!("remove: {s:?}")),
                Err(s) => bail!("remove refused: {s:?}"),
            }
        }
    })
    .await?;
    cluster.kill(2).await?;
    load.wait_batches(10, "10 batches after node 2 was killed").await?;
    load.finish(&[]).await?;
    wait_pending(cluster, 1, MAILBOX, 0, Duration::from_secs(30)).await?;
    let (counts, _) = placement(cluster, 1).await?;
    ensure!(counts.get(&2).map(|c| c.0.as_str()) == Some("removed"), "{counts:?}");
    cluster.check_no_crash()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_killing_the_metadata_leader_during_a_move_leaves_every_group_whole() {
    let cluster = builder(3, 1).start().await.expect("cluster start");
    scenario_coordinator_killed(&cluster).await.expect("scenario failed");
}

async fn scenario_coordinator_killed(cluster: &ProcessCluster) -> Result<()> {
    create_mailbox(cluster, 1, MAILBOX, 6).await?;
    // Data to move, so that a move takes a moment.
    let mut client = cluster.client(1).await?;
    for b in 0..40 {
        publish_retry(&mut client, &batch("pre", MAILBOX, b * 50, 50, 16), Duration::from_secs(10), Duration::from_secs(30)).await?;
    }
    let mut load = Load::start(cluster, &[1, 2, 3], &[1, 2, 3]).await?;
    load.wait_batches(3, "3 batches before the join").await?;
    let coordinator = cluster.leader_of(0).await?;
    cluster.join(4).await?;
    let moving = eventually("a move in progress", Duration::from_secs(60), || async {
        let status = cluster.status(coordinator).await?;
        Ok((!status.moves.is_empty()).then_some(status.moves))
    })
    .await?;
    trace(format!("killing the coordinator, node {coordinator}, during {moving:?}"));
    cluster.kill(coordinator).await?;
    let survivors: Vec<NodeId> = [1, 2, 3, 4].into_iter().filter(|n| *n != coordinator).collect();
    // Every group stays whole: the move completes or is rolled back, none is left half-done.
    eventually("no move left half-done", SETTLE, || async {
        let status = cluster.status(survivors[0]).await?;
        let half_done: Vec<_> = status.replicas.iter().filter(|g| g.group != 0 && !g.learners.is_empty()).collect();
        if !half_done.is_empty() || status.replicas.len() != cluster.groups().len() || !status.moves.is_empty() {
            bail!("half-done: {half_done:?}; {} groups answered; moves {:?}", status.replicas.len(), status.moves);
        }
        ensure!(status.replicas.iter().all(|g| g.voters.len() == 3), "{:?}", status.replicas);
        Ok(Some(()))
    })
    .await?;
    load.wait_batches(5, "5 batches after the coordinator was killed").await?;
    cluster.start(coordinator).await?;
    wait_balanced(cluster, survivors[0], &[1, 2, 3, 4]).await?;
    // Everything published before the load is delivered too (the load's consumer takes it).
    let published_before: Vec<String> = (0..40 * 50).map(|i| format!("pre-{i:06}")).collect();
    load.finish(&published_before).await?;
    wait_pending(cluster, 4, MAILBOX, 0, Duration::from_secs(30)).await?;
    cluster.check_no_crash()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_shrink_removes_every_node_above_n_and_a_second_run_changes_nothing() {
    let cluster = builder(4, 0).shards(3).start().await.expect("cluster start");
    scenario_shrink(&cluster).await.expect("scenario failed");
}

/// Runs `kerwen node shrink ARGS` as the Helm hook does (the binary with arguments only, an
/// administrator certificate) through the first of `via` that answers, after one that does
/// not.
async fn kerwen_shrink(cluster: &ProcessCluster, via: &[NodeId], args: &[&str]) -> Result<(bool, String)> {
    kerwen_node(cluster, via, &[&["shrink"], args].concat()).await
}

/// Runs `kerwen node ARGS` as the administrator through nodes `via` (after a dead endpoint).
async fn kerwen_node(cluster: &ProcessCluster, via: &[NodeId], args: &[&str]) -> Result<(bool, String)> {
    let endpoints: Vec<String> = std::iter::once("127.0.0.1:1".to_owned()).chain(via.iter().map(|n| cluster.endpoint(*n))).collect();
    let endpoints = endpoints.join(",");
    let cli = cluster.admin_cli(&[&["node"], args, &["--endpoint", endpoints.as_str()]].concat());
    let out = tokio::process::Command::from(cli).output().await?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    trace(format!("kerwen node {args:?}: {}\n{text}", out.status));
    Ok((out.status.success(), text))
}

async fn scenario_shrink(cluster: &ProcessCluster) -> Result<()> {
    let groups = cluster.groups().len();
    wait_balanced(cluster, 1, &[1, 2, 3, 4]).await?;
    let (_, before) = placement(cluster, 1).await?;
    ensure!(before.replication_factor == 3, "replication factor {}", before.replication_factor);

    // Refused before anything changes: two nodes would stay for a factor of three; N = 0;
    // asked through the node it would remove.
    let (ok, text) = kerwen_shrink(cluster, &[1], &["2"]).await?;
    ensure!(!ok && text.contains("replication factor 3"), "{text}");
    let (ok, text) = kerwen_shrink(cluster, &[1], &["0"]).await?;
    ensure!(!ok, "N = 0 accepted: {text}");
    let (ok, text) = kerwen_shrink(cluster, &[4, 1], &["3"]).await?;
    ensure!(!ok && text.contains("node 4 answered"), "{text}");
    let (counts, _) = placement(cluster, 1).await?;
    ensure!(counts.values().all(|(state, _)| state == "active"), "a refused shrink changed {counts:?}");

    let started = Instant::now();
    let (ok, text) = kerwen_shrink(cluster, &[1, 2], &["3", "--timeout-secs", "120"]).await?;
    ensure!(ok && text.contains("node 4 removed"), "{text}");
    trace(format!("shrunk to 3 nodes in {:?}", started.elapsed()));
    // A group node 4 led elects another leader: give it a moment to answer again.
    eventually("nodes 1..3 hold every group", Duration::from_secs(30), || async {
        let (counts, status) = placement(cluster, 1).await?;
        ensure!(counts.get(&4) == Some(&("removed".to_owned(), 0)), "{counts:?}");
        whole(&status, groups, 3, &[1, 2, 3])?;
        Ok(Some(()))
    })
    .await?;
    let states = |counts: BTreeMap<u64, (String, u32)>| counts.into_iter().map(|(id, (state, _))| (id, state)).collect::<Vec<_>>();
    let before = states(placement(cluster, 1).await?.0);

    // The hook runs again on every upgrade: nothing above N is nothing to do.
    let (ok, text) = kerwen_shrink(cluster, &[2], &["3"]).await?;
    ensure!(ok && text.contains("already removed: nodes [4]") && text.contains("nothing changed"), "{text}");
    let after = states(placement(cluster, 1).await?.0);
    ensure!(after == before, "a second run changed {before:?} into {after:?}");

    // Only a join re-admits a removed node: a drain is refused, a second remove is done.
    let (ok, text) = kerwen_node(cluster, &[3], &["drain", "4"]).await?;
    ensure!(!ok && text.contains("was removed"), "draining a removed node: {text}");
    let (ok, text) = kerwen_node(cluster, &[3], &["remove", "4"]).await?;
    ensure!(ok && text.contains("already removed"), "removing a removed node again: {text}");
    let after = states(placement(cluster, 1).await?.0);
    ensure!(after == before, "drain/remove of a removed node changed {before:?} into {after:?}");
    cluster.check_no_crash()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_publishes_and_subscriptions_go_straight_to_shard_leaders_and_follow_a_leader_change() {
    let cluster = builder(3, 0).start().await.expect("cluster start");
    scenario_direct(&cluster).await.expect("scenario failed");
}

/// Publishes the nodes of `nodes` forwarded to another shard leader.
async fn forwarded_writes(cluster: &ProcessCluster, nodes: &[NodeId]) -> Result<f64> {
    forwarded(cluster, nodes, "write").await
}

/// Requests of `method` (`write`, `fetch`, …) the nodes of `nodes` forwarded to a shard leader.
async fn forwarded(cluster: &ProcessCluster, nodes: &[NodeId], method: &str) -> Result<f64> {
    let label = format!("method=\"{method}\"");
    let mut total = 0.0;
    for node in nodes {
        let (_, page) = http_get(&cluster.http_endpoint(*node), "/metrics", Duration::from_secs(5)).await?;
        total += page
            .lines()
            .filter(|l| l.starts_with("kerwen_requests_forwarded_total{") && l.contains(&label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    Ok(total)
}

/// Publishes `count` messages (ids starting with `prefix`) to the one-partition `mailbox` and
/// consumes them with `client`'s subscription; returns the fetches the nodes forwarded meanwhile, or `None` when the shard's
/// leader changed in between (forwarding is then due).
async fn fetches_forwarded_while_consuming(
    cluster: &ProcessCluster,
    client: &mut Client,
    (mailbox, shard): (&str, u32),
    prefix: &str,
    count: usize,
) -> Result<Option<f64>> {
    let all = cluster.running();
    let leader_before = cluster.leader_of(shard).await?;
    let before = forwarded(cluster, &all, "fetch").await?;
    let batch: Vec<Message> = (0..count).map(|i| message(format!("{prefix}-{i}"), mailbox, None, b"x".to_vec())).collect();
    publish_retry(client, &batch, Duration::from_secs(10), Duration::from_secs(60)).await?;
    let expected: HashSet<String> = batch.iter().map(|m| m.id.clone()).collect();
    let mut consumer = Consumer::open(client, mailbox, 100).await?;
    let delivered = consume_all_of(&mut consumer, &expected, Duration::from_secs(60), Duration::from_millis(300)).await?;
    ack_all(&mut consumer, &delivered).await?;
    drop(consumer);
    let after = forwarded(cluster, &all, "fetch").await? - before;
    Ok((cluster.leader_of(shard).await? == leader_before).then_some(after))
}

/// Every group's leader as `node` sees it.
async fn leaders(cluster: &ProcessCluster, node: NodeId) -> Result<BTreeMap<u32, u64>> {
    Ok(cluster.status(node).await?.replicas.iter().map(|g| (g.group, g.leader)).collect())
}

/// 20 messages with one ordering key: one partition, so one shard.
fn keyed_batch(prefix: &str) -> Vec<Message> {
    (0..20).map(|i| message(format!("{prefix}-{i:02}"), MAILBOX, Some(prefix.to_owned()), format!("payload {i}").into_bytes())).collect()
}

/// Publishes `rounds` batches, each to one shard (a key per round), through `client` and
/// returns what the nodes of `nodes` forwarded meanwhile, or `None` when a leader changed in
/// between (forwarding is then due).
async fn forwarded_while_publishing(
    cluster: &ProcessCluster,
    client: &mut Client,
    nodes: &[NodeId],
    prefix: &str,
    rounds: usize,
    sent: &mut Vec<Message>,
) -> Result<Option<f64>> {
    let leaders_before = leaders(cluster, nodes[0]).await?;
    let before = forwarded_writes(cluster, nodes).await?;
    for round in 0..rounds {
        let b = keyed_batch(&format!("{prefix}-{round}"));
        publish_retry(client, &b, Duration::from_secs(10), Duration::from_secs(60)).await?;
        sent.extend(b);
    }
    let forwarded = forwarded_writes(cluster, nodes).await? - before;
    Ok((leaders(cluster, nodes[0]).await? == leaders_before).then_some(forwarded))
}

async fn scenario_direct(cluster: &ProcessCluster) -> Result<()> {
    create_mailbox(cluster, 1, MAILBOX, 6).await?;
    let leads = wait_leaders_balanced(cluster, 1).await?;
    ensure!(leads.iter().all(|(_, n)| *n > 0), "every node leads some group: {leads:?}");
    eventually("every node advertises its client address", Duration::from_secs(30), || async {
        let status = cluster.status(1).await?;
        let advertised: Vec<(u64, Option<String>)> = status.nodes.iter().map(|n| (n.id, n.client_address.clone())).collect();
        for (id, address) in &advertised {
            ensure!(address.as_deref() == Some(cluster.endpoint(*id).as_str()), "{advertised:?}");
        }
        Ok(Some(()))
    })
    .await?;
    let all = cluster.node_ids();
    let mut sent = Vec::new();

    // Through node 1 without routing: node 1 forwards whatever the other nodes lead.
    let mut through_one = cluster.client(1).await?.without_direct_routing();
    let forwarded = forwarded_while_publishing(cluster, &mut through_one, &all, "via-1", 12, &mut sent).await?;
    trace(format!("a client without routing: {forwarded:?} of 12 publishes forwarded"));
    ensure!(forwarded.is_none_or(|f| f >= 1.0), "node 1 forwarded none of 12 publishes to 6 shards it does not all lead");

    // A routing client (connected to node 1 too): after its first publish, none is forwarded.
    let mut direct = cluster.client(1).await?;
    let warm = keyed_batch("warm");
    publish_retry(&mut direct, &warm, Duration::from_secs(10), Duration::from_secs(60)).await?;
    sent.extend(warm);
    let forwarded = forwarded_while_publishing(cluster, &mut direct, &all, "direct", 12, &mut sent).await?;
    trace(format!("a routing client: {forwarded:?} of 12 publishes forwarded"));
    ensure!(forwarded.is_none_or(|f| f == 0.0), "{forwarded:?} publishes of a routing client were forwarded");

    // The node leading the most groups, node 1 aside, dies: publishes keep succeeding (through
    // node 1 while the groups elect) and then go straight to the new leaders.
    let status = cluster.status(1).await?;
    let victim = status.nodes.iter().filter(|n| n.id != 1).max_by_key(|n| n.leaders).map(|n| n.id).context("no other node")?;
    trace(format!("killing node {victim}"));
    cluster.kill(victim).await?;
    let survivors: Vec<NodeId> = all.iter().copied().filter(|n| *n != victim).collect();
    let started = Instant::now();
    for round in 0..5 {
        let b = keyed_batch(&format!("failover-{round}"));
        publish_retry(&mut direct, &b, Duration::from_secs(10), Duration::from_secs(60)).await?;
        sent.extend(b);
    }
    trace(format!("5 batches published across the leader change in {:?}", started.elapsed()));
    cluster.wait_leaders(&survivors, &[victim], Duration::from_secs(60)).await?;
    let settle = keyed_batch("settle");
    publish_retry(&mut direct, &settle, Duration::from_secs(10), Duration::from_secs(60)).await?;
    sent.extend(settle);
    // The map refreshes at most twice a second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let forwarded = forwarded_while_publishing(cluster, &mut direct, &survivors, "after", 12, &mut sent).await?;
    trace(format!("after the leader change: {forwarded:?} publishes forwarded"));
    ensure!(forwarded.is_none_or(|f| f == 0.0), "{forwarded:?} publishes forwarded once the new leaders were known");

    // Everything acknowledged is delivered.
    let expected: HashSet<String> = sent.iter().map(|m| m.id.clone()).collect();
    let mut client = cluster.client(1).await?;
    let mut consumer = Consumer::open(&mut client, MAILBOX, 1000).await?;
    let deliveries = consume_all_of(&mut consumer, &expected, Duration::from_secs(60), Duration::from_secs(2)).await?;
    ensure!(deliveries.len() >= expected.len(), "{} deliveries of {} messages", deliveries.len(), expected.len());

    // A subscription opens at the leader of its mailbox's shard, whatever the client's
    // endpoint: through a node that does not lead it, a pinned consumer's fetches are
    // forwarded, a routing one's are not.
    const ONE_SHARD: &str = "TM/GOV/MINCOM/registry/one-shard";
    let info = create_mailbox(cluster, 1, ONE_SHARD, 1).await?;
    let shard = info.partition_shards[0];
    let leader = cluster.leader_of(shard).await?;
    let elsewhere = survivors.iter().copied().find(|n| *n != leader).context("one node left")?;
    let pinned = fetches_forwarded_while_consuming(cluster, &mut cluster.client(elsewhere).await?.without_direct_routing(), (ONE_SHARD, shard), "pinned", 50).await?;
    trace(format!("a consumer pinned to node {elsewhere} (shard {shard} led by node {leader}): {pinned:?} fetches forwarded"));
    ensure!(pinned.is_none_or(|f| f >= 1.0), "a consumer through node {elsewhere} had none of its fetches forwarded to node {leader}");
    let routed = fetches_forwarded_while_consuming(cluster, &mut cluster.client(elsewhere).await?, (ONE_SHARD, shard), "routed", 50).await?;
    trace(format!("a routing consumer with endpoint node {elsewhere}: {routed:?} fetches forwarded"));
    ensure!(routed.is_none_or(|f| f == 0.0), "{routed:?} fetches of a routing consumer were forwarded");
    cluster.check_no_crash()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_a_mailbox_grows_and_every_key_keeps_its_partition_and_order() {
    let cluster = builder(3, 0).shards(3).start().await.expect("cluster start");
    scenario_grow_mailbox(&cluster).await.expect("scenario failed");
}

async fn scenario_grow_mailbox(cluster: &ProcessCluster) -> Result<()> {
    const GROWN: &str = "TM/GOV/MINCOM/registry/growing";
    let created = create_mailbox(cluster, 1, GROWN, 2).await?;
    ensure!(created.key_partitions == 2, "{created:?}");
    let mut client = cluster.client(2).await?;
    let mut consumer = Consumer::open(&mut client, GROWN, 1000).await?;
    // Ten keys, five messages each, then the mailbox grows to 6 partitions.
    let mut sent = batch("before", GROWN, 0, 50, 10);
    publish_retry(&mut client, &sent, Duration::from_secs(10), Duration::from_secs(60)).await?;
    let grown = client.grow_mailbox(GROWN, 6).await.map_err(|s| anyhow!("grow: {s:?}"))?;
    ensure!(grown.partitions == 6 && grown.key_partitions == 2 && grown.partition_shards.len() == 6, "{grown:?}");
    ensure!(grown.partition_shards[..2] == created.partition_shards[..], "existing partitions moved: {grown:?}");
    for bad in [6, 2, 257] {
        let refused = client.grow_mailbox(GROWN, bad).await;
        ensure!(refused.as_ref().is_err_and(|s| s.code() == Code::InvalidArgument), "growing to {bad}: {refused:?}");
    }

    // The open subscription ends, so that its reopening covers the new partitions.
    let ended = async {
        loop {
            match consumer.next_event(Duration::from_secs(1)).await {
                Ok(_) => continue,
                Err(e) => return e,
            }
        }
    };
    let error = tokio::time::timeout(Duration::from_secs(15), ended).await.context("the subscription outlived the growth")?;
    ensure!(format!("{error:#}").contains("grew to 6 partitions"), "{error:#}");

    // The same keys again, and unkeyed messages.
    let after = batch("after", GROWN, 50, 50, 10);
    publish_retry(&mut client, &after, Duration::from_secs(10), Duration::from_secs(60)).await?;
    let unkeyed: Vec<Message> = (0..60).map(|i| message(format!("unkeyed-{i:02}"), GROWN, None, format!("payload {i}").into_bytes())).collect();
    publish_retry(&mut client, &unkeyed, Duration::from_secs(10), Duration::from_secs(60)).await?;
    sent.extend(after);

    let mut consumer = Consumer::open(&mut client, GROWN, 1000).await?;
    let mut expected: HashSet<String> = sent.iter().map(|m| m.id.clone()).collect();
    expected.extend(unkeyed.iter().map(|m| m.id.clone()));
    let deliveries = consume_all_of(&mut consumer, &expected, Duration::from_secs(60), Duration::from_secs(2)).await?;
    let position: HashMap<String, (u32, u64)> = deliveries.iter().map(|d| Ok((delivered_id(d)?, delivered_pos(d)?))).collect::<Result<_>>()?;
    // Every key's messages sit on one of the first two partitions, in publish order.
    for key in 0..10 {
        let of_key: Vec<(u32, u64)> = sent.iter().filter(|m| m.ordering_key.as_deref() == Some(&format!("k{key}"))).map(|m| position[&m.id]).collect();
        ensure!(of_key.len() == 10, "key k{key}: {} messages", of_key.len());
        ensure!(of_key.iter().all(|(p, _)| *p == of_key[0].0 && *p < 2), "key k{key} spread over {of_key:?}");
        ensure!(of_key.windows(2).all(|w| w[0].1 < w[1].1), "key k{key} out of order: {of_key:?}");
    }
    let on_new = unkeyed.iter().filter(|m| position[&m.id].0 >= 2).count();
    trace(format!("{on_new} of 60 unkeyed messages on the added partitions"));
    ensure!(on_new > 0, "no unkeyed message reached an added partition");
    cluster.check_no_crash()
}

/// A node with no replica of a shard serves a consumer through the shard's leader, also once
/// the leader it first heard of has moved its own replica away. Six nodes and one shard:
/// placement moves the shard's replicas at once, the first leader's among them. Openraft
/// keeps a leader that removed itself in the leader state with a log nothing appends to any
/// more; it used to answer node 1's fetches as if it still led, and the consumer starved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_a_consumer_through_a_node_without_the_shard_follows_its_leader_away() {
    let cluster = builder(6, 0).shards(1).start().await.expect("cluster start");
    scenario_consumer_off_shard(&cluster).await.expect("scenario failed");
}

async fn scenario_consumer_off_shard(cluster: &ProcessCluster) -> Result<()> {
    create_mailbox(cluster, 2, MAILBOX, 1).await?;
    let mut load = Load::start(cluster, &[2, 3, 4, 5, 6], &[1]).await?;
    load.wait_batches(10, "10 batches").await?;
    let status = wait_balanced(cluster, 2, &[1, 2, 3, 4, 5, 6]).await?;
    let shard = status.replicas.iter().find(|g| g.group == 1).ok_or_else(|| anyhow!("shard 1 is not in the map"))?;
    trace(format!("shard 1: voters {:?}, leader {}", shard.voters, shard.leader));
    load.wait_batches(10, "10 batches after the moves").await?;
    let outcome = load.finish(&[]).await?;
    ensure!(outcome.acked.len() >= 20 * BATCH);
    cluster.check_no_crash()
}
