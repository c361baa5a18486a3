//! Limits that keep one client from exhausting a node: a publish request's total payload
//! (`--max-batch-bytes`) and the number of positions in one ack.

mod harness;

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use harness::{Cluster, ProcessCluster};
use kerwen_proto::v1::{Message, Position};
use tonic::Code;

const MAILBOX: &str = "TM/GOV/MINCOM/registry/limits";

fn message(id: usize, size: usize) -> Message {
    Message {
        id: format!("m-{id}"),
        recipient: MAILBOX.into(),
        headers: HashMap::new(),
        payload: vec![7u8; size].into(),
        ordering_key: None,
        ttl_ms: None,
        sender: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_batches_and_acks_are_refused() -> Result<()> {
    let cluster = ProcessCluster::builder()
        .max_payload_bytes(600)
        .arg("--max-batch-bytes")
        .arg("1000")
        .start()
        .await?;
    let mut client = cluster.client(1).await?;
    client.create_mailbox(MAILBOX, 1).await.map_err(|s| anyhow!("create: {s}"))?;

    let too_big = client.publish(vec![message(1, 600), message(2, 600)]).await;
    ensure!(
        too_big.as_ref().map_err(|s| s.code()).err() == Some(Code::ResourceExhausted),
        "1200 bytes in one batch: {too_big:?}"
    );
    client.publish(vec![message(3, 600)]).await.map_err(|s| anyhow!("a batch within the limit: {s}"))?;
    let pending = client.describe_mailbox(MAILBOX).await.map_err(|s| anyhow!("describe: {s}"))?.pending_messages;
    ensure!(pending == 1, "only the accepted batch is stored, found {pending}");

    let mut sub = client.subscribe(MAILBOX, 10).await.map_err(|s| anyhow!("subscribe: {s}"))?;
    sub.next_delivery(Duration::from_secs(30)).await.map_err(|s| anyhow!("delivery: {s}"))?;
    let flood: Vec<Position> = (0..5_000).map(|i| Position { partition: 0, sequence: i }).collect();
    sub.ack(flood).await.map_err(|s| anyhow!("send ack: {s}"))?;
    match sub.next_event(Duration::from_secs(30)).await {
        Err(s) if s.code() == Code::InvalidArgument => {}
        other => return Err(anyhow!("an ack of 5000 positions must be refused, got {other:?}")),
    }
    Ok(())
}
