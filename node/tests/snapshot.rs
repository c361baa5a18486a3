//! A replica that was down while the others snapshotted and purged their logs is brought up
//! to date by a snapshot, and its state is then complete enough to lead.

mod harness;

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use harness::{Cluster, ProcessCluster};
use kerwen_node::client::Client;
use kerwen_proto::v1::{GroupStatus, Message};

const MAILBOX: &str = "TM/GOV/MINCOM/registry/snapshots";
const SHARD: u32 = 1;

async fn shard_status(cluster: &ProcessCluster, node: u64) -> Result<GroupStatus> {
    let status = cluster.status(node).await?;
    status.groups.into_iter().find(|g| g.group == SHARD).context("shard 1 missing from status")
}

async fn publish(client: &mut Client, first: usize, count: usize) -> Result<()> {
    let messages = (first..first + count)
        .map(|i| Message {
            id: format!("m-{i}"),
            recipient: MAILBOX.into(),
            headers: HashMap::new(),
            payload: format!("payload {i}").into_bytes().into(),
            ordering_key: None,
            ttl_ms: None,
            sender: String::new(),
        })
        .collect();
    client.publish(messages).await.map_err(|s| anyhow::anyhow!("publish: {s}"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_replica_catches_up_from_a_snapshot() -> Result<()> {
    let cluster = ProcessCluster::builder()
        .shards(1)
        .arg("--snapshot-after-entries")
        .arg("20")
        .start()
        .await?;
    let mut client = cluster.client(1).await?;
    client.create_mailbox(MAILBOX, 1).await.map_err(|s| anyhow::anyhow!("create: {s}"))?;
    publish(&mut client, 0, 5).await?;
    cluster.wait_converged(&[1, 2, 3], Duration::from_secs(30)).await?;

    // Node 3 goes away; 150 more entries make the others snapshot and purge past its log.
    let behind = shard_status(&cluster, 3).await?.last_log_index;
    cluster.kill(3).await?;
    for batch in 0..150 {
        publish(&mut client, 5 + batch * 4, 4).await?;
    }
    // Snapshots and purges happen in the background; poll until the log node 3 needs is gone.
    let leader = cluster.wait_leader(SHARD, &[1, 2], &[], Duration::from_secs(30)).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let purged = shard_status(&cluster, leader).await?.purged_index;
        if purged > behind + 1 {
            break;
        }
        ensure!(tokio::time::Instant::now() < deadline, "the leader purged only up to {purged}; node 3 stopped at {behind}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Back up, node 3 can only catch up by installing a snapshot.
    cluster.start(3).await?;
    cluster.wait_converged(&[1, 2, 3], Duration::from_secs(60)).await?;
    let caught_up = shard_status(&cluster, 3).await?;
    ensure!(caught_up.snapshot_index > behind, "node 3 reports snapshot index {} (was at {behind})", caught_up.snapshot_index);

    // Make node 3 the only possible leader: with node 2 gone and node 1 missing the last
    // entry, Raft's election rule lets only node 3 win. Then everything is served from its
    // state machine.
    cluster.kill(1).await?;
    let mut via3 = cluster.client(3).await?;
    publish(&mut via3, 10_000, 1).await?;
    cluster.kill(2).await?;
    cluster.start(1).await?;
    let leader = cluster.wait_leader(SHARD, &[1, 3], &[], Duration::from_secs(60)).await?;
    ensure!(leader == 3, "node {leader} leads shard 1; only node 3 has the last entry");

    let expected = 5 + 150 * 4 + 1;
    let mut sub = via3.subscribe(MAILBOX, 1_000).await.map_err(|s| anyhow::anyhow!("subscribe: {s}"))?;
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < expected {
        let delivery = sub
            .next_delivery(Duration::from_secs(30))
            .await
            .map_err(|s| anyhow::anyhow!("after {} deliveries: {s}", seen.len()))?
            .context("stream ended")?;
        let id = delivery.message.context("delivery without message")?.id;
        seen.insert(id);
    }
    ensure!(seen.contains("m-0") && seen.contains("m-10000"), "first and last messages present");
    Ok(())
}
