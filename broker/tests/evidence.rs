//! Evidence checks that need no cluster: receipts verify offline, and flipping any single
//! byte of a receipt, a payload or an archive of signed batches makes verification fail; key
//! rotation; deleted or reordered batches in a chain are detected.

use ed25519_dalek::SigningKey;
use kerwen_broker::evidence::{
    message_leaf, seal, verify_chain, Archive, ArchiveError, ArchivedMessage, BatchHeader, EvidenceError, Hash, KeyRing,
    MessageFacts, PublicKeyRecord, Receipt, SignedBatch, EVIDENCE_VERSION,
};
use rand::{Rng, RngCore, SeedableRng};
use sha2::{Digest, Sha256};

const T0: i64 = 1_790_000_000_000;

/// Decodes untrusted bytes as `bincode::deserialize` would, but never allocates more than the
/// input could describe (a flipped length must not ask for gigabytes).
fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .allow_trailing_bytes()
        .with_limit(bytes.len() as u64)
        .deserialize(bytes)
        .ok()
}

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn facts(i: usize, payload: &[u8]) -> MessageFacts {
    MessageFacts {
        recipient: "TM/GOV/MINFIN/tax/declarations".into(),
        sender: "TM/GOV/MINCOM/registry".into(),
        message_id: format!("decl-{i}"),
        accepted_unix_ms: T0 + i as i64,
        payload_sha256: Sha256::digest(payload).into(),
        payload_len: payload.len() as u64,
        ordering_key: (i % 2 == 0).then(|| format!("taxpayer-{i}")),
        headers: vec![("traceparent".into(), format!("00-{i:032x}-{i:016x}-01"))],
    }
}

fn header(batch: u64, log_index: u64, prev: Hash, key_id: &str, timestamp_unix_ms: i64) -> BatchHeader {
    BatchHeader {
        version: EVIDENCE_VERSION,
        shard: 2,
        batch,
        log_term: 3,
        log_index,
        timestamp_unix_ms,
        leaf_count: 0,
        root: [0; 32],
        prev,
        key_id: key_id.into(),
    }
}

/// A chain of `batches` batches of `per_batch` messages, signed by `key-1` until `rotate_at`
/// (a batch number) and by `key-2` from then on.
fn chain(batches: u64, per_batch: usize, rotate_at: u64) -> (Vec<SignedBatch>, Vec<(MessageFacts, Vec<u8>, Receipt)>, KeyRing) {
    let (k1, k2) = (key(1), key(2));
    let rotation_time = T0 + rotate_at as i64 * 1000;
    let mut r1 = PublicKeyRecord::of("key-1", &k1, T0 - 1);
    r1.valid_until_unix_ms = Some(rotation_time);
    let r2 = PublicKeyRecord::of("key-2", &k2, rotation_time);
    let ring = KeyRing::new([r1, r2]);
    let (mut out, mut receipts, mut prev) = (Vec::new(), Vec::new(), [0u8; 32]);
    for b in 1..=batches {
        let time = T0 + b as i64 * 1000;
        let (key_id, key) = if b < rotate_at { ("key-1", &k1) } else { ("key-2", &k2) };
        let messages: Vec<(MessageFacts, Vec<u8>)> = (0..per_batch)
            .map(|i| {
                let n = b as usize * 1000 + i;
                let payload = format!("payload of message {n}").into_bytes();
                (facts(n, &payload), payload)
            })
            .collect();
        let leaves = messages.iter().map(|(f, _)| message_leaf(f)).collect();
        let (signed, rs) = seal(leaves, header(b, b * 10, prev, key_id, time), key);
        prev = signed.link();
        out.push(signed);
        receipts.extend(messages.into_iter().zip(rs).map(|((f, p), r)| (f, p, r)));
    }
    (out, receipts, ring)
}

/// Criterion 1 (offline part): every receipt verifies; flipping any single byte of its
/// encoding, or of the payload it stands for, makes it fail.
#[test]
fn receipts_verify_and_any_flipped_byte_fails() {
    let (_, receipts, ring) = chain(2, 37, 100);
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    for (facts, payload, receipt) in receipts.iter().step_by(5) {
        receipt.verify_message(facts, &ring).expect("an untouched receipt verifies");
        let bytes = bincode::serialize(receipt).unwrap();
        for i in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[i] ^= rng.random_range(1..=255u8);
            if let Some(r) = decode::<Receipt>(&flipped) {
                assert!(r.verify_message(facts, &ring).is_err(), "flipping byte {i} of {} went unnoticed", bytes.len());
            }
        }
        for i in 0..payload.len() {
            let mut p = payload.clone();
            p[i] ^= rng.random_range(1..=255u8);
            let changed = MessageFacts { payload_sha256: Sha256::digest(&p).into(), ..facts.clone() };
            assert_eq!(receipt.verify_message(&changed, &ring), Err(EvidenceError::LeafMismatch), "payload byte {i}");
        }
    }
}

/// Criterion 4 and the archive part of criterion 1: a chain verifies; a flipped byte
/// anywhere in its encoding, a deleted batch or two swapped batches are detected.
#[test]
fn a_chain_detects_flips_deletions_and_reordering() {
    let (batches, _, ring) = chain(6, 3, 100);
    verify_chain(&batches, &ring).expect("an untouched chain verifies");
    let bytes = bincode::serialize(&batches).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    for i in 0..bytes.len() {
        let mut flipped = bytes.clone();
        flipped[i] ^= rng.random_range(1..=255u8);
        if let Some(b) = decode::<Vec<SignedBatch>>(&flipped) {
            assert!(verify_chain(&b, &ring).is_err() || b.len() < batches.len(), "flipping byte {i} went unnoticed");
        }
    }
    // Interior deletions break the links. (Cutting batches off either end leaves a shorter
    // chain that is valid by itself: an archive must say which batches it spans.)
    for gone in 1..batches.len() - 1 {
        let mut without = batches.clone();
        without.remove(gone);
        let e = verify_chain(&without, &ring).unwrap_err();
        assert!(matches!(e, EvidenceError::ChainBroken { .. }), "deleting batch {gone}: {e}");
    }
    for i in 0..batches.len() - 1 {
        let mut swapped = batches.clone();
        swapped.swap(i, i + 1);
        assert!(verify_chain(&swapped, &ring).is_err(), "swapping batches {i} and {}", i + 1);
    }
}

/// Criterion 3 (offline part): a stream signed across a key rotation verifies with both
/// public keys; a key used outside its validity, or not registered, fails.
#[test]
fn receipts_across_a_key_rotation_verify_and_unregistered_keys_fail() {
    let (batches, receipts, ring) = chain(6, 4, 4);
    verify_chain(&batches, &ring).expect("the chain crosses the rotation");
    let ids: std::collections::BTreeSet<&str> = batches.iter().map(|b| b.header.key_id.as_str()).collect();
    assert_eq!(ids.into_iter().collect::<Vec<_>>(), ["key-1", "key-2"]);
    for (facts, _, r) in &receipts {
        r.verify_message(facts, &ring).expect("receipts of both keys verify");
    }

    // An attacker's key, claiming a registered id or its own: both fail.
    let rogue = SigningKey::from_bytes(&[9; 32]);
    let leaves = vec![message_leaf(&receipts[0].0)];
    for key_id in ["key-2", "key-rogue"] {
        let (_, forged) = seal(leaves.clone(), header(7, 70, batches[5].link(), key_id, T0 + 7000), &rogue);
        assert!(forged[0].verify(&ring).is_err(), "a batch signed by an unregistered key ({key_id}) verifies");
    }
    // The retired key signing after its validity ended.
    let (_, late) = seal(leaves, header(7, 70, batches[5].link(), "key-1", T0 + 7000), &key(1));
    assert!(matches!(late[0].verify(&ring), Err(EvidenceError::KeyNotValid { .. })));
}

/// Batches of every size seal and every receipt verifies (the tree shape at odd sizes).
#[test]
fn batches_of_any_size_seal() {
    let k = key(1);
    let ring = KeyRing::new([PublicKeyRecord::of("k", &k, 0)]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for n in [1usize, 2, 3, 5, 64, 100, 1023, 1025] {
        let leaves: Vec<Hash> = (0..n)
            .map(|_| {
                let mut h = [0u8; 32];
                rng.fill_bytes(&mut h);
                h
            })
            .collect();
        let (batch, receipts) = seal(leaves.clone(), header(1, 1, [0; 32], "k", T0), &k);
        assert_eq!(batch.header.leaf_count, n as u64);
        assert_eq!(receipts.len(), n);
        for (leaf, r) in leaves.iter().zip(&receipts) {
            assert_eq!(&r.leaf, leaf);
            r.verify(&ring).unwrap_or_else(|e| panic!("n {n}: {e}"));
        }
    }
}

fn archive() -> Archive {
    let (batches, receipts, keys) = chain(5, 3, 3);
    Archive {
        shard: 2,
        first_batch: 1,
        last_batch: 5,
        head: batches[4].link(),
        keys,
        batches,
        messages: receipts.into_iter().map(|(facts, _, receipt)| ArchivedMessage { facts, receipt, delivery: None }).collect(),
    }
}

/// An archive verifies offline; against the verifier's trusted key ring, any flipped byte,
/// a batch cut off either end, a deleted or reordered batch, or a message whose batch is
/// missing is detected.
#[test]
fn an_archive_verifies_offline_and_detects_tampering() {
    let a = archive();
    let trusted = a.keys.clone();
    a.verify(None).expect("an untouched archive verifies with its own keys");
    a.verify(Some(&trusted)).expect("and with the trusted key ring");

    let bytes = bincode::serialize(&a).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for i in (0..bytes.len()).step_by(3) {
        let mut flipped = bytes.clone();
        flipped[i] ^= rng.random_range(1..=255u8);
        if let Some(t) = decode::<Archive>(&flipped) {
            assert!(t.verify(Some(&trusted)).is_err(), "flipping byte {i} of {} went unnoticed", bytes.len());
        }
    }
    let mut cut_end = a.clone();
    cut_end.batches.pop();
    assert!(matches!(cut_end.verify(None), Err(ArchiveError::Range { .. })));
    let mut cut_both = cut_end.clone();
    cut_both.last_batch = 4;
    assert!(cut_both.verify(None).is_err(), "the head still names batch 5");
    let mut cut_start = a.clone();
    cut_start.batches.remove(0);
    cut_start.first_batch = 2;
    assert!(matches!(cut_start.verify(None), Err(ArchiveError::Orphan { .. })), "messages of batch 1 lost their batch");
    let mut swapped = a.clone();
    swapped.batches.swap(1, 2);
    assert!(swapped.verify(None).is_err());
    // The trusted key ring must agree with the archive's.
    let mut other = trusted.clone();
    other.keys.get_mut("key-1").unwrap().public_key = key(7).verifying_key().to_bytes();
    assert!(a.verify(Some(&other)).is_err());
    // An archive re-signed with the attacker's own key verifies only by itself, never against
    // the trusted ring.
    let rogue = SigningKey::from_bytes(&[9; 32]);
    let forged_keys = KeyRing::new([PublicKeyRecord::of("key-1", &rogue, T0 - 1)]);
    let (batch, receipts) = seal(vec![message_leaf(&a.messages[0].facts)], header(1, 10, [0; 32], "key-1", T0 + 1000), &rogue);
    let forged = Archive {
        shard: 2,
        first_batch: 1,
        last_batch: 1,
        head: batch.link(),
        keys: forged_keys,
        batches: vec![batch],
        messages: vec![ArchivedMessage { facts: a.messages[0].facts.clone(), receipt: receipts[0].clone(), delivery: None }],
    };
    assert!(forged.verify(None).is_ok(), "self-consistent");
    assert!(forged.verify(Some(&trusted)).is_err(), "but not signed by a trusted key");
}
