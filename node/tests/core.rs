//! Acceptance tests of the core issue: replicated publish/consume on a real 3-node cluster of
//! `kerwen serve` processes (see `harness/mod.rs`).
//!
//! Each test runs its own cluster (OS-assigned ports, own temp dir) so they can run in
//! parallel. Every test body is a `scenario_*` function returning `anyhow::Result`; the test
//! unwraps it while the cluster is still alive, so a failure prints the node log tails.

mod harness;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use bytes::Bytes;
use harness::*;
use kerwen_proto::v1::{Delivery, Message, Position, PublishResponse};
use tonic::Code;

const MAILBOX: &str = "TM/GOV/MINCOM/registry/notices";

/// Effectively "never expires" for the length of a test.
const LONG_LEASE_MS: u64 = 600_000;

/// Records, per message id, where a publish put it.
#[derive(Default)]
struct PublishLog {
    /// id → (publish index, ordering key, position)
    by_id: HashMap<String, (usize, Option<String>, (u32, u64))>,
    /// ids of batches that needed more than one attempt (may legitimately be stored twice).
    ambiguous: HashSet<String>,
    next_index: usize,
}

impl PublishLog {
    fn record(&mut self, sent: &[Message], resp: &PublishResponse, attempts: u32) -> Result<()> {
        check_publish_response(sent, resp)?;
        for (m, r) in sent.iter().zip(&resp.results) {
            let pos = pos_key(r.position.as_ref().expect("checked"));
            ensure!(
                self.by_id.insert(m.id.clone(), (self.next_index, m.ordering_key.clone(), pos)).is_none(),
                "message id {} published twice by the test",
                m.id
            );
            self.next_index += 1;
            if attempts > 1 {
                self.ambiguous.insert(m.id.clone());
            }
        }
        Ok(())
    }
}

/// Duplicated ids among `deliveries`, split into (allowed: ambiguous publishes, not allowed).
fn duplicates(deliveries: &[Delivery], ambiguous: &HashSet<String>) -> Result<(Vec<String>, Vec<String>)> {
    let mut count: HashMap<String, usize> = HashMap::new();
    for d in deliveries {
        *count.entry(delivered_id(d)?).or_default() += 1;
    }
    let (ok, bad): (Vec<String>, Vec<String>) =
        count.into_iter().filter(|(_, n)| *n > 1).map(|(id, _)| id).partition(|id| ambiguous.contains(id));
    Ok((ok, bad))
}

// -------------------------------------------------------------------------------------------------
// a. 10,000 messages through node 1, consumed through node 2 exactly once, in order
// -------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_10k_consume_exactly_once_in_order() {
    let cluster = ProcessCluster::builder().lease_ms(LONG_LEASE_MS).start().await.expect("cluster start");
    scenario_publish_consume(&cluster).await.expect("scenario failed");
}

async fn scenario_publish_consume(cluster: &ProcessCluster) -> Result<()> {
    const N: usize = 10_000;
    const BATCH: usize = 100;
    const KEYS: usize = 64;
    let info = create_mailbox(cluster, 1, MAILBOX, 4).await?;
    ensure!(info.partitions == 4 && info.partition_shards.len() == 4, "unexpected mailbox info {info:?}");

    let mut publisher = cluster.client(1).await?;
    let mut log = PublishLog::default();
    let started = Instant::now();
    for b in 0..N / BATCH {
        let msgs = batch("a", MAILBOX, b * BATCH, BATCH, KEYS);
        let (resp, attempts) = publish_retry(&mut publisher, &msgs, Duration::from_secs(20), Duration::from_secs(30))
            .await
            .with_context(|| format!("publishing batch {b} through node 1"))?;
        log.record(&msgs, &resp, attempts)?;
    }
    trace(format!("published {N} messages in {:?} ({} ambiguous)", started.elapsed(), log.ambiguous.len()));

    // Publish-side checks: all partitions used, one partition per key, FIFO per key.
    let partitions: BTreeSet<u32> = log.by_id.values().map(|v| v.2 .0).collect();
    ensure!(partitions == (0..4).collect(), "messages landed only on partitions {partitions:?}");
    let mut by_key: BTreeMap<String, Vec<(usize, (u32, u64))>> = BTreeMap::new();
    for (idx, key, pos) in log.by_id.values() {
        by_key.entry(key.clone().unwrap()).or_default().push((*idx, *pos));
    }
    for (key, mut v) in by_key {
        v.sort();
        ensure!(v.windows(2).all(|w| w[0].1 .0 == w[1].1 .0), "key {key} spread over several partitions");
        ensure!(v.windows(2).all(|w| w[0].1 .1 < w[1].1 .1), "key {key}: positions not increasing in publish order");
    }

    // Consume through node 2.
    let mut client2 = cluster.client(2).await?;
    let mut consumer = Consumer::open(&mut client2, MAILBOX, 1000).await?;
    let mut deliveries = Vec::with_capacity(N);
    let mut unacked = Vec::new();
    let started = Instant::now();
    while deliveries.len() < N {
        let d = consumer
            .next(Duration::from_secs(30))
            .await?
            .ok_or_else(|| anyhow!("no delivery for 30 s after {} of {N}", deliveries.len()))?;
        unacked.push(d.position.ok_or_else(|| anyhow!("delivery without position"))?);
        if unacked.len() >= 500 {
            consumer.ack(std::mem::take(&mut unacked)).await?;
        }
        deliveries.push(d);
    }
    if !unacked.is_empty() {
        consumer.ack(unacked).await?;
    }
    trace(format!("consumed {N} messages in {:?}", started.elapsed()));
    let all_positions = positions_of(&deliveries);
    let extra = consumer.wait_confirmed(&all_positions, Duration::from_secs(60)).await?;
    ensure!(extra.is_empty(), "{} deliveries beyond the {N} published (first: {:?})", extra.len(), extra.first());
    let extra = consumer.drain(Duration::from_secs(2)).await?;
    ensure!(extra.is_empty(), "{} deliveries after everything was acked (first: {:?})", extra.len(), extra.first());

    // Delivery-side checks.
    let (_, bad_dups) = duplicates(&deliveries, &HashSet::new())?;
    ensure!(bad_dups.is_empty(), "{} messages delivered more than once, e.g. {:?}", bad_dups.len(), &bad_dups[..bad_dups.len().min(10)]);
    let mut last_seq: HashMap<u32, u64> = HashMap::new();
    let mut last_idx: HashMap<String, usize> = HashMap::new();
    for d in &deliveries {
        let id = delivered_id(d)?;
        let (idx, key, pos) = log.by_id.get(&id).ok_or_else(|| anyhow!("delivered unknown message {id}"))?.clone();
        let got = delivered_pos(d)?;
        ensure!(got == pos, "{id} delivered at {got:?} but published at {pos:?}");
        ensure!(d.attempt == 1, "{id} delivered with attempt {} although nothing was redelivered", d.attempt);
        let m = d.message.as_ref().unwrap();
        ensure!(m.payload == Bytes::from(format!("payload of {id}")), "{id}: payload altered");
        ensure!(m.recipient == MAILBOX, "{id}: recipient {:?}", m.recipient);
        if let Some(prev) = last_seq.insert(got.0, got.1) {
            ensure!(prev < got.1, "partition {}: sequence {} delivered after {prev}", got.0, got.1);
        }
        let key = key.unwrap();
        if let Some(prev) = last_idx.insert(key.clone(), idx) {
            ensure!(prev < idx, "key {key}: message #{idx} delivered after #{prev}");
        }
    }
    ensure!(log.by_id.len() == N && deliveries.len() == N);

    wait_pending(cluster, 2, MAILBOX, 0, Duration::from_secs(30)).await?;
    cluster.check_no_crash()
}

// -------------------------------------------------------------------------------------------------
// b. SIGKILL the leader of a data shard while publishing through another node
// -------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_kill_shard_leader_while_publishing() {
    let cluster = ProcessCluster::builder()
        .lease_ms(LONG_LEASE_MS)
        .request_timeout_ms(3000)
        .start()
        .await
        .expect("cluster start");
    scenario_kill_leader(&cluster).await.expect("scenario failed");
}

#[derive(Default)]
struct PublisherOutcome {
    acked: Vec<String>,
    ambiguous: HashSet<String>,
    failed_attempts: usize,
}

async fn scenario_kill_leader(cluster: &ProcessCluster) -> Result<()> {
    const BATCH: usize = 50;
    let info = create_mailbox(cluster, 1, MAILBOX, 4).await?;
    let shard = info.partition_shards[0];
    let victim = cluster.leader_of(shard).await?;
    let others: Vec<NodeId> = cluster.node_ids().into_iter().filter(|&n| n != victim).collect();
    let (pub_node, sub_node) = (others[0], others[1]);
    trace(format!("shard {shard}: killing leader {victim}, publishing through {pub_node}, consuming through {sub_node}"));

    let stop = Arc::new(AtomicBool::new(false));
    let batches_ok = Arc::new(AtomicUsize::new(0));
    let mut publisher = cluster.client(pub_node).await?;
    let task = {
        let stop = stop.clone();
        let batches_ok = batches_ok.clone();
        tokio::spawn(async move {
            let mut out = PublisherOutcome::default();
            let mut b = 0;
            while !stop.load(Ordering::SeqCst) {
                let msgs = batch("b", MAILBOX, b * BATCH, BATCH, 64);
                // Bounded retries: elections may fail some attempts, but publishing must resume.
                let (_, attempts) = publish_retry(&mut publisher, &msgs, Duration::from_secs(10), Duration::from_secs(40))
                    .await
                    .with_context(|| format!("batch {b}"))?;
                out.failed_attempts += attempts as usize - 1;
                for m in &msgs {
                    out.acked.push(m.id.clone());
                    if attempts > 1 {
                        out.ambiguous.insert(m.id.clone());
                    }
                }
                batches_ok.fetch_add(1, Ordering::SeqCst);
                b += 1;
            }
            anyhow::Ok(out)
        })
    };

    let wait_batches = |target: usize, what: &'static str| {
        let batches_ok = batches_ok.clone();
        async move {
            eventually(what, Duration::from_secs(60), || {
                let n = batches_ok.load(Ordering::SeqCst);
                async move { Ok((n >= target).then_some(())) }
            })
            .await
        }
    };
    let res = async {
        wait_batches(10, "10 batches published before the kill").await?;
        cluster.kill(victim).await?;
        let at_kill = batches_ok.load(Ordering::SeqCst);
        trace(format!("killed node {victim} after {at_kill} batches"));
        // +1: the batch in flight at the kill may have been acked just before it.
        wait_batches(at_kill + 21, "20 batches published after the kill").await
    }
    .await;
    stop.store(true, Ordering::SeqCst);
    let outcome = task.await.map_err(|e| anyhow!("publisher task panicked: {e}"))?.context("publisher")?;
    res?;
    trace(format!(
        "publisher: {} messages acked, {} failed attempts, {} ambiguous",
        outcome.acked.len(),
        outcome.failed_attempts,
        outcome.ambiguous.len()
    ));

    let survivors = cluster.running();
    let leaders = cluster.wait_leaders(&survivors, &[], Duration::from_secs(60)).await?;
    ensure!(leaders[&shard] != victim);

    // Every acked message is delivered.
    let expected: HashSet<String> = outcome.acked.iter().cloned().collect();
    let mut client = cluster.client(sub_node).await?;
    let mut consumer = Consumer::open(&mut client, MAILBOX, 1000).await?;
    let deliveries = consume_all_of(&mut consumer, &expected, Duration::from_secs(60), Duration::from_secs(2)).await?;
    let (dup_ok, dup_bad) = duplicates(&deliveries, &outcome.ambiguous)?;
    ensure!(dup_bad.is_empty(), "messages published once but delivered twice: {dup_bad:?}");
    let unexpected: Vec<String> =
        deliveries.iter().map(delivered_id).collect::<Result<HashSet<_>>>()?.difference(&expected).cloned().collect();
    trace(format!(
        "consumed {} deliveries; {} duplicates from retried batches; {} messages from unacked attempts",
        deliveries.len(),
        dup_ok.len(),
        unexpected.len()
    ));
    ack_all(&mut consumer, &deliveries).await?;
    drop(consumer);

    // The killed node comes back and catches up.
    cluster.start(victim).await?;
    cluster.wait_healthy(Duration::from_secs(60)).await?;
    wait_pending(cluster, victim, MAILBOX, 0, Duration::from_secs(30)).await?;
    cluster.check_no_crash()
}

// -------------------------------------------------------------------------------------------------
// c. Acked messages stay gone across a full-cluster restart; unacked ones survive it
// -------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_full_restart_keeps_unacked_and_drops_acked() {
    let cluster = ProcessCluster::builder().lease_ms(LONG_LEASE_MS).start().await.expect("cluster start");
    scenario_full_restart(&cluster).await.expect("scenario failed");
}

async fn scenario_full_restart(cluster: &ProcessCluster) -> Result<()> {
    const N: usize = 200;
    create_mailbox(cluster, 1, MAILBOX, 4).await?;
    let mut publisher = cluster.client(1).await?;
    let mut log = PublishLog::default();
    for b in 0..2 {
        let msgs = batch("c", MAILBOX, b * 100, 100, 64);
        let (resp, attempts) = publish_retry(&mut publisher, &msgs, Duration::from_secs(20), Duration::from_secs(30)).await?;
        log.record(&msgs, &resp, attempts)?;
    }

    trace(format!("published {N}; consuming through node 2"));
    let mut client = cluster.client(2).await?;
    let mut consumer = Consumer::open(&mut client, MAILBOX, N as u32).await?;
    let deliveries = consumer.take(N, Duration::from_secs(30)).await?;
    trace("received all; acking half");
    let (to_ack, to_keep): (Vec<&Delivery>, Vec<&Delivery>) =
        deliveries.iter().partition(|d| log.by_id[&d.message.as_ref().unwrap().id].0 % 2 == 0);
    let acked_ids: HashSet<String> = to_ack.iter().map(|d| delivered_id(d)).collect::<Result<_>>()?;
    let kept_ids: HashSet<String> = to_keep.iter().map(|d| delivered_id(d)).collect::<Result<_>>()?;
    ensure!(acked_ids.len() == N / 2 && kept_ids.len() == N / 2, "expected {N} distinct deliveries");
    let ack_positions: Vec<Position> = to_ack.iter().filter_map(|d| d.position).collect();
    consumer.ack(ack_positions.clone()).await?;
    let extra = consumer.wait_confirmed(&ack_positions, Duration::from_secs(30)).await?;
    ensure!(extra.is_empty(), "unexpected deliveries: {extra:?}");
    drop(consumer);
    wait_pending(cluster, 1, MAILBOX, (N / 2) as u64, Duration::from_secs(30)).await?;
    trace("half acked and confirmed");

    cluster.stop_all().await.context("clean shutdown of all nodes")?;
    ensure!(cluster.running().is_empty());
    cluster.start_all().await?;
    cluster.wait_healthy(Duration::from_secs(60)).await?;
    create_mailbox_visible_everywhere(cluster).await?;
    wait_pending(cluster, 3, MAILBOX, (N / 2) as u64, Duration::from_secs(30)).await?;

    let mut client = cluster.client(3).await?;
    let mut consumer = Consumer::open(&mut client, MAILBOX, N as u32).await?;
    trace("after restart: consuming through node 3");
    let after = consume_all_of(&mut consumer, &kept_ids, Duration::from_secs(30), Duration::from_secs(3)).await?;
    trace(format!("received {} deliveries after the restart", after.len()));
    let after_ids: Vec<String> = after.iter().map(delivered_id).collect::<Result<_>>()?;
    let resurrected: Vec<&String> = after_ids.iter().filter(|id| acked_ids.contains(*id)).collect();
    ensure!(resurrected.is_empty(), "acked messages delivered again after the restart: {resurrected:?}");
    ensure!(after_ids.len() == N / 2, "expected exactly the {} unacked messages, got {} deliveries", N / 2, after_ids.len());
    for d in &after {
        let id = delivered_id(d)?;
        ensure!(delivered_pos(d)? == log.by_id[&id].2, "{id} moved after the restart");
    }
    ack_all(&mut consumer, &after).await?;
    wait_pending(cluster, 1, MAILBOX, 0, Duration::from_secs(30)).await?;
    cluster.check_no_crash()
}

/// After a restart the mailbox must still be known to every node.
async fn create_mailbox_visible_everywhere(cluster: &ProcessCluster) -> Result<()> {
    for n in cluster.running() {
        let c = cluster.client(n).await?;
        eventually(&format!("mailbox known to node {n} after restart"), Duration::from_secs(30), || {
            let mut c = c.clone();
            async move { c.describe_mailbox(MAILBOX).await.map(|_| Some(())).map_err(|s| anyhow!("{s:?}")) }
        })
        .await?;
    }
    Ok(())
}

// -------------------------------------------------------------------------------------------------
// d. A consumer that disconnects without acking hands its messages to the next one
// -------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_disconnected_consumer_messages_are_redelivered() {
    // The lease is far longer than the test: redelivery must come from the released stream.
    let cluster = ProcessCluster::builder().lease_ms(LONG_LEASE_MS).start().await.expect("cluster start");
    scenario_redelivery(&cluster).await.expect("scenario failed");
}

async fn scenario_redelivery(cluster: &ProcessCluster) -> Result<()> {
    const N: usize = 50;
    create_mailbox(cluster, 1, MAILBOX, 4).await?;
    let mut publisher = cluster.client(1).await?;
    let msgs = batch("d", MAILBOX, 0, N, 64);
    publish_retry(&mut publisher, &msgs, Duration::from_secs(20), Duration::from_secs(30)).await?;
    let ids: HashSet<String> = msgs.iter().map(|m| m.id.clone()).collect();
    trace("published; first consumer on node 2");

    let mut client2 = cluster.client(2).await?;
    let mut first = Consumer::open(&mut client2, MAILBOX, 100).await?;
    let got = first.take(N, Duration::from_secs(30)).await?;
    let got_ids: HashSet<String> = got.iter().map(delivered_id).collect::<Result<_>>()?;
    ensure!(got_ids == ids, "first consumer did not get exactly the published messages");
    ensure!(got.iter().all(|d| d.attempt == 1), "first deliveries must have attempt 1");
    drop(first); // disconnect without acking
    trace("first consumer got everything and disconnected");

    let mut client3 = cluster.client(3).await?;
    let mut second = Consumer::open(&mut client3, MAILBOX, 100).await?;
    let started = Instant::now();
    let again = consume_all_of(&mut second, &ids, Duration::from_secs(30), Duration::from_secs(2)).await?;
    trace(format!("redelivered {} messages {:?} after the first consumer left", again.len(), started.elapsed()));
    ensure!(again.len() == N, "expected {N} redeliveries, got {}", again.len());
    for d in &again {
        ensure!(d.attempt > 1, "{} redelivered with attempt {}", delivered_id(d)?, d.attempt);
    }
    ack_all(&mut second, &again).await?;
    trace("acked");
    wait_pending(cluster, 1, MAILBOX, 0, Duration::from_secs(30)).await?;
    trace("pending is 0");
    cluster.check_no_crash()
}

// -------------------------------------------------------------------------------------------------
// e. Bad input gets its exact status and changes nothing; no quorum gives UNAVAILABLE in time
// -------------------------------------------------------------------------------------------------

const MAX_PAYLOAD: usize = 64 * 1024;
const REQUEST_TIMEOUT_MS: u64 = 3000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_bad_input_gets_precise_status_and_changes_nothing() {
    let cluster = ProcessCluster::builder()
        .lease_ms(LONG_LEASE_MS)
        .max_payload_bytes(MAX_PAYLOAD as u64)
        .request_timeout_ms(REQUEST_TIMEOUT_MS)
        .start()
        .await
        .expect("cluster start");
    scenario_bad_input(&cluster).await.expect("scenario failed");
}

const MALFORMED_SERVICES: &[&str] = &[
    "",
    "TM/GOV/MINCOM",
    "TM/GOV/MINCOM/registry",
    "TM/GOV//registry/notices",
    "TM/GOV/MIN COM/registry/notices",
    "TM/GOV/MINCOM/registry/notices/v1/extra",
    "TM/GOV/MIN\u{0421}OM/registry/notices", // Cyrillic С
    "TM/GOV/MINCOM/registry/notices\n",
    "TM/GOV/MINCOM/registry/no\\tices",
    "TM/GOV/MINCOM/registry/notices/",
];

fn valid(id: &str, recipient: &str) -> Message {
    message(id, recipient, Some("k".into()), Bytes::from_static(b"x"))
}

async fn scenario_bad_input(cluster: &ProcessCluster) -> Result<()> {
    let unknown = "TM/GOV/MINCOM/registry/nobody-here";
    let long_part = format!("TM/GOV/{}/registry/notices", "x".repeat(65));
    create_mailbox(cluster, 1, MAILBOX, 4).await?;
    let mut c1 = cluster.client(1).await?;
    let setup = batch("e", MAILBOX, 0, 10, 64);
    publish_retry(&mut c1, &setup, Duration::from_secs(20), Duration::from_secs(30)).await?;
    // Boundary: exactly the maximum payload is accepted.
    let max = vec![message("e-max", MAILBOX, None, Bytes::from(vec![7u8; MAX_PAYLOAD]))];
    c1.publish(max).await.map_err(|s| anyhow!("payload of exactly max_payload_bytes refused: {s:?}"))?;
    wait_pending(cluster, 1, MAILBOX, 11, Duration::from_secs(30)).await?;

    let before_list = mailbox_list(cluster, 1).await?;
    let before_pending = pending_everywhere(cluster).await?;

    let mut failures = Vec::new();
    for n in cluster.node_ids() {
        let mut c = cluster.client(n).await?;
        let mut check = |what: String, r: Result<String, tonic::Status>, want: Code| match r {
            Ok(v) => failures.push(format!("node {n}: {what}: expected {want:?}, got Ok({v})")),
            Err(s) if s.code() != want => {
                failures.push(format!("node {n}: {what}: expected {want:?}, got {:?} ({})", s.code(), s.message()))
            }
            Err(_) => {}
        };

        // Admin: malformed ids, duplicates, unknown mailboxes.
        let mut bad_services: Vec<String> = MALFORMED_SERVICES.iter().map(|s| s.to_string()).collect();
        bad_services.push(long_part.clone());
        for bad in &bad_services {
            check(format!("CreateMailbox({bad:?})"), dbg(c.create_mailbox(bad, 0).await), Code::InvalidArgument);
            check(format!("DescribeMailbox({bad:?})"), dbg(c.describe_mailbox(bad).await), Code::InvalidArgument);
        }
        check("CreateMailbox(existing)".into(), dbg(c.create_mailbox(MAILBOX, 0).await), Code::AlreadyExists);
        check("DescribeMailbox(unknown)".into(), dbg(c.describe_mailbox(unknown).await), Code::NotFound);

        // Publish.
        check("Publish(empty batch)".into(), dbg(c.publish(vec![]).await), Code::InvalidArgument);
        for bad in &bad_services {
            check(format!("Publish(recipient {bad:?})"), dbg(c.publish(vec![valid("bad-rcpt", bad)]).await), Code::InvalidArgument);
        }
        check("Publish(unknown recipient)".into(), dbg(c.publish(vec![valid("unknown-rcpt", unknown)]).await), Code::NotFound);
        let empty = message("empty-payload", MAILBOX, None, Bytes::new());
        check("Publish(empty payload)".into(), dbg(c.publish(vec![empty.clone()]).await), Code::InvalidArgument);
        let big = message("big-payload", MAILBOX, None, Bytes::from(vec![7u8; MAX_PAYLOAD + 1]));
        check("Publish(payload max+1)".into(), dbg(c.publish(vec![big.clone()]).await), Code::ResourceExhausted);
        for bad_id in [String::new(), "x".repeat(256), "id\nwith-newline".into(), "id-\u{e9}".into(), "id\u{0}".into()] {
            check(format!("Publish(message id {bad_id:?})"), dbg(c.publish(vec![valid(&bad_id, MAILBOX)]).await), Code::InvalidArgument);
        }
        // A batch is rejected as a whole: its valid messages are not stored either.
        let mixed = vec![valid(&format!("mixed-ok-{n}"), MAILBOX), empty.clone()];
        check("Publish(valid + empty payload)".into(), dbg(c.publish(mixed).await), Code::InvalidArgument);
        let mixed = vec![valid(&format!("mixed-ok2-{n}"), MAILBOX), big.clone()];
        check("Publish(valid + oversized)".into(), dbg(c.publish(mixed).await), Code::ResourceExhausted);
        let mixed = vec![valid(&format!("mixed-ok3-{n}"), MAILBOX), valid("mixed-unknown", unknown)];
        check("Publish(valid + unknown recipient)".into(), dbg(c.publish(mixed).await), Code::NotFound);

        // Subscribe.
        for bad in &bad_services {
            check(format!("Subscribe({bad:?})"), subscribe_outcome(&mut c, bad).await, Code::InvalidArgument);
        }
        check("Subscribe(unknown)".into(), subscribe_outcome(&mut c, unknown).await, Code::NotFound);
    }
    ensure!(failures.is_empty(), "{} wrong statuses:\n{}", failures.len(), failures.join("\n"));

    // Nothing changed.
    let after_list = mailbox_list(cluster, 1).await?;
    ensure!(before_list == after_list, "mailbox list changed:\nbefore {before_list:?}\nafter  {after_list:?}");
    let after_pending = pending_everywhere(cluster).await?;
    ensure!(before_pending == after_pending, "pending counts changed: before {before_pending:?}, after {after_pending:?}");
    for n in cluster.node_ids() {
        ensure!(mailbox_list(cluster, n).await? == before_list, "node {n} lists different mailboxes");
    }
    cluster.check_no_crash()?;

    // No quorum: the survivor answers UNAVAILABLE within the request timeout, never hangs.
    cluster.kill(2).await?;
    cluster.kill(3).await?;
    let bound = Duration::from_millis(REQUEST_TIMEOUT_MS) + Duration::from_secs(4);
    let mut c1 = cluster.client(1).await?;
    let spread = batch("e-noquorum", MAILBOX, 0, 8, 8);
    let cases: Vec<(&str, Vec<Message>)> = vec![("single message", vec![valid("e-noquorum-single", MAILBOX)]), ("batch over all partitions", spread)];
    for (what, msgs) in cases {
        let started = Instant::now();
        let r = tokio::time::timeout(bound + Duration::from_secs(10), c1.publish(msgs)).await;
        let elapsed = started.elapsed();
        match r {
            Err(_) => bail!("no-quorum publish ({what}) hung for more than {:?}", bound + Duration::from_secs(10)),
            Ok(Ok(resp)) => bail!("no-quorum publish ({what}) succeeded: {resp:?}"),
            Ok(Err(s)) => {
                ensure!(s.code() == Code::Unavailable, "no-quorum publish ({what}): expected UNAVAILABLE, got {:?} ({})", s.code(), s.message());
                ensure!(elapsed <= bound, "no-quorum publish ({what}) took {elapsed:?} (bound {bound:?})");
                trace(format!("no-quorum publish ({what}): UNAVAILABLE after {elapsed:?}: {}", s.message()));
            }
        }
    }
    let started = Instant::now();
    let r = tokio::time::timeout(bound + Duration::from_secs(10), c1.create_mailbox("TM/GOV/MINCOM/registry/late", 0)).await;
    let elapsed = started.elapsed();
    match r {
        Err(_) => bail!("no-quorum CreateMailbox hung"),
        Ok(Ok(info)) => bail!("no-quorum CreateMailbox succeeded: {info:?}"),
        Ok(Err(s)) => {
            ensure!(s.code() == Code::Unavailable, "no-quorum CreateMailbox: expected UNAVAILABLE, got {:?} ({})", s.code(), s.message());
            ensure!(elapsed <= bound, "no-quorum CreateMailbox took {elapsed:?} (bound {bound:?})");
        }
    }
    cluster.check_no_crash()
}

fn dbg<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Result<String, tonic::Status> {
    r.map(|v| format!("{v:?}"))
}

/// Status of a subscription attempt: the error of the call itself, or the first stream event.
async fn subscribe_outcome(client: &mut kerwen_node::client::Client, mailbox: &str) -> Result<String, tonic::Status> {
    let mut sub = match tokio::time::timeout(Duration::from_secs(15), client.subscribe(mailbox, 10)).await {
        Err(_) => return Ok("Subscribe call hung for 15 s".into()),
        Ok(r) => r?,
    };
    match sub.next_event(Duration::from_secs(5)).await {
        Ok(ev) => Ok(format!("stream open, first event {ev:?}")),
        Err(s) if s.code() == Code::DeadlineExceeded && s.message().contains("no event within") => {
            Ok("stream open, no error within 5 s".into())
        }
        Err(s) => Err(s),
    }
}

/// The mailbox list through `node`, without the volatile pending counters.
async fn mailbox_list(cluster: &ProcessCluster, node: NodeId) -> Result<Vec<(String, u64, u32, Vec<u32>)>> {
    let mut c = cluster.client(node).await?;
    let mut list: Vec<_> = c
        .list_mailboxes()
        .await
        .map_err(|s| anyhow!("ListMailboxes on node {node}: {s:?}"))?
        .into_iter()
        .map(|m| (m.service, m.id, m.partitions, m.partition_shards))
        .collect();
    list.sort();
    Ok(list)
}

async fn pending_everywhere(cluster: &ProcessCluster) -> Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    for n in cluster.running() {
        let mut c = cluster.client(n).await?;
        let info = c.describe_mailbox(MAILBOX).await.map_err(|s| anyhow!("DescribeMailbox on node {n}: {s:?}"))?;
        out.push((info.pending_messages, info.pending_bytes));
    }
    Ok(out)
}

// -------------------------------------------------------------------------------------------------
// f. Network partition: isolate a shard leader, publish on the majority side, heal, converge
// -------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_partitioned_leader_is_replaced_and_cluster_converges() {
    let cluster = ProcessCluster::builder()
        .lease_ms(LONG_LEASE_MS)
        .request_timeout_ms(REQUEST_TIMEOUT_MS)
        .start()
        .await
        .expect("cluster start");
    scenario_partition(&cluster).await.expect("scenario failed");
}

async fn scenario_partition(cluster: &ProcessCluster) -> Result<()> {
    let info = create_mailbox(cluster, 1, MAILBOX, 4).await?;
    let shard = info.partition_shards[0];
    let mut acked: HashSet<String> = HashSet::new();
    let mut ambiguous: HashSet<String> = HashSet::new();
    let mut record = |msgs: &[Message], attempts: u32| {
        for m in msgs {
            acked.insert(m.id.clone());
            if attempts > 1 {
                ambiguous.insert(m.id.clone());
            }
        }
    };

    let mut c1 = cluster.client(1).await?;
    let before = batch("f-before", MAILBOX, 0, 100, 64);
    let (_, attempts) = publish_retry(&mut c1, &before, Duration::from_secs(20), Duration::from_secs(30)).await?;
    record(&before, attempts);

    let old_leader = cluster.leader_of(shard).await?;
    let majority: Vec<NodeId> = cluster.node_ids().into_iter().filter(|&n| n != old_leader).collect();
    trace(format!("isolating node {old_leader} (leader of shard {shard}); majority {majority:?}"));
    cluster.partition(&[old_leader]).await?;

    // The majority elects a new leader among themselves, for every group.
    let started = Instant::now();
    let leaders = cluster.wait_leaders(&majority, &[], Duration::from_secs(60)).await?;
    trace(format!("majority leaders {leaders:?} after {:?}", started.elapsed()));
    ensure!(leaders[&shard] != old_leader);

    trace("publishing through the majority");
    // Publishing through the majority works.
    let mut cm = cluster.client(majority[0]).await?;
    let during = batch("f-during", MAILBOX, 0, 100, 64);
    let (_, attempts) = publish_retry(&mut cm, &during, Duration::from_secs(10), Duration::from_secs(40))
        .await
        .context("publishing through the majority during the partition")?;
    record(&during, attempts);

    trace("publishing through the isolated node");
    // The isolated node cannot commit anything: bounded UNAVAILABLE.
    // Through that node only: a routing client would go around it to the new leaders.
    let mut ci = cluster.client(old_leader).await?.without_direct_routing();
    let isolated_msgs = batch("f-isolated", MAILBOX, 0, 8, 8);
    let bound = Duration::from_millis(REQUEST_TIMEOUT_MS) + Duration::from_secs(4);
    let started = Instant::now();
    match tokio::time::timeout(bound + Duration::from_secs(10), ci.publish(isolated_msgs.clone())).await {
        Err(_) => bail!("publish through the isolated node hung"),
        Ok(Ok(resp)) => bail!("publish through the isolated node succeeded without a quorum: {resp:?}"),
        Ok(Err(s)) => {
            let elapsed = started.elapsed();
            ensure!(s.code() == Code::Unavailable, "isolated publish: expected UNAVAILABLE, got {:?} ({})", s.code(), s.message());
            ensure!(elapsed <= bound, "isolated publish took {elapsed:?} (bound {bound:?})");
        }
    }

    // Heal: everyone agrees on the leaders again and the replicas converge.
    cluster.heal().await?;
    let started = Instant::now();
    cluster.wait_healthy(Duration::from_secs(60)).await.context("convergence after heal")?;
    trace(format!("converged after heal in {:?}", started.elapsed()));

    // The formerly isolated node serves publishes again.
    let after = batch("f-after", MAILBOX, 0, 100, 64);
    let (_, attempts) = publish_retry(&mut ci, &after, Duration::from_secs(10), Duration::from_secs(40))
        .await
        .context("publishing through the healed node")?;
    record(&after, attempts);
    cluster.wait_converged(&cluster.node_ids(), Duration::from_secs(30)).await?;

    trace("published through the healed node; replicas converged; consuming");
    // Nothing acked was lost.
    let mut client = cluster.client(majority[1]).await?;
    let mut consumer = Consumer::open(&mut client, MAILBOX, 1000).await?;
    let deliveries = consume_all_of(&mut consumer, &acked, Duration::from_secs(60), Duration::from_secs(2)).await?;
    let (_, dup_bad) = duplicates(&deliveries, &ambiguous)?;
    ensure!(dup_bad.is_empty(), "messages published once but delivered twice: {dup_bad:?}");
    let isolated_ids: HashSet<String> = isolated_msgs.iter().map(|m| m.id.clone()).collect();
    let leaked = deliveries.iter().map(delivered_id).collect::<Result<HashSet<_>>>()?;
    let leaked: Vec<&String> = leaked.intersection(&isolated_ids).collect();
    if !leaked.is_empty() {
        // UNAVAILABLE after a timeout is formally ambiguous, so this is reported, not failed.
        trace(format!("WARNING: messages refused by the isolated node were later stored: {leaked:?}"));
    }
    ack_all(&mut consumer, &deliveries).await?;
    for n in cluster.node_ids() {
        wait_pending(cluster, n, MAILBOX, 0, Duration::from_secs(30)).await?;
    }
    cluster.check_no_crash()
}
