//! Evidence signing keys: every node makes an Ed25519 key on first start, separate from its
//! TLS key, keeps it across restarts, and publishes its public half in the metadata group.

mod harness;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use harness::{eventually, Cluster, ProcessCluster};

async fn published_keys(cluster: &ProcessCluster, node: u64) -> Result<BTreeMap<String, Vec<u8>>> {
    let client = cluster.client(node).await?;
    let keys = client.access().list_signing_keys(kerwen_proto::v1::ListSigningKeysRequest {}).await?.into_inner().keys;
    Ok(keys.into_iter().map(|k| (k.key_id, k.public_key.to_vec())).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_publishes_its_signing_key_and_keeps_it_across_restarts() -> Result<()> {
    let cluster = ProcessCluster::builder().start().await?;
    let keys = eventually("three published signing keys", Duration::from_secs(30), || async {
        let keys = published_keys(&cluster, 1).await?;
        ensure!(keys.len() == 3, "published so far: {:?}", keys.keys().collect::<Vec<_>>());
        Ok(Some(keys))
    })
    .await?;
    for node in 1..=3u64 {
        let prefix = format!("node-{node}-");
        ensure!(keys.keys().filter(|id| id.starts_with(&prefix)).count() == 1, "one key of node {node}: {keys:?}");
        let file = cluster.root().join(format!("node-{node}/data/{}", kerwen_node::signing::KEY_FILE));
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).context("the key file")?.permissions());
        ensure!(mode & 0o077 == 0, "{} is readable by others ({mode:o})", file.display());
        let tls_key = std::fs::read_to_string(cluster.node_cert(node).key)?;
        let signing = std::fs::read_to_string(&file)?;
        ensure!(!tls_key.contains(&signing) && !signing.contains(tls_key.trim()), "the signing key is not the TLS key");
    }
    ensure!(keys.values().all(|k| k.len() == 32), "Ed25519 public keys are 32 bytes");

    cluster.stop(2).await?;
    cluster.start(2).await?;
    cluster.wait_healthy(Duration::from_secs(60)).await?;
    let after = published_keys(&cluster, 2).await?;
    ensure!(after == keys, "a restart keeps the key: before {keys:?}, after {after:?}");
    cluster.check_no_crash()
}
