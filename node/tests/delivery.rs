//! Acceptance tests of the delivery-semantics issue on a real 3-node cluster of `kerwen
//! serve` processes: idempotent publishing across a leader change, mailbox quotas, and
//! competing consumers.

mod harness;

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use harness::*;
use kerwen_node::client::Event;
use kerwen_proto::v1::{CreateMailboxRequest, Delivery, PublishResponse};
use tonic::Code;

const MAILBOX: &str = "TM/GOV/MINCOM/registry/declarations";
const LONG_LEASE_MS: u64 = 600_000;

fn positions(resp: &PublishResponse) -> Vec<(u32, u64)> {
    resp.results.iter().filter_map(|r| r.position.as_ref()).map(pos_key).collect()
}

// -------------------------------------------------------------------------------------------------
// 1. The same batch published twice, the second time through another node after killing the
//    leader, is stored once.
// -------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republished_batch_after_leader_kill_is_stored_once() {
    let cluster = ProcessCluster::builder().lease_ms(LONG_LEASE_MS).start().await.expect("cluster start");
    scenario_republish_after_leader_kill(&cluster).await.expect("scenario failed");
}

async fn scenario_republish_after_leader_kill(cluster: &ProcessCluster) -> Result<()> {
    const COUNT: usize = 300;
    let info = create_mailbox(cluster, 1, MAILBOX, 4).await?;
    let victim = cluster.leader_of(info.partition_shards[0]).await?;
    let survivor = cluster.node_ids().into_iter().find(|&n| n != victim).ok_or_else(|| anyhow!("one node only"))?;
    // Half the messages carry ordering keys, half are routed by id: both must find their
    // first copy when retried.
    let mut msgs = batch("dup", MAILBOX, 0, COUNT / 2, 16);
    msgs.extend((COUNT / 2..COUNT).map(|i| message(format!("dup-{i:06}"), MAILBOX, None, format!("payload {i}"))));

    let mut through_victim = cluster.client(victim).await?;
    let first = through_victim.publish(msgs.clone()).await.map_err(|s| anyhow!("first publish: {s:?}"))?;
    check_publish_response(&msgs, &first)?;
    trace(format!("published {COUNT} through node {victim}, the leader of shard {}; killing it", info.partition_shards[0]));
    cluster.kill(victim).await?;

    let mut through_survivor = cluster.client(survivor).await?;
    let (second, attempts) = publish_retry(&mut through_survivor, &msgs, Duration::from_secs(10), Duration::from_secs(60)).await?;
    trace(format!("republished through node {survivor} in {attempts} attempt(s)"));
    ensure!(positions(&first) == positions(&second), "the retry was not answered with the first positions");
    wait_pending(cluster, survivor, MAILBOX, COUNT as u64, Duration::from_secs(60)).await?;

    // The killed node comes back and the batch arrives a third time, through it.
    cluster.start(victim).await?;
    let (third, _) = publish_retry(&mut through_victim, &msgs, Duration::from_secs(10), Duration::from_secs(60)).await?;
    ensure!(positions(&first) == positions(&third), "the third copy was not answered with the first positions");

    let mut consumer = Consumer::open(&mut through_survivor, MAILBOX, 1_000).await?;
    let expected: HashSet<String> = msgs.iter().map(|m| m.id.clone()).collect();
    let deliveries = consume_all_of(&mut consumer, &expected, Duration::from_secs(60), Duration::from_secs(2)).await?;
    ensure!(deliveries.len() == COUNT, "{} deliveries of {COUNT} messages: stored more than once", deliveries.len());
    ack_all(&mut consumer, &deliveries).await?;
    wait_pending(cluster, survivor, MAILBOX, 0, Duration::from_secs(60)).await
}

// -------------------------------------------------------------------------------------------------
// 6. Publishing past the mailbox byte limit returns RESOURCE_EXHAUSTED and nothing accepted
//    before is lost.
// -------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_past_the_byte_quota_is_refused_and_nothing_accepted_is_lost() {
    let cluster = ProcessCluster::builder().lease_ms(LONG_LEASE_MS).start().await.expect("cluster start");
    scenario_quota(&cluster).await.expect("scenario failed");
}

async fn scenario_quota(cluster: &ProcessCluster) -> Result<()> {
    // One partition: the whole quota sits on one shard, so the limit is exact.
    const PAYLOAD: usize = 1_000;
    const MAX_BYTES: u64 = 50 * PAYLOAD as u64;
    let mut client = cluster.client(1).await?;
    let req = CreateMailboxRequest { service: MAILBOX.into(), partitions: 1, max_bytes: MAX_BYTES, ..Default::default() };
    let info = client.create_mailbox_with(req).await.map_err(|s| anyhow!("create: {s:?}"))?;
    ensure!(info.max_bytes == MAX_BYTES, "limit not recorded: {info:?}");
    wait_mailbox_known(cluster, MAILBOX).await?;

    let payload = "x".repeat(PAYLOAD);
    let mut accepted = Vec::new();
    let mut refused = None;
    for b in 0..20 {
        let msgs: Vec<_> = (0..8).map(|i| message(format!("q-{b}-{i}"), MAILBOX, None, payload.clone())).collect();
        match client.publish(msgs.clone()).await {
            Ok(resp) => {
                check_publish_response(&msgs, &resp)?;
                accepted.extend(msgs.into_iter().map(|m| m.id));
            }
            Err(s) if s.code() == Code::ResourceExhausted => {
                refused = Some(s.message().to_owned());
                break;
            }
            Err(s) => return Err(anyhow!("publish {b}: {s:?}")),
        }
    }
    let refused = refused.ok_or_else(|| anyhow!("160 KB published into a 50 KB mailbox without refusal"))?;
    trace(format!("refused after {} messages: {refused}", accepted.len()));
    ensure!(accepted.len() == 48, "48 messages of 1,000 bytes fit in 50,000 bytes, {} were accepted", accepted.len());
    ensure!(refused.contains(MAILBOX), "the refusal should name the mailbox: {refused}");
    for node in cluster.node_ids() {
        wait_pending(cluster, node, MAILBOX, accepted.len() as u64, Duration::from_secs(30)).await?;
    }

    let mut consumer = Consumer::open(&mut client, MAILBOX, 100).await?;
    let expected: HashSet<String> = accepted.iter().cloned().collect();
    let deliveries = consume_all_of(&mut consumer, &expected, Duration::from_secs(60), Duration::from_secs(1)).await?;
    ensure!(deliveries.len() == accepted.len(), "{} deliveries for {} accepted", deliveries.len(), accepted.len());
    ack_all(&mut consumer, &deliveries).await?;
    // Room again.
    let again: Vec<_> = (0..8).map(|i| message(format!("after-{i}"), MAILBOX, None, payload.clone())).collect();
    client.publish(again).await.map_err(|s| anyhow!("publish after consuming: {s:?}"))?;
    Ok(())
}

// -------------------------------------------------------------------------------------------------
// Competing consumers: a consumer that stops reading holds only what its credits allowed; the
// others get everything else, and its messages go to them once it disconnects.
// -------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_consumer_does_not_block_the_others() {
    let cluster = ProcessCluster::builder().lease_ms(LONG_LEASE_MS).start().await.expect("cluster start");
    scenario_stalled_consumer(&cluster).await.expect("scenario failed");
}

async fn scenario_stalled_consumer(cluster: &ProcessCluster) -> Result<()> {
    const COUNT: usize = 400;
    const STALLED_CREDITS: u32 = 10;
    create_mailbox(cluster, 1, MAILBOX, 4).await?;
    let mut publisher = cluster.client(1).await?;
    let msgs = batch("c", MAILBOX, 0, COUNT, 32);
    let resp = publisher.publish(msgs.clone()).await.map_err(|s| anyhow!("publish: {s:?}"))?;
    check_publish_response(&msgs, &resp)?;

    // Takes its credits' worth, then neither reads on, nor acks, nor grants more.
    let mut stalled_client = cluster.client(2).await?;
    let mut stalled = stalled_client.subscribe(MAILBOX, STALLED_CREDITS).await.map_err(|s| anyhow!("subscribe: {s:?}"))?;
    let mut held = HashSet::new();
    while held.len() < STALLED_CREDITS as usize {
        match stalled.next_event(Duration::from_secs(30)).await.map_err(|s| anyhow!("stalled consumer: {s:?}"))? {
            Some(Event::Delivery(d)) => {
                held.insert(delivered_id(&d)?);
            }
            Some(_) => {}
            None => return Err(anyhow!("the stalled consumer got only {} deliveries", held.len())),
        }
    }

    let mut active_client = cluster.client(3).await?;
    let mut active = Consumer::open(&mut active_client, MAILBOX, 1_000).await?;
    let others = active.take(COUNT - held.len(), Duration::from_secs(60)).await?;
    let got: HashSet<String> = others.iter().map(delivered_id).collect::<Result<_>>()?;
    ensure!(got.len() == COUNT - held.len(), "duplicates among the active consumer's deliveries");
    ensure!(got.is_disjoint(&held), "the active consumer got messages leased to the stalled one");
    ack_all(&mut active, &others).await?;
    wait_pending(cluster, 1, MAILBOX, held.len() as u64, Duration::from_secs(30)).await?;

    // The stalled consumer goes away: its leases are released to the active one.
    drop(stalled);
    let expected: HashSet<String> = held.clone();
    let rest = consume_all_of(&mut active, &expected, Duration::from_secs(60), Duration::from_secs(1)).await?;
    ensure!(rest.len() == held.len(), "{} redeliveries for {} released messages", rest.len(), held.len());
    ack_all(&mut active, &rest).await?;
    wait_pending(cluster, 1, MAILBOX, 0, Duration::from_secs(30)).await
}

// -------------------------------------------------------------------------------------------------
// 2. Nack with delay, lease expiry and back-off give the expected attempt counts and earliest
//    redelivery times, across a leader kill; after max_attempts the message is in the DLQ with
//    its reason; redrive brings it back and it is delivered.
// -------------------------------------------------------------------------------------------------

fn unix_ms_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Creates a mailbox with explicit settings through node 1 and waits until every node knows it.
async fn create_mailbox_as(cluster: &ProcessCluster, req: CreateMailboxRequest) -> Result<kerwen_proto::v1::MailboxInfo> {
    let mut client = cluster.client(1).await?;
    let info = client.create_mailbox_with(req).await.map_err(|s| anyhow!("create mailbox: {s:?}"))?;
    wait_mailbox_known(cluster, &info.service).await?;
    Ok(info)
}

/// Waits for the next delivery of the single message under test and checks its attempt.
async fn next_attempt(consumer: &mut Consumer, attempt: u32) -> Result<Delivery> {
    let d = consumer.next(Duration::from_secs(30)).await?.ok_or_else(|| anyhow!("attempt {attempt} never came"))?;
    ensure!(d.attempt == attempt, "expected attempt {attempt}, got {} ({d:?})", d.attempt);
    Ok(d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_backoff_and_lease_expiry_count_attempts_then_dead_letter_and_redrive() {
    let cluster = ProcessCluster::builder().start().await.expect("cluster start");
    scenario_redelivery(&cluster).await.expect("scenario failed");
}

async fn scenario_redelivery(cluster: &ProcessCluster) -> Result<()> {
    const LEASE_MS: u64 = 3_000;
    const NACK_DELAY_MS: u64 = 1_500;
    const BACKOFF_INITIAL_MS: u64 = 400;
    const BACKOFF_MAX_MS: u64 = 1_000;
    let info = create_mailbox_as(
        cluster,
        CreateMailboxRequest {
            service: MAILBOX.into(),
            partitions: 1,
            lease_ms: LEASE_MS,
            max_attempts: 4,
            backoff_initial_ms: BACKOFF_INITIAL_MS,
            backoff_max_ms: BACKOFF_MAX_MS,
            ..Default::default()
        },
    )
    .await?;
    let shard = info.partition_shards[0];
    let victim = cluster.leader_of(shard).await?;
    // The consumer talks to a node that survives, so its stream (and leases) outlive the kill.
    let survivor = cluster.node_ids().into_iter().find(|&n| n != victim).ok_or_else(|| anyhow!("one node only"))?;
    let mut client = cluster.client(survivor).await?.without_direct_routing();
    let poison = vec![message("poison-1", MAILBOX, None, "cannot be processed")];
    publish_retry(&mut client, &poison, Duration::from_secs(10), Duration::from_secs(30)).await?;
    let mut consumer = Consumer::open(&mut client, MAILBOX, 10).await?;

    // Attempt 1, nacked with an explicit delay.
    let d1 = next_attempt(&mut consumer, 1).await?;
    let pos = d1.position.ok_or_else(|| anyhow!("no position"))?;
    let nacked = tokio::time::Instant::now();
    consumer.sub.nack_after(vec![pos], Duration::from_millis(NACK_DELAY_MS)).await.map_err(|s| anyhow!("nack: {s:?}"))?;
    let d2 = next_attempt(&mut consumer, 2).await?;
    let waited = nacked.elapsed();
    ensure!(waited >= Duration::from_millis(NACK_DELAY_MS), "redelivered {waited:?} after a {NACK_DELAY_MS} ms nack delay");
    trace(format!("attempt 2 came {waited:?} after the nack (delay {NACK_DELAY_MS} ms)"));
    // The consumer extends its lease, so however long the election below takes, attempt 2 is
    // still its own when it nacks.
    consumer.sub.extend(vec![pos], Duration::from_secs(120)).await.map_err(|s| anyhow!("extend: {s:?}"))?;
    eventually("the extended lease", Duration::from_secs(10), || async {
        Ok((unix_ms_now() > d2.lease_expires_unix_ms + 2 * BACKOFF_MAX_MS as i64).then_some(()))
    })
    .await?;
    ensure!(consumer.next(Duration::from_millis(500)).await?.is_none(), "redelivered although the lease was extended");

    // The shard leader dies while attempt 2 is out: attempts and back-off live on.
    cluster.kill(victim).await?;
    let new_leader = cluster.wait_leader(shard, &cluster.running(), &[victim], Duration::from_secs(60)).await?;
    trace(format!("killed node {victim}; node {new_leader} leads shard {shard} now"));

    // Nack without delay: the back-off after 2 attempts is 2 x 400 ms.
    let nacked = tokio::time::Instant::now();
    consumer.sub.nack(vec![pos]).await.map_err(|s| anyhow!("nack: {s:?}"))?;
    let d3 = next_attempt(&mut consumer, 3).await?;
    let waited = nacked.elapsed();
    ensure!(waited >= Duration::from_millis(2 * BACKOFF_INITIAL_MS), "attempt 3 came {waited:?} after the nack, before the 800 ms back-off");
    trace(format!("attempt 3 came {waited:?} after a plain nack (back-off 800 ms)"));

    // Attempt 3 is left to expire: redelivered no earlier than the lease end plus the back-off
    // after 3 attempts (4 x 400 ms, capped at 1,000 ms).
    let d4 = next_attempt(&mut consumer, 4).await?;
    let earliest = d3.lease_expires_unix_ms + BACKOFF_MAX_MS as i64;
    let now = unix_ms_now();
    ensure!(now >= earliest, "attempt 4 came at {now}, before lease end + back-off ({earliest})");
    trace(format!("attempt 4 came {} ms after the lease end (back-off {BACKOFF_MAX_MS} ms)", now - d3.lease_expires_unix_ms));

    // The last allowed attempt is nacked: the message goes to the dead-letter queue.
    consumer.sub.nack(vec![d4.position.ok_or_else(|| anyhow!("no position"))?]).await.map_err(|s| anyhow!("nack: {s:?}"))?;
    let dead = eventually("the message in the dead-letter queue", Duration::from_secs(30), || async {
        let list = client.clone().list_dead_letters(MAILBOX, 10).await.map_err(|s| anyhow!("list: {s:?}"))?;
        Ok((list.len() == 1).then_some(list))
    })
    .await?;
    let info = dead[0].info.clone().unwrap_or_default();
    ensure!(dead[0].id == "poison-1", "wrong dead letter {:?}", dead[0]);
    ensure!(info.reason == "max_attempts" && info.attempts == 4, "reason and attempts: {info:?}");
    let outcomes: Vec<&str> = info.history.iter().map(|a| a.outcome.as_str()).collect();
    ensure!(outcomes == ["nacked", "nacked", "expired", "nacked"], "attempt history {outcomes:?}");
    ensure!(consumer.next(Duration::from_secs(3)).await?.is_none(), "a dead-lettered message was delivered from the mailbox");
    let described = client.describe_mailbox(MAILBOX).await.map_err(|s| anyhow!("describe: {s:?}"))?;
    ensure!((described.pending_messages, described.dead_letter_messages) == (0, 1), "counts: {described:?}");

    // Redrive: it comes back as a new message, attempt 1, and can be acked for good.
    let moved = client.redrive(MAILBOX, Vec::new(), true).await.map_err(|s| anyhow!("redrive: {s:?}"))?;
    ensure!(moved == 1, "redrove {moved}");
    let again = next_attempt(&mut consumer, 1).await?;
    ensure!(delivered_id(&again)? == "poison-1", "unexpected {again:?}");
    ack_all(&mut consumer, &[again]).await?;
    cluster.start(victim).await?;
    for node in cluster.node_ids() {
        wait_pending(cluster, node, MAILBOX, 0, Duration::from_secs(60)).await?;
    }
    ensure!(client.list_dead_letters(MAILBOX, 10).await.map_err(|s| anyhow!("list: {s:?}"))?.is_empty(), "DLQ not empty");
    Ok(())
}

// -------------------------------------------------------------------------------------------------
// 3. TTL: an expired message is never delivered and lands in the DLQ as `expired`.
// -------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_never_delivered_and_land_in_the_dead_letter_queue() {
    let cluster = ProcessCluster::builder().start().await.expect("cluster start");
    scenario_ttl(&cluster).await.expect("scenario failed");
}

async fn scenario_ttl(cluster: &ProcessCluster) -> Result<()> {
    const DEFAULT_TTL_MS: u64 = 2_000;
    let info = create_mailbox_as(
        cluster,
        CreateMailboxRequest { service: MAILBOX.into(), partitions: 4, default_ttl_ms: DEFAULT_TTL_MS, ..Default::default() },
    )
    .await?;
    let mut client = cluster.client_any().await?;
    // 20 messages with the mailbox default (2 s), 20 with their own 10 minutes.
    let mut short: Vec<_> = (0..20).map(|i| message(format!("short-{i}"), MAILBOX, None, "stale soon")).collect();
    let long: Vec<_> = (0..20)
        .map(|i| {
            let mut m = message(format!("long-{i}"), MAILBOX, None, "fresh");
            m.ttl_ms = Some(600_000);
            m
        })
        .collect();
    short.extend(long.iter().cloned());
    let published_at = unix_ms_now();
    publish_retry(&mut client, &short, Duration::from_secs(10), Duration::from_secs(30)).await?;

    // The leader of one of the shards dies before they expire: the new leader dead-letters.
    let victim = cluster.leader_of(info.partition_shards[0]).await?;
    cluster.kill(victim).await?;
    let dead = eventually("20 expired messages in the dead-letter queue", Duration::from_secs(60), || async {
        let list = client.clone().list_dead_letters(MAILBOX, 100).await.map_err(|s| anyhow!("list: {s:?}"))?;
        Ok((list.len() >= 20).then_some(list))
    })
    .await?;
    ensure!(unix_ms_now() >= published_at + DEFAULT_TTL_MS as i64, "dead-lettered before the time to live ran out");
    ensure!(dead.len() == 20, "{} dead letters, expected the 20 short-lived ones", dead.len());
    for d in &dead {
        let info = d.info.clone().unwrap_or_default();
        ensure!(d.id.starts_with("short-") && info.reason == "expired" && info.attempts == 0, "unexpected dead letter {d:?}");
    }

    // Only the long-lived ones are ever delivered.
    let mut consumer = Consumer::open(&mut client, MAILBOX, 100).await?;
    let expected: HashSet<String> = long.iter().map(|m| m.id.clone()).collect();
    let deliveries = consume_all_of(&mut consumer, &expected, Duration::from_secs(60), Duration::from_secs(2)).await?;
    for d in &deliveries {
        let id = delivered_id(d)?;
        ensure!(id.starts_with("long-"), "expired message {id} was delivered");
    }
    ack_all(&mut consumer, &deliveries).await?;
    cluster.start(victim).await?;

    // The dead-letter queue is consumed like a mailbox; its deliveries say why they are there.
    let mut dlq = cluster.client_any().await?.subscribe_to(MAILBOX, 100, true).await.map_err(|s| anyhow!("{s:?}"))?;
    let mut seen = HashSet::new();
    while seen.len() < 20 {
        let d = dlq.next_delivery(Duration::from_secs(30)).await.map_err(|s| anyhow!("dlq: {s:?}"))?;
        let d = d.ok_or_else(|| anyhow!("dead-letter stream ended"))?;
        ensure!(d.dead_letter.as_ref().is_some_and(|l| l.reason == "expired"), "dead-letter delivery without its reason: {d:?}");
        seen.insert(delivered_id(&d)?);
        dlq.ack(d.position.into_iter().collect()).await.map_err(|s| anyhow!("ack: {s:?}"))?;
    }
    dlq.wait_acked(20, Duration::from_secs(30)).await.map_err(|s| anyhow!("dlq acks: {s:?}"))?;
    let described = client.describe_mailbox(MAILBOX).await.map_err(|s| anyhow!("describe: {s:?}"))?;
    ensure!((described.pending_messages, described.dead_letter_messages) == (0, 0), "counts: {described:?}");
    Ok(())
}

// -------------------------------------------------------------------------------------------------
// 4. Ordered mailbox: per key, strict order holds with 4 competing consumers and a leader kill.
// -------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_mailbox_keeps_per_key_order_with_four_consumers_and_a_leader_kill() {
    let cluster = ProcessCluster::builder().start().await.expect("cluster start");
    scenario_ordered(&cluster).await.expect("scenario failed");
}

/// What the consumers saw, in one shared order: a delivery of (key, index), or an ack of it
/// about to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Delivered(usize, usize),
    AckSent(usize, usize),
}

/// A delivery's details, for the failure report.
#[derive(Debug, Clone)]
struct SeenDetail {
    consumer: usize,
    attempt: u32,
    position: (u32, u64),
}

const ORDERED_KEYS: usize = 8;
const PER_KEY: usize = 40;

fn ordered_id(key: usize, index: usize) -> String {
    format!("k{key}-{index:04}")
}

fn parse_ordered_id(id: &str) -> Result<(usize, usize)> {
    let (key, index) = id.trim_start_matches('k').split_once('-').ok_or_else(|| anyhow!("bad id {id}"))?;
    Ok((key.parse()?, index.parse()?))
}

/// One competing consumer: takes deliveries, "processes" each for a moment, records it and
/// acks it; reconnects through any node when its stream breaks (its node was killed).
async fn ordered_consumer(
    me: usize,
    cluster: &ProcessCluster,
    log: &std::sync::Mutex<Vec<(Seen, SeenDetail)>>,
    done: &std::sync::atomic::AtomicBool,
) -> Result<()> {
    use std::sync::atomic::Ordering;
    while !done.load(Ordering::SeqCst) {
        let mut client = cluster.client_any().await?;
        let Ok(mut sub) = client.subscribe(MAILBOX, 4).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        loop {
            if done.load(Ordering::SeqCst) {
                return Ok(());
            }
            let d = match sub.next_delivery(Duration::from_millis(500)).await {
                Ok(Some(d)) => d,
                Err(s) if s.code() == Code::DeadlineExceeded => continue,
                // The stream broke (its node died): reconnect elsewhere.
                Ok(None) | Err(_) => break,
            };
            let (key, index) = parse_ordered_id(&delivered_id(&d)?)?;
            let detail = SeenDetail { consumer: me, attempt: d.attempt, position: delivered_pos(&d)? };
            log.lock().map_err(|_| anyhow!("poisoned"))?.push((Seen::Delivered(key, index), detail.clone()));
            tokio::time::sleep(Duration::from_millis(5 + (index % 3) as u64 * 5)).await;
            log.lock().map_err(|_| anyhow!("poisoned"))?.push((Seen::AckSent(key, index), detail));
            if sub.ack(d.position.into_iter().collect()).await.is_err() || sub.credit(1).await.is_err() {
                break;
            }
        }
    }
    Ok(())
}

async fn scenario_ordered(cluster: &ProcessCluster) -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let info = create_mailbox_as(
        cluster,
        CreateMailboxRequest { service: MAILBOX.into(), partitions: 2, ordered: true, lease_ms: 3_000, ..Default::default() },
    )
    .await?;
    let mut client = cluster.client_any().await?;
    // Published interleaved, in index order per key, in batches.
    let all: Vec<_> = (0..PER_KEY)
        .flat_map(|index| (0..ORDERED_KEYS).map(move |key| (key, index)))
        .map(|(key, index)| message(ordered_id(key, index), MAILBOX, Some(format!("key-{key}")), format!("{key}/{index}")))
        .collect();
    for chunk in all.chunks(40) {
        publish_retry(&mut client, chunk, Duration::from_secs(10), Duration::from_secs(30)).await?;
    }

    let log = std::sync::Mutex::new(Vec::new());
    let done = AtomicBool::new(false);
    let total = ORDERED_KEYS * PER_KEY;
    let acked_keys = |log: &std::sync::Mutex<Vec<(Seen, SeenDetail)>>| -> HashSet<(usize, usize)> {
        let log = log.lock().unwrap_or_else(|p| p.into_inner());
        log.iter().filter_map(|(s, _)| if let Seen::AckSent(k, i) = s { Some((*k, *i)) } else { None }).collect()
    };
    let driver = async {
        // Kill the leader of the first shard once a third is through, bring it back later.
        eventually("a third of the messages acked", Duration::from_secs(120), || async {
            Ok((acked_keys(&log).len() >= total / 3).then_some(()))
        })
        .await?;
        let victim = cluster.leader_of(info.partition_shards[0]).await?;
        trace(format!("killing node {victim}, leader of shard {}", info.partition_shards[0]));
        cluster.kill(victim).await?;
        eventually("two thirds of the messages acked", Duration::from_secs(120), || async {
            Ok((acked_keys(&log).len() >= 2 * total / 3).then_some(()))
        })
        .await?;
        cluster.start(victim).await?;
        eventually("every message acked", Duration::from_secs(180), || async {
            Ok((acked_keys(&log).len() >= total).then_some(()))
        })
        .await?;
        for node in cluster.node_ids() {
            wait_pending(cluster, node, MAILBOX, 0, Duration::from_secs(60)).await?;
        }
        done.store(true, Ordering::SeqCst);
        Ok::<_, anyhow::Error>(())
    };
    let consumers = futures::future::try_join_all((0..4).map(|me| ordered_consumer(me, cluster, &log, &done)));
    let (driven, consumed) = tokio::join!(driver, consumers);
    done.store(true, Ordering::SeqCst);
    driven?;
    consumed?;

    // Per key: deliveries go 0, 1, 2 ... (a redelivery repeats the current index, never an
    // earlier one), and index i+1 is delivered only after index i's ack was sent.
    let log = log.into_inner().map_err(|_| anyhow!("poisoned"))?;
    let mut redeliveries = 0;
    for key in 0..ORDERED_KEYS {
        let mut current: Option<usize> = None;
        let mut acked_current = false;
        for (at, (seen, _)) in log.iter().enumerate() {
            match *seen {
                Seen::Delivered(k, i) if k == key => match current {
                    Some(c) if i == c => redeliveries += 1,
                    Some(c) if i == c + 1 && acked_current => {
                        current = Some(i);
                        acked_current = false;
                    }
                    None if i == 0 => current = Some(0),
                    _ => {
                        let history: Vec<String> = log[..=at]
                            .iter()
                            .filter(|(s, _)| matches!(s, Seen::Delivered(k, _) | Seen::AckSent(k, _) if *k == key))
                            .map(|(s, d)| format!("{s:?} c{} a{} {:?}", d.consumer, d.attempt, d.position))
                            .collect();
                        let tail = &history[history.len().saturating_sub(16)..];
                        anyhow::bail!("key {key}: index {i} delivered after {current:?} (acked: {acked_current}); last events:\n{}", tail.join("\n"))
                    }
                },
                Seen::AckSent(k, i) if k == key && Some(i) == current => acked_current = true,
                _ => {}
            }
        }
        ensure!(current == Some(PER_KEY - 1) && acked_current, "key {key}: ended at {current:?}");
    }
    trace(format!("{} deliveries in order per key, {redeliveries} redeliveries", log.len() / 2));
    Ok(())
}
