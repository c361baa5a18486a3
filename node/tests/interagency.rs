//! Interagency exchange on real 3-node clusters: asynchronous request/reply across a node
//! kill, and payloads sealed end to end (HPKE) to the recipient subsystem's registered key,
//! so that neither the nodes' storage nor their traffic with each other carries the
//! plaintext; only the recipient opens them, across a key rotation.

mod harness;

use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use harness::*;
use kerwen_node::sealed::{self, KeyStore, SealError, SecretKey};
use kerwen_node::transport::WIRE_TAP_ENV;
use kerwen_proto::v1 as pb;
use sha2::{Digest, Sha256};
use tonic::Code;

const PROVIDER: &str = "TM/GOV/MINFIN/tax";
const REQUESTER: &str = TEST_SUBSYSTEM;
const STRANGER: &str = "TM/GOV/MINEDU/schools";
const MAILBOX: &str = "TM/GOV/MINFIN/tax/declarations";
/// Relative to each node's directory (its working directory), beside its data directory.
const WIRE_TAP: &str = "wire-tap.bin";

fn canary(what: &str) -> String {
    format!("KERWEN-{what}-CANARY-{:016x}", rand::random::<u64>())
}

async fn register_key(cluster: &ProcessCluster, node: NodeId, key: &SecretKey) -> Result<pb::EncryptionKey> {
    let req = pb::RegisterEncryptionKeyRequest {
        subsystem: key.subsystem.clone(),
        key_id: key.key_id.clone(),
        public_key: key.public_key.to_vec().into(),
    };
    let client = cluster.client_as(node, &key.subsystem).await?;
    Ok(client.access().register_encryption_key(req).await.map_err(|s| anyhow!("registering {}: {s:?}", key.key_id))?.into_inner())
}

/// Publishes one message through `client` (retrying transient failures) and returns its result.
async fn publish_one(client: &mut kerwen_node::client::Client, id: &str, payload: Vec<u8>) -> Result<pb::PublishResult> {
    let (response, _) = publish_retry(client, &[message(id, MAILBOX, None, payload)], Duration::from_secs(10), Duration::from_secs(30)).await?;
    response.results.into_iter().next().context("no publish result")
}

/// Criterion 2: sealed payloads are stored, replicated, forwarded and delivered as bytes only
/// the recipient can open. The nodes run without encryption at rest and tap their internal
/// traffic, and an unsealed control message is found in both places, so the search can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_payloads_are_unreadable_in_storage_and_between_nodes() {
    let cluster = ProcessCluster::builder()
        .shards(1)
        .arg("--encryption-at-rest")
        .arg("none")
        .env(WIRE_TAP_ENV, WIRE_TAP)
        .start()
        .await
        .expect("cluster start");
    scenario_sealed(&cluster).await.expect("scenario failed");
}

async fn scenario_sealed(cluster: &ProcessCluster) -> Result<()> {
    for s in [PROVIDER, STRANGER] {
        cluster.register(s).await?;
    }
    let leader = cluster.leader_of(1).await?;
    let followers: Vec<NodeId> = cluster.node_ids().into_iter().filter(|n| *n != leader).collect();
    let (publish_via, consume_via) = (followers[0], followers[1]);

    let mut provider = cluster.client_as(publish_via, PROVIDER).await?;
    provider.create_mailbox(MAILBOX, 1).await.map_err(|s| anyhow!("creating the mailbox: {s:?}"))?;
    wait_mailbox_known(cluster, MAILBOX).await?;
    provider.grant(MAILBOX, REQUESTER).await.map_err(|s| anyhow!("granting: {s:?}"))?;

    // Only the subsystem itself registers its keys: not another subsystem, not an operator.
    let keys_dir = cluster.root().join("provider-keys");
    let mut store = KeyStore::load(&keys_dir)?;
    let k1 = SecretKey::generate(PROVIDER, "k1", 0);
    let forged = pb::RegisterEncryptionKeyRequest { subsystem: PROVIDER.into(), key_id: "evil".into(), public_key: vec![7; 32].into() };
    for (who, client) in [("a stranger", cluster.client_as(1, STRANGER).await?), ("an operator", cluster.admin_client(1).await?)] {
        let refused = client.access().register_encryption_key(forged.clone()).await;
        ensure!(refused.as_ref().is_err_and(|s| s.code() == Code::PermissionDenied), "{who} registered the provider's key: {refused:?}");
    }
    // Through a follower only, so every publish crosses the peer wire to the leader.
    let mut requester = cluster.client(publish_via).await?.without_direct_routing();
    let none_yet = requester.seal_for(MAILBOX, b"x").await;
    ensure!(none_yet.as_ref().is_err_and(|s| s.code() == Code::FailedPrecondition), "sealed without a key: {none_yet:?}");
    register_key(cluster, publish_via, &k1).await?;
    store.add(k1.clone())?;

    // One sealed message under k1; then the provider rotates to k2 while it is in flight.
    let (secret_1, secret_2, control) = (canary("SEALED"), canary("SEALED"), canary("PLAIN"));
    let sealed_1 = requester.seal_for(MAILBOX, secret_1.as_bytes()).await.map_err(|s| anyhow!("sealing: {s:?}"))?;
    ensure!(sealed::Envelope::parse(&sealed_1)?.key_id == "k1", "sealed to the wrong key");
    let r1 = publish_one(&mut requester, "sealed-1", sealed_1.clone()).await?;
    let k2 = SecretKey::generate(PROVIDER, "k2", 1);
    register_key(cluster, publish_via, &k2).await?;
    store.add(k2.clone())?;
    let retire = pb::RetireEncryptionKeyRequest { subsystem: PROVIDER.into(), key_id: "k1".into() };
    let retired = provider.access().retire_encryption_key(retire).await.map_err(|s| anyhow!("retiring k1: {s:?}"))?.into_inner();
    ensure!(retired.valid_until_unix_ms.is_some(), "k1 not retired: {retired:?}");
    let sealed_2 = requester.seal_for(MAILBOX, secret_2.as_bytes()).await.map_err(|s| anyhow!("sealing: {s:?}"))?;
    ensure!(sealed::Envelope::parse(&sealed_2)?.key_id == "k2", "after the rotation, sealed to the retired key");
    publish_one(&mut requester, "sealed-2", sealed_2).await?;
    publish_one(&mut requester, "plain", control.clone().into_bytes()).await?;

    // The evidence covers the sealed bytes: what the cluster signed is what it stored.
    ensure!(r1.payload_sha256.as_ref() == Sha256::digest(&sealed_1).as_slice(), "the receipt covers other bytes");

    // The recipient consumes through the other follower (Peer.Fetch from the leader) and opens both.
    let mut consumer = Consumer::open(&mut cluster.client_as(consume_via, PROVIDER).await?.without_direct_routing(), MAILBOX, 16).await?;
    let delivered = consumer.take(3, Duration::from_secs(30)).await?;
    let mut opened = Vec::new();
    for d in &delivered {
        let m = d.message.as_ref().context("delivery without message")?;
        if m.id == "plain" {
            ensure!(m.payload.as_ref() == control.as_bytes(), "the control payload changed");
            continue;
        }
        let o = store.open(MAILBOX, &m.payload).with_context(|| format!("opening {}", m.id))?;
        ensure!(!m.payload.windows(8).any(|w| o.plaintext.windows(8).any(|p| p == w)), "{}: plaintext in the delivery", m.id);
        // A third party given only the payload key can check what the message said.
        ensure!(sealed::open_with_payload_key(MAILBOX, &m.payload, &o.payload_key)? == o.plaintext, "revealed key");
        // Someone else's key opens nothing, even holding the bytes.
        let other = SecretKey::generate(STRANGER, &o.key_id, 0);
        ensure!(matches!(sealed::open(MAILBOX, &other, &m.payload), Err(SealError::DoesNotOpen)), "a non-recipient opened {}", m.id);
        opened.push((m.id.clone(), o.key_id, String::from_utf8(o.plaintext)?));
    }
    opened.sort();
    let expected = vec![("sealed-1".to_owned(), "k1".to_owned(), secret_1.clone()), ("sealed-2".to_owned(), "k2".to_owned(), secret_2.clone())];
    ensure!(opened == expected, "opened {opened:?}");
    // Nor can another subsystem consume the mailbox at all.
    let mut stranger = cluster.client_as(consume_via, STRANGER).await?;
    let refused = stranger.subscribe(MAILBOX, 1).await;
    ensure!(refused.as_ref().err().is_some_and(|s| s.code() == Code::PermissionDenied), "a stranger subscribed");
    // The control stays stored (an acked message may already be compacted away).
    let sealed_ones: Vec<_> = delivered.iter().filter(|d| d.message.as_ref().is_some_and(|m| m.id != "plain")).cloned().collect();
    ack_all(&mut consumer, &sealed_ones).await?;
    drop(consumer);
    cluster.wait_converged(&cluster.node_ids(), Duration::from_secs(30)).await?;
    cluster.stop_all().await?;

    for node in cluster.node_ids() {
        let (data, tap) = (cluster.data_dir(node), cluster.data_dir(node).with_file_name(WIRE_TAP));
        ensure!(!files_containing(&data, control.as_bytes())?.is_empty(), "node {node}: control not found in its data dir");
        ensure!(!files_containing(&tap, control.as_bytes())?.is_empty(), "node {node}: control not found in its wire tap");
        for secret in [&secret_1, &secret_2] {
            for place in [&data, &tap] {
                let found = files_containing(place, secret.as_bytes())?;
                ensure!(found.is_empty(), "node {node}: a sealed plaintext is readable in {found:?}");
            }
        }
    }
    Ok(())
}

const REQUESTS: &str = "TM/GOV/MINFIN/tax/income-certificates";
const REPLIES: &str = "TM/GOV/MINCOM/registry/replies";

/// Criterion 1: a request/reply round trip with the provider's node killed while the request
/// is in flight (the provider had replied through it but not yet acked the request). The
/// request is redelivered, answered again, and the requester still gets exactly one reply,
/// bound to its request by id and hash, with evidence that verifies offline. Replies to
/// unknown or foreign requests are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_arrives_once_bound_to_its_request_across_a_provider_node_kill() {
    let cluster = ProcessCluster::builder().shards(1).lease_ms(2_000).start().await.expect("cluster start");
    scenario_request_reply(&cluster).await.expect("scenario failed");
}

async fn scenario_request_reply(cluster: &ProcessCluster) -> Result<()> {
    use kerwen_broker::evidence::message_leaf;
    use kerwen_broker::request::{HEADER_REPLY_TO, HEADER_REQUEST_HASH, HEADER_REQUEST_ID};
    use kerwen_node::receipts;
    use kerwen_node::request_reply::{reply_id, reply_message};

    for s in [PROVIDER, STRANGER] {
        cluster.register(s).await?;
    }
    let mut provider_admin = cluster.client_as(1, PROVIDER).await?;
    provider_admin.create_mailbox(REQUESTS, 2).await.map_err(|s| anyhow!("creating {REQUESTS}: {s:?}"))?;
    provider_admin.grant(REQUESTS, REQUESTER).await.map_err(|s| anyhow!("granting: {s:?}"))?;
    create_mailbox(cluster, 1, REPLIES, 1).await?;
    wait_mailbox_known(cluster, REQUESTS).await?;
    let keys = eventually("three published signing keys", Duration::from_secs(30), || async {
        let keys = trusted_keys(cluster).await?;
        Ok((keys.keys.len() == 3).then_some(keys))
    })
    .await?;

    // A request may only ask for replies at one of the requester's own services.
    let mut requester = cluster.client(1).await?;
    let mut foreign = message("bad-request", REQUESTS, None, b"x".to_vec());
    foreign.headers.insert(HEADER_REPLY_TO.into(), format!("{STRANGER}/inbox"));
    let refused = requester.publish(vec![foreign]).await;
    ensure!(refused.as_ref().is_err_and(|s| s.code() == Code::PermissionDenied), "a foreign reply-to was accepted: {refused:?}");

    // The requester waits (through node 1, failing over) while the provider works through node 3.
    let (provider_node, other_node) = (3, 2);
    let request = message("cert-req-1", REQUESTS, None, b"income certificate for citizen 42, year 2025".to_vec());
    let waiting = tokio::spawn({
        let mut requester = cluster.client_with(&[1, 2, 3], cluster.subsystem_tls(REQUESTER)?).await?;
        let request = request.clone();
        async move { requester.request(request, REPLIES, Duration::from_secs(90)).await }
    });
    let mut provider = cluster.client_as(provider_node, PROVIDER).await?;
    let mut consumer = Consumer::open(&mut provider, REQUESTS, 4).await?;
    let delivered = consumer.take(1, Duration::from_secs(30)).await?.remove(0);
    ensure!(delivered.message.as_ref().is_some_and(|m| m.id == request.id), "delivered {delivered:?}");

    // Refusals: another subsystem or an operator cannot answer it, nor the provider with a
    // wrong hash, to another service, or to a request that does not exist.
    let good = reply_message(&delivered, b"certificate: income 1000".to_vec())?;
    for (who, mut client) in [("a stranger", cluster.client_as(other_node, STRANGER).await?), ("an operator", cluster.admin_client(other_node).await?)] {
        let r = client.publish(vec![good.clone()]).await;
        ensure!(r.as_ref().is_err_and(|s| s.code() == Code::PermissionDenied), "{who} answered: {r:?}");
    }
    let mut wrong_hash = good.clone();
    wrong_hash.headers.insert(HEADER_REQUEST_HASH.into(), hex::encode([0u8; 32]));
    let mut elsewhere = good.clone();
    elsewhere.recipient = format!("{REQUESTER}/other");
    let mut unknown = good.clone();
    unknown.headers.insert(HEADER_REQUEST_ID.into(), "no-such-request".into());
    for (what, bad, code) in [("a wrong hash", wrong_hash, Code::InvalidArgument), ("another service", elsewhere, Code::InvalidArgument), ("an unknown request", unknown, Code::NotFound)] {
        let r = provider.publish(vec![bad]).await;
        ensure!(r.as_ref().is_err_and(|s| s.code() == code), "a reply to {what} got {r:?}");
    }

    // The provider replies through its node, which dies before the request's ack.
    let first = provider.reply(&delivered, good.payload.to_vec(), Duration::from_secs(30)).await.map_err(|s| anyhow!("reply: {s:?}"))?;
    ensure!(first.id == reply_id(&request.id), "reply id {}", first.id);
    drop(consumer);
    cluster.kill(provider_node).await?;

    // It comes back through another node: the request is redelivered once its lease lapses,
    // and the second reply is the same message, stored once.
    let mut provider = cluster.client_as(other_node, PROVIDER).await?;
    let mut consumer = Consumer::open(&mut provider, REQUESTS, 4).await?;
    let again = consumer.take(1, Duration::from_secs(60)).await?.remove(0);
    ensure!(again.attempt >= 2 && again.message.as_ref().is_some_and(|m| m.id == request.id), "redelivered {again:?}");
    let second = provider.reply(&again, good.payload.to_vec(), Duration::from_secs(30)).await.map_err(|s| anyhow!("second reply: {s:?}"))?;
    ensure!(second.position == first.position, "the second reply was stored again: {:?} vs {:?}", second.position, first.position);
    consumer.ack(positions_of(std::slice::from_ref(&again))).await?;

    let exchanged = waiting.await?.map_err(|s| anyhow!("request: {s:?}"))?;
    let reply = &exchanged.reply;
    let m = reply.message.as_ref().context("reply without message")?;
    ensure!(m.payload.as_ref() == good.payload.as_ref() && m.sender == PROVIDER, "reply {m:?}");

    // Bound to its request: the headers name it and its hash, which is the leaf of the request
    // the cluster signed at publish; both receipts verify offline.
    let request_facts = receipts::publish_facts(&{ let mut r = request.clone(); r.headers.insert(HEADER_REPLY_TO.into(), REPLIES.into()); r }, &exchanged.request)?;
    let request_receipt = receipts::from_proto(exchanged.request.receipt.as_ref().context("request receipt")?)?;
    request_receipt.verify_message(&request_facts, &keys).context("the request's receipt")?;
    ensure!(m.headers.get(HEADER_REQUEST_ID) == Some(&request.id), "reply names {:?}", m.headers);
    ensure!(m.headers.get(HEADER_REQUEST_HASH) == Some(&hex::encode(message_leaf(&request_facts))), "reply hash {:?}", m.headers);
    let reply_facts = receipts::delivery_facts(reply)?;
    let reply_receipt = receipts::from_proto(reply.receipt.as_ref().context("reply receipt")?)?;
    reply_receipt.verify_message(&reply_facts, &keys).context("the reply's receipt")?;

    // Exactly once: nothing else waits in the reply mailbox.
    let mut rest = Consumer::open(&mut cluster.client(1).await?, REPLIES, 4).await?;
    let extra = rest.drain(Duration::from_secs(3)).await?;
    ensure!(extra.is_empty(), "more replies arrived: {extra:?}");
    Ok(())
}
