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

/// `kerwen evidence verify` checks an archive and a receipt offline, and refuses tampered
/// ones, a payload that is not the receipt's, and an untrusted key.
#[test]
fn the_cli_verifies_receipts_and_archives_offline() -> Result<()> {
    use ed25519_dalek::SigningKey;
    use kerwen_broker::evidence::{message_leaf, seal, Archive, ArchivedMessage, BatchHeader, KeyRing, MessageFacts, PublicKeyRecord};
    use sha2::Digest;

    let dir = tempfile::tempdir()?;
    let key = SigningKey::from_bytes(&[3; 32]);
    let ring = KeyRing::new([PublicKeyRecord::of("node-1-1", &key, 0)]);
    let payload = b"declaration 2026-001".to_vec();
    let facts = MessageFacts {
        recipient: "TM/GOV/MINFIN/tax/declarations".into(),
        sender: "TM/GOV/MINCOM/registry".into(),
        message_id: "decl-2026-001".into(),
        accepted_unix_ms: 1_790_000_000_000,
        payload_sha256: sha2::Sha256::digest(&payload).into(),
        payload_len: payload.len() as u64,
        ordering_key: None,
        headers: Vec::new(),
    };
    let header = BatchHeader {
        version: kerwen_broker::evidence::EVIDENCE_VERSION,
        shard: 1,
        batch: 1,
        log_term: 1,
        log_index: 7,
        timestamp_unix_ms: 1_790_000_000_001,
        leaf_count: 0,
        root: [0; 32],
        prev: [0; 32],
        key_id: "node-1-1".into(),
    };
    let (batch, receipts) = seal(vec![message_leaf(&facts)], header, &key);
    let message = ArchivedMessage { facts, receipt: receipts[0].clone() };
    let archive = Archive {
        shard: 1,
        first_batch: 1,
        last_batch: 1,
        head: batch.link(),
        keys: ring.clone(),
        batches: vec![batch],
        messages: vec![message.clone()],
    };
    let write = |name: &str, bytes: Vec<u8>| -> Result<std::path::PathBuf> {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes)?;
        Ok(p)
    };
    let keys = write("keys.json", serde_json::to_vec(&ring)?)?;
    let receipt = write("receipt.json", serde_json::to_vec(&message)?)?;
    let archive_file = write("archive.json", serde_json::to_vec(&archive)?)?;
    let good_payload = write("payload", payload.clone())?;
    let bad_payload = write("other", b"declaration 2026-002".to_vec())?;
    let mut tampered = message.clone();
    tampered.facts.sender = "TM/GOV/MINEDU/schools".into();
    let tampered = write("tampered.json", serde_json::to_vec(&tampered)?)?;
    let rogue = write("rogue-keys.json", serde_json::to_vec(&KeyRing::new([PublicKeyRecord::of("node-1-1", &SigningKey::from_bytes(&[4; 32]), 0)]))?)?;

    let run = |args: &[&std::path::Path], extra: &[&str]| -> Result<bool> {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kerwen"));
        cmd.args(["evidence", "verify"]).args(args).args(extra).env("KERWEN_PROFILE", dir.path().join("none.toml"));
        let out = cmd.output()?;
        Ok(out.status.success())
    };
    let keys_s = keys.to_str().context("path")?;
    ensure!(run(&[&receipt], &["--keys", keys_s, "--payload", good_payload.to_str().context("path")?])?, "a good receipt and payload");
    ensure!(run(&[&archive_file], &["--keys", keys_s])?, "a good archive");
    ensure!(!run(&[&receipt], &["--keys", keys_s, "--payload", bad_payload.to_str().context("path")?])?, "another payload");
    ensure!(!run(&[&tampered], &["--keys", keys_s])?, "a changed sender");
    ensure!(!run(&[&archive_file], &["--keys", rogue.to_str().context("path")?])?, "an untrusted key ring");
    Ok(())
}
