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
    let message = ArchivedMessage { facts, receipt: receipts[0].clone(), delivery: None };
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

// -------------------------------------------------------------------------------------------------
// Receipts on the publish and delivery paths (issue 6, criteria 1, 2 and 4).
// -------------------------------------------------------------------------------------------------

const MAILBOX: &str = "TM/GOV/MINCOM/registry/certificates";

/// Flips one random byte (to a random other value) at `count` random places of `bytes`, one
/// place at a time, and checks that `verifies` refuses every variant.
fn every_flip_is_caught(what: &str, bytes: &[u8], count: usize, verifies: impl Fn(&[u8]) -> bool) -> Result<()> {
    use rand::Rng;
    ensure!(verifies(bytes), "{what}: the untouched bytes must verify");
    let mut rng = rand::rng();
    for _ in 0..count {
        let at = rng.random_range(0..bytes.len());
        let mut changed = bytes.to_vec();
        changed[at] ^= rng.random_range(1..=255u8);
        ensure!(!verifies(&changed), "{what}: flipping byte {at} ({:?} -> {:?}) still verifies", bytes[at] as char, changed[at] as char);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_of_publish_delivery_and_ack_verify_offline_and_outlive_the_payload() -> Result<()> {
    use kerwen_broker::evidence::{ArchivedMessage, EvidenceExport};
    use kerwen_node::receipts;

    let cluster = ProcessCluster::builder().start().await?;
    harness::create_mailbox(&cluster, 1, MAILBOX, 2).await?;
    harness::wait_mailbox_known(&cluster, MAILBOX).await?;
    let keys = eventually("three published signing keys", Duration::from_secs(30), || async {
        let keys = harness::trusted_keys(&cluster).await?;
        ensure!(keys.keys.len() == 3, "published so far: {:?}", keys.keys.keys().collect::<Vec<_>>());
        Ok(Some(keys))
    })
    .await?;

    // Several publishes, so the shards' chains have several batches each.
    let mut client = cluster.client(1).await?;
    let mut published = BTreeMap::new();
    for round in 0..6 {
        let mut sent = harness::batch(&format!("cert-{round}"), MAILBOX, 0, 5, 3);
        if round == 1 {
            sent[0].headers.insert("traceparent".into(), format!("00-{round:032x}-{round:016x}-01"));
        }
        let resp = client.publish(sent.clone()).await?;
        for (m, r) in sent.iter().zip(&resp.results) {
            let receipt = receipts::from_proto(r.receipt.as_ref().context("every published message has a receipt")?)?;
            let facts = receipts::publish_facts(m, r)?;
            receipt.verify_message(&facts, &keys).with_context(|| format!("publish receipt of {}", m.id))?;
            published.insert(m.id.clone(), (facts, receipt, m.payload.clone()));
        }
    }
    // A retry of an accepted message gets the first copy's receipt and accept time.
    let first = harness::batch("cert-0", MAILBOX, 0, 1, 3);
    let again = client.publish(first.clone()).await?;
    let (facts0, receipt0, _) = &published[&first[0].id];
    ensure!(receipts::from_proto(again.results[0].receipt.as_ref().context("receipt")?)? == *receipt0, "a duplicate gets the first receipt");
    ensure!(receipts::publish_facts(&first[0], &again.results[0])? == *facts0, "a duplicate gets the first accept time");

    // Deliveries carry the same receipts; acks come back with delivery receipts.
    let mut consumer = harness::Consumer::open(&mut client, MAILBOX, 100).await?;
    let deliveries = consumer.take(published.len(), Duration::from_secs(30)).await?;
    for d in &deliveries {
        let facts = receipts::delivery_facts(d)?;
        let receipt = receipts::from_proto(d.receipt.as_ref().context("every delivery has a receipt")?)?;
        let (published_facts, published_receipt, _) = &published[&facts.message_id];
        ensure!(facts == *published_facts && receipt == *published_receipt, "delivery of {} differs from its publish", facts.message_id);
    }
    let positions = harness::positions_of(&deliveries);
    consumer.ack(positions.clone()).await?;
    consumer.wait_confirmed(&positions, Duration::from_secs(30)).await?;
    let mut files = BTreeMap::new();
    for a in consumer.sub.take_ack_receipts() {
        let delivery = receipts::ack_from_proto(&a)?;
        let (facts, receipt, _) = published.get(&a.message_id).context("an ack receipt of a published message")?;
        let file = ArchivedMessage { facts: facts.clone(), receipt: receipt.clone(), delivery: Some(delivery) };
        file.verify(&keys).with_context(|| format!("delivery receipt of {}", a.message_id))?;
        files.insert(a.message_id.clone(), file);
    }
    ensure!(files.len() == published.len(), "{} delivery receipts for {} messages", files.len(), published.len());
    harness::wait_pending(&cluster, 1, MAILBOX, 0, Duration::from_secs(30)).await?;

    // Criterion 1: any flipped byte of a receipt file or a payload fails verification.
    let (id, file) = files.iter().next().context("one receipt")?;
    let json = serde_json::to_vec(file)?;
    every_flip_is_caught("receipt", &json, 400, |b| {
        serde_json::from_slice::<ArchivedMessage>(b).is_ok_and(|m| m.verify(&keys).is_ok())
    })?;
    let payload = &published[id].2;
    every_flip_is_caught("payload", payload, 50, |b| {
        use sha2::Digest;
        let facts = kerwen_broker::evidence::MessageFacts { payload_sha256: sha2::Sha256::digest(b).into(), ..file.facts.clone() };
        file.receipt.verify_message(&facts, &keys).is_ok()
    })?;

    // Criterion 2: after ack and purge the evidence exports and verifies, acks included.
    let export = client
        .admin()
        .export_evidence(kerwen_proto::v1::ExportEvidenceRequest { mailbox: MAILBOX.into(), from_unix_ms: 0, to_unix_ms: 0 })
        .await?
        .into_inner();
    let archives = export.archives.iter().map(|a| serde_json::from_slice(a)).collect::<Result<Vec<_>, _>>()?;
    let export = EvidenceExport { mailbox: MAILBOX.into(), archives };
    export.verify(Some(&keys)).context("the export verifies")?;
    let exported: usize = export.archives.iter().map(|a| a.messages.len()).sum();
    let acked: usize = export.archives.iter().flat_map(|a| &a.messages).filter(|m| m.delivery.is_some()).count();
    ensure!(exported == published.len() && acked == published.len(), "exported {exported} messages, {acked} acked, of {}", published.len());
    let json = serde_json::to_vec(&export)?;
    every_flip_is_caught("export", &json, 400, |b| {
        serde_json::from_slice::<EvidenceExport>(b).is_ok_and(|e| e.verify(Some(&keys)).is_ok())
    })?;

    // Criterion 4: a deleted or reordered batch is detected.
    let long = export.archives.iter().position(|a| a.batches.len() >= 3).context("an archive of three batches or more")?;
    let mut deleted = export.clone();
    deleted.archives[long].batches.remove(1);
    ensure!(deleted.verify(Some(&keys)).is_err(), "a deleted batch is detected");
    deleted.archives[long].last_batch -= 1;
    ensure!(deleted.verify(Some(&keys)).is_err(), "a deleted batch is detected even with the range adjusted");
    let mut reordered = export.clone();
    reordered.archives[long].batches.swap(0, 1);
    ensure!(reordered.verify(Some(&keys)).is_err(), "reordered batches are detected");

    // The CLI verifies the export offline.
    let dir = tempfile::tempdir()?;
    let (export_file, keys_file) = (dir.path().join("export.json"), dir.path().join("keys.json"));
    std::fs::write(&export_file, &json)?;
    std::fs::write(&keys_file, serde_json::to_vec(&keys)?)?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kerwen"))
        .args(["evidence", "verify"])
        .arg(&export_file)
        .arg("--keys")
        .arg(&keys_file)
        .env("KERWEN_PROFILE", dir.path().join("none.toml"))
        .output()?;
    ensure!(out.status.success(), "kerwen evidence verify: {}", String::from_utf8_lossy(&out.stderr));
    cluster.check_no_crash()
}

// -------------------------------------------------------------------------------------------------
// Key rotation mid-stream (criterion 3).
// -------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_signed_before_and_after_a_key_rotation_verify_and_a_foreign_key_does_not() -> Result<()> {
    use ed25519_dalek::SigningKey;
    use kerwen_broker::evidence::{EvidenceError, SignedBatch};
    use kerwen_node::receipts;

    let cluster = ProcessCluster::builder().start().await?;
    harness::create_mailbox(&cluster, 1, MAILBOX, 1).await?;
    harness::wait_mailbox_known(&cluster, MAILBOX).await?;
    let mut client = cluster.client(1).await?;
    let publish = |client: &mut kerwen_node::client::Client, id: &str| {
        let m = harness::message(id, MAILBOX, None, format!("payload of {id}"));
        let mut client = client.clone();
        async move {
            let r = client.publish(vec![m.clone()]).await?.results.remove(0);
            let receipt = receipts::from_proto(r.receipt.as_ref().context("a receipt")?)?;
            anyhow::Ok((receipts::publish_facts(&m, &r)?, receipt))
        }
    };
    let (before_facts, before) = publish(&mut client, "before-rotation").await?;

    // Every node rotates (whichever leads the shard signs with its new key afterwards).
    let mut retired = Vec::new();
    for node in 1..=3u64 {
        let r = cluster.admin_client(node).await?.admin().rotate_signing_key(kerwen_proto::v1::RotateSigningKeyRequest {}).await?.into_inner();
        ensure!(r.node_id == node && r.retired_key_id != r.new_key_id, "node {node} rotated: {r:?}");
        retired.push(r.retired_key_id);
    }
    let (after_facts, after) = publish(&mut client, "after-rotation").await?;
    ensure!(retired.contains(&before.batch.header.key_id), "the first receipt was signed by a key now retired");
    ensure!(!retired.contains(&after.batch.header.key_id), "the second receipt was signed by a new key");

    let keys = harness::trusted_keys(&cluster).await?;
    before.verify_message(&before_facts, &keys).context("the receipt signed with the retired key")?;
    after.verify_message(&after_facts, &keys).context("the receipt signed with the new key")?;
    ensure!(keys.keys[&before.batch.header.key_id].valid_until_unix_ms.is_some(), "the old key is retired, still published");

    // Signed by a key nobody registered, under a registered id or under its own: refused.
    let rogue = SigningKey::from_bytes(&[9; 32]);
    let mut forged = after.clone();
    forged.batch = SignedBatch::sign(after.batch.header.clone(), &rogue);
    ensure!(forged.verify_message(&after_facts, &keys) == Err(EvidenceError::BadSignature), "a foreign signature under a known id");
    let mut header = after.batch.header.clone();
    header.key_id = "node-9-rogue".into();
    forged.batch = SignedBatch::sign(header, &rogue);
    ensure!(forged.verify_message(&after_facts, &keys) == Err(EvidenceError::UnknownKey("node-9-rogue".into())), "an unregistered key");

    // The chain continues across the rotation: one export holds both, and verifies.
    let export = client
        .admin()
        .export_evidence(kerwen_proto::v1::ExportEvidenceRequest { mailbox: MAILBOX.into(), from_unix_ms: 0, to_unix_ms: 0 })
        .await?
        .into_inner();
    ensure!(export.archives.len() == 1, "one shard holds the mailbox");
    let archive: kerwen_broker::evidence::Archive = serde_json::from_slice(&export.archives[0])?;
    archive.verify(Some(&keys)).context("the archive across the rotation")?;
    ensure!(archive.keys.keys.len() >= 2, "the archive carries both keys: {:?}", archive.keys.keys.keys().collect::<Vec<_>>());
    cluster.check_no_crash()
}

// -------------------------------------------------------------------------------------------------
// The evidence log's disk budget: a clear alarm before it is reached, then refusals.
// -------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evidence_log_near_its_budget_alarms_and_a_full_one_refuses_publishes() -> Result<()> {
    const BUDGET: u64 = 40_000;
    let cluster = ProcessCluster::builder().arg("--evidence-budget-bytes").arg(BUDGET.to_string()).start().await?;
    harness::create_mailbox(&cluster, 1, MAILBOX, 2).await?;
    harness::wait_mailbox_known(&cluster, MAILBOX).await?;
    let mut client = cluster.client(1).await?;
    let mut accepted = 0usize;
    let refusal = eventually("a publish refused for the evidence budget", Duration::from_secs(60), || {
        let mut client = client.clone();
        let batch = harness::batch(&format!("fill-{accepted}"), MAILBOX, 0, 10, 3);
        accepted += 10;
        async move {
            match client.publish(batch).await {
                Ok(_) => Ok(None),
                Err(s) => Ok(Some(s)),
            }
        }
    })
    .await?;
    ensure!(refusal.code() == tonic::Code::ResourceExhausted, "refused with {refusal:?}");
    ensure!(refusal.message().contains("evidence log"), "the refusal says why: {}", refusal.message());
    ensure!(accepted > 20, "only {accepted} messages fit a {BUDGET}-byte budget");
    eventually("the alarm in node 1's log", Duration::from_secs(10), || async {
        Ok(cluster.log_grep(1, "of its disk budget").first().cloned())
    })
    .await?;
    // Nothing accepted was lost: consuming still works.
    let mut consumer = harness::Consumer::open(&mut client, MAILBOX, 100).await?;
    let got = consumer.take(accepted - 10, Duration::from_secs(30)).await?;
    ensure!(!got.is_empty(), "the accepted messages are delivered");
    cluster.check_no_crash()
}
