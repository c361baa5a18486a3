//! Acceptance tests of the delivery-semantics issue on a real 3-node cluster of `kerwen
//! serve` processes: idempotent publishing across a leader change, mailbox quotas, and
//! competing consumers.

mod harness;

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use harness::*;
use kerwen_node::client::Event;
use kerwen_proto::v1::{CreateMailboxRequest, PublishResponse};
use tonic::Code;

const MAILBOX: &str = "TM/GOV/MINFIN/tax/declarations";
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
