//! Evidence: what Kerwen signs so that a third party can check, years later and without the
//! cluster, that a message with a given content was accepted from a given sender for a given
//! recipient at a given time, and that it was delivered.
//!
//! - Each message becomes a **leaf**: a domain-separated SHA-256 of its canonical header
//!   fields and the SHA-256 of its payload ([`message_leaf`]); an ack is a leaf of its own
//!   ([`ack_leaf`]), pointing at the message's leaf.
//! - A batch of leaves becomes a **Merkle tree** with RFC 6962 hashing (`0x00` before a leaf,
//!   `0x01` before a pair), so a leaf can never pass for an inner node.
//! - Its root goes into a [`BatchHeader`] together with the shard, the batch's number in the
//!   shard's chain, its Raft log position, a timestamp and the link (hash) of the shard's
//!   previous batch; the header is signed once with Ed25519 ([`SignedBatch`]).
//! - A [`Receipt`] is one leaf, its inclusion path and the signed batch; [`Receipt::verify`]
//!   checks it against a [`KeyRing`] of public keys and their validity periods.
//!   [`verify_chain`] checks that batches follow each other without gaps or reordering.
//!
//! Pure functions and data, no I/O: the node decides when to sign and where keys live.

use std::collections::BTreeMap;
use std::sync::Arc;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

const LEAF_PREFIX: u8 = 0x00;
const NODE_PREFIX: u8 = 0x01;
const MESSAGE_DOMAIN: &[u8] = b"kerwen/v1/leaf/message\0";
const ACK_DOMAIN: &[u8] = b"kerwen/v1/leaf/ack\0";
const BATCH_DOMAIN: &[u8] = b"kerwen/v1/batch\0";
const LINK_DOMAIN: &[u8] = b"kerwen/v1/link\0";

/// Version of the canonical encodings below; part of every signed header.
pub const EVIDENCE_VERSION: u8 = 1;

/// Why evidence does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvidenceError {
    #[error("the leaf does not match the message it should stand for")]
    LeafMismatch,
    #[error("the inclusion path does not lead to the signed root")]
    BadPath,
    #[error("the batch is signed with key {0:?}, which is not among the known keys")]
    UnknownKey(String),
    #[error("key {key_id:?} was not valid at the batch's time ({timestamp_unix_ms})")]
    KeyNotValid { key_id: String, timestamp_unix_ms: i64 },
    #[error("the batch signature is invalid")]
    BadSignature,
    #[error("unsupported evidence version {0}")]
    Version(u8),
    #[error("batch {batch} of shard {shard} does not follow the one before it ({reason})")]
    ChainBroken { shard: u32, batch: u64, reason: &'static str },
}

/// Appends `bytes` with a length prefix, so no two field sequences encode alike.
fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    // Fields are identifiers and header values: u32 lengths are plenty.
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// What a message leaf commits to: everything needed to prove the exchange, nothing of the
/// payload but its hash and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageFacts {
    /// Recipient service (mailbox) id.
    pub recipient: String,
    /// Authenticated sender subsystem.
    pub sender: String,
    pub message_id: String,
    pub accepted_unix_ms: i64,
    #[serde(with = "hex_bytes")]
    pub payload_sha256: Hash,
    pub payload_len: u64,
    pub ordering_key: Option<String>,
    /// Application headers, sorted by name.
    pub headers: Vec<(String, String)>,
}

impl MessageFacts {
    pub fn as_view(&self) -> MessageView<'_> {
        MessageView {
            recipient: &self.recipient,
            sender: &self.sender,
            message_id: &self.message_id,
            accepted_unix_ms: self.accepted_unix_ms,
            payload_sha256: self.payload_sha256,
            payload_len: self.payload_len,
            ordering_key: self.ordering_key.as_deref(),
            headers: &self.headers,
        }
    }
}

/// [`MessageFacts`] borrowed from wherever the message lives (the hot path copies nothing).
#[derive(Debug, Clone, Copy)]
pub struct MessageView<'a> {
    pub recipient: &'a str,
    pub sender: &'a str,
    pub message_id: &'a str,
    pub accepted_unix_ms: i64,
    pub payload_sha256: Hash,
    pub payload_len: u64,
    pub ordering_key: Option<&'a str>,
    pub headers: &'a [(String, String)],
}

/// The leaf of a message.
pub fn message_leaf(f: &MessageFacts) -> Hash {
    leaf_of(&f.as_view())
}

/// The leaf of a message, from borrowed fields. The canonical encoding is built in one
/// buffer and hashed in one call: on the publish path this runs once per message.
pub fn leaf_of(f: &MessageView<'_>) -> Hash {
    let headers_len: usize = f.headers.iter().map(|(k, v)| k.len() + v.len() + 8).sum();
    let mut out = Vec::with_capacity(
        1 + MESSAGE_DOMAIN.len() + 12 + f.recipient.len() + f.sender.len() + f.message_id.len() + 8 + 32 + 8 + 5
            + f.ordering_key.map_or(0, str::len) + 4 + headers_len,
    );
    out.push(LEAF_PREFIX);
    out.extend_from_slice(MESSAGE_DOMAIN);
    field(&mut out, f.recipient.as_bytes());
    field(&mut out, f.sender.as_bytes());
    field(&mut out, f.message_id.as_bytes());
    out.extend_from_slice(&f.accepted_unix_ms.to_be_bytes());
    out.extend_from_slice(&f.payload_sha256);
    out.extend_from_slice(&f.payload_len.to_be_bytes());
    match f.ordering_key {
        Some(k) => {
            out.push(1);
            field(&mut out, k.as_bytes());
        }
        None => out.push(0),
    }
    out.extend_from_slice(&u32::try_from(f.headers.len()).unwrap_or(u32::MAX).to_be_bytes());
    let mut write_headers = |headers: &mut dyn Iterator<Item = &(String, String)>| {
        for (k, v) in headers {
            field(&mut out, k.as_bytes());
            field(&mut out, v.as_bytes());
        }
    };
    if f.headers.windows(2).all(|w| w[0] <= w[1]) {
        write_headers(&mut f.headers.iter());
    } else {
        let mut sorted: Vec<&(String, String)> = f.headers.iter().collect();
        sorted.sort();
        write_headers(&mut sorted.into_iter());
    }
    Sha256::digest(&out).into()
}

/// What an ack leaf commits to: which message was delivered, to whom, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckFacts {
    pub recipient: String,
    pub message_id: String,
    /// The leaf of the message as accepted.
    #[serde(with = "hex_bytes")]
    pub message_leaf: Hash,
    pub acked_unix_ms: i64,
    pub attempt: u32,
}

/// The leaf of an ack (a delivery receipt's leaf).
pub fn ack_leaf(f: &AckFacts) -> Hash {
    let mut out = Vec::with_capacity(1 + ACK_DOMAIN.len() + 8 + f.recipient.len() + f.message_id.len() + 32 + 12);
    out.push(LEAF_PREFIX);
    out.extend_from_slice(ACK_DOMAIN);
    field(&mut out, f.recipient.as_bytes());
    field(&mut out, f.message_id.as_bytes());
    out.extend_from_slice(&f.message_leaf);
    out.extend_from_slice(&f.acked_unix_ms.to_be_bytes());
    out.extend_from_slice(&f.attempt.to_be_bytes());
    Sha256::digest(&out).into()
}

fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([NODE_PREFIX]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The root of an empty tree.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// A Merkle tree over a batch's leaves (RFC 6962 shape: the left subtree of `n` leaves holds
/// the largest power of two below `n`; an odd node is carried up unchanged).
#[derive(Debug, Clone)]
pub struct MerkleTree {
    /// levels[0] are the leaves, the last level the root.
    levels: Vec<Vec<Hash>>,
}

impl MerkleTree {
    pub fn build(leaves: Vec<Hash>) -> Self {
        let mut levels = vec![leaves];
        while levels.last().is_some_and(|l| l.len() > 1) {
            let below = levels.last().map(Vec::as_slice).unwrap_or_default();
            let above: Vec<Hash> = below
                .chunks(2)
                .map(|pair| match pair {
                    [l, r] => node_hash(l, r),
                    [single] => *single,
                    _ => unreachable!("chunks(2) yields one or two"),
                })
                .collect();
            levels.push(above);
        }
        Self { levels }
    }

    pub fn len(&self) -> usize {
        self.levels[0].len()
    }

    pub fn leaves(&self) -> &[Hash] {
        &self.levels[0]
    }

    pub fn is_empty(&self) -> bool {
        self.levels[0].is_empty()
    }

    pub fn root(&self) -> Hash {
        match self.levels.last().and_then(|l| l.first()) {
            Some(root) if !self.is_empty() => *root,
            _ => empty_root(),
        }
    }

    /// The receipt of leaf `index` in `batch` (signed over this tree's root).
    pub fn receipt(&self, index: usize, batch: &SignedBatch) -> Option<Receipt> {
        Some(Receipt { leaf: *self.levels[0].get(index)?, proof: self.proof(index)?, batch: batch.clone() })
    }

    /// The inclusion path of leaf `index`, bottom up; `None` past the end.
    pub fn proof(&self, index: usize) -> Option<InclusionProof> {
        if index >= self.len() {
            return None;
        }
        let mut path = Vec::with_capacity(self.levels.len() - 1);
        let mut i = index;
        for level in &self.levels[..self.levels.len() - 1] {
            let sibling = i ^ 1;
            if sibling < level.len() {
                path.push(level[sibling]);
            }
            i /= 2;
        }
        Some(InclusionProof { index: index as u64, leaf_count: self.len() as u64, path })
    }
}

/// Where a leaf sits in its batch's tree, and the sibling hashes up to the root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InclusionProof {
    pub index: u64,
    pub leaf_count: u64,
    #[serde(with = "hex_list")]
    pub path: Vec<Hash>,
}

impl InclusionProof {
    /// The root that `leaf` and this path lead to, or `None` if the path has the wrong shape.
    pub fn root_for(&self, leaf: &Hash) -> Option<Hash> {
        if self.index >= self.leaf_count {
            return None;
        }
        let mut hash = *leaf;
        let mut path = self.path.iter();
        let (mut i, mut width) = (self.index, self.leaf_count);
        while width > 1 {
            // A last node without a sibling is carried up unchanged.
            if i % 2 == 1 {
                hash = node_hash(path.next()?, &hash);
            } else if i + 1 < width {
                hash = node_hash(&hash, path.next()?);
            }
            i /= 2;
            width = width.div_ceil(2);
        }
        path.next().is_none().then_some(hash)
    }
}

/// What one signature covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchHeader {
    pub version: u8,
    /// The Raft group (data shard) whose chain this batch extends.
    pub shard: u32,
    /// The batch's number in its shard's chain: 1, 2, 3, ...
    pub batch: u64,
    /// Raft term and log index of the entry that carries the batch.
    pub log_term: u64,
    pub log_index: u64,
    /// When the leader signed (Unix ms).
    pub timestamp_unix_ms: i64,
    pub leaf_count: u64,
    #[serde(with = "hex_bytes")]
    pub root: Hash,
    /// [`SignedBatch::link`] of the shard's previous batch (zeros for the first).
    #[serde(with = "hex_bytes")]
    pub prev: Hash,
    /// Which signing key signed.
    pub key_id: String,
}

impl BatchHeader {
    /// The exact bytes the signature covers.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(BATCH_DOMAIN.len() + 128 + self.key_id.len());
        out.extend_from_slice(BATCH_DOMAIN);
        out.push(self.version);
        out.extend_from_slice(&self.shard.to_be_bytes());
        out.extend_from_slice(&self.batch.to_be_bytes());
        out.extend_from_slice(&self.log_term.to_be_bytes());
        out.extend_from_slice(&self.log_index.to_be_bytes());
        out.extend_from_slice(&self.timestamp_unix_ms.to_be_bytes());
        out.extend_from_slice(&self.leaf_count.to_be_bytes());
        out.extend_from_slice(&self.root);
        out.extend_from_slice(&self.prev);
        out.extend_from_slice(&(self.key_id.len() as u64).to_be_bytes());
        out.extend_from_slice(self.key_id.as_bytes());
        out
    }
}

/// A batch header and its Ed25519 signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedBatch {
    pub header: BatchHeader,
    #[serde(with = "hex_bytes")]
    pub signature: [u8; 64],
}

/// Fixed-size byte arrays as lowercase hex in JSON (raw bytes in bincode). Decoding accepts
/// only lowercase: with uppercase also accepted, flipping a letter's case would change an
/// archive's bytes and not its meaning, and a verifier promises that any change is caught.
pub mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer, const N: usize>(bytes: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(bytes))
        } else {
            s.serialize_bytes(bytes)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(d: D) -> Result<[u8; N], D::Error> {
        if d.is_human_readable() {
            let text = String::deserialize(d)?;
            super::parse_hex(&text).ok_or_else(|| serde::de::Error::custom(format!("expected {N} bytes of lowercase hex")))
        } else {
            d.deserialize_bytes(super::BytesVisitor(|bytes: &[u8]| bytes.try_into().ok(), "the hash's length"))
        }
    }
}

/// A list of hashes, each as [`hex_bytes`] in JSON; in binary formats one byte string of
/// the hashes concatenated, which decodes in one copy rather than hash by hash, byte by byte.
pub(crate) mod hex_list {
    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serializer};

    use super::Hash;

    pub fn serialize<S: Serializer>(list: &[Hash], s: S) -> Result<S::Ok, S::Error> {
        if !s.is_human_readable() {
            return s.serialize_bytes(list.as_flattened());
        }
        let mut seq = s.serialize_seq(Some(list.len()))?;
        for h in list {
            seq.serialize_element(&hex::encode(h))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Hash>, D::Error> {
        if !d.is_human_readable() {
            let split = |bytes: &[u8]| -> Option<Vec<Hash>> {
                let hashes = bytes.chunks_exact(32);
                hashes.remainder().is_empty().then(|| hashes.filter_map(|h| h.try_into().ok()).collect())
            };
            return d.deserialize_bytes(super::BytesVisitor(split, "a multiple of 32 bytes"));
        }
        let texts: Vec<String> = Deserialize::deserialize(d)?;
        texts
            .iter()
            .map(|t| super::parse_hex(t).ok_or_else(|| serde::de::Error::custom("expected 32 bytes of lowercase hex")))
            .collect()
    }
}

/// Takes a byte string from a binary format (borrowed or owned alike) and converts it.
struct BytesVisitor<F>(F, &'static str);

impl<'de, T, F: FnOnce(&[u8]) -> Option<T>> serde::de::Visitor<'de> for BytesVisitor<F> {
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "a byte string of {}", self.1)
    }

    fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<T, E> {
        let len = bytes.len();
        (self.0)(bytes).ok_or_else(|| E::invalid_length(len, &self.1))
    }
}

/// Strict lowercase hex of exactly `N` bytes.
pub(crate) fn parse_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    hex::decode(text).ok()?.try_into().ok()
}

impl SignedBatch {
    pub fn sign(header: BatchHeader, key: &SigningKey) -> Self {
        let signature = key.sign(&header.signing_bytes()).to_bytes();
        Self { header, signature }
    }

    /// Checks the signature with the key the header names, valid at the header's time.
    pub fn verify(&self, keys: &KeyRing) -> Result<(), EvidenceError> {
        let h = &self.header;
        if h.version != EVIDENCE_VERSION {
            return Err(EvidenceError::Version(h.version));
        }
        // The record must agree with the id it is filed under (a key ring read from a file).
        let record = keys.keys.get(&h.key_id).filter(|r| r.key_id == h.key_id).ok_or_else(|| EvidenceError::UnknownKey(h.key_id.clone()))?;
        if !record.valid_at(h.timestamp_unix_ms) {
            return Err(EvidenceError::KeyNotValid { key_id: h.key_id.clone(), timestamp_unix_ms: h.timestamp_unix_ms });
        }
        let key = VerifyingKey::from_bytes(&record.public_key).map_err(|_| EvidenceError::BadSignature)?;
        key.verify_strict(&h.signing_bytes(), &Signature::from_bytes(&self.signature)).map_err(|_| EvidenceError::BadSignature)
    }

    /// What the next batch of the shard commits to as `prev`: header and signature.
    pub fn link(&self) -> Hash {
        let mut h = Sha256::new();
        h.update(LINK_DOMAIN);
        h.update(self.header.signing_bytes());
        h.update(self.signature);
        h.finalize().into()
    }
}

/// A public signing key and when it may sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKeyRecord {
    pub key_id: String,
    #[serde(with = "hex_bytes")]
    pub public_key: [u8; 32],
    pub valid_from_unix_ms: i64,
    /// `None` while the key is current.
    pub valid_until_unix_ms: Option<i64>,
}

impl PublicKeyRecord {
    pub fn of(key_id: impl Into<String>, key: &SigningKey, valid_from_unix_ms: i64) -> Self {
        Self { key_id: key_id.into(), public_key: key.verifying_key().to_bytes(), valid_from_unix_ms, valid_until_unix_ms: None }
    }

    pub fn valid_at(&self, unix_ms: i64) -> bool {
        unix_ms >= self.valid_from_unix_ms && self.valid_until_unix_ms.is_none_or(|until| unix_ms < until)
    }
}

/// The public keys a verifier trusts, by key id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRing {
    pub keys: BTreeMap<String, PublicKeyRecord>,
}

impl KeyRing {
    pub fn new(records: impl IntoIterator<Item = PublicKeyRecord>) -> Self {
        Self { keys: records.into_iter().map(|r| (r.key_id.clone(), r)).collect() }
    }

    /// Adds `record` under its key id; false when that very record was already there.
    pub fn register(&mut self, record: PublicKeyRecord) -> bool {
        let known = self.keys.get(&record.key_id) == Some(&record);
        self.keys.insert(record.key_id.clone(), record);
        !known
    }

    /// Sets when a key stops being valid (only ever earlier); the changed record, `None` when
    /// nothing changed or there is no such key.
    pub fn retire(&mut self, key_id: &str, valid_until_unix_ms: i64) -> Option<PublicKeyRecord> {
        let record = self.keys.get_mut(key_id)?;
        if record.valid_until_unix_ms.is_some_and(|until| until <= valid_until_unix_ms) {
            return None;
        }
        record.valid_until_unix_ms = Some(valid_until_unix_ms);
        Some(record.clone())
    }
}

/// Proof that one leaf is in a signed batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    #[serde(with = "hex_bytes")]
    pub leaf: Hash,
    pub proof: InclusionProof,
    pub batch: SignedBatch,
}

impl Receipt {
    /// Checks the path to the signed root and the signature.
    pub fn verify(&self, keys: &KeyRing) -> Result<(), EvidenceError> {
        self.verify_path()?;
        self.batch.verify(keys)
    }

    /// Checks the receipt and that it stands for the message described by `facts`.
    pub fn verify_message(&self, facts: &MessageFacts, keys: &KeyRing) -> Result<(), EvidenceError> {
        self.verify_message_path(facts)?;
        self.batch.verify(keys)
    }

    /// That the leaf leads to the batch's root (the signature is not checked).
    fn verify_path(&self) -> Result<(), EvidenceError> {
        if self.proof.leaf_count != self.batch.header.leaf_count {
            return Err(EvidenceError::BadPath);
        }
        match self.proof.root_for(&self.leaf) {
            Some(root) if root == self.batch.header.root => Ok(()),
            _ => Err(EvidenceError::BadPath),
        }
    }

    /// That `facts` make this leaf and it leads to the batch's root, for a receipt whose
    /// batch was verified already (an archive checks each batch once, not once per message).
    fn verify_message_path(&self, facts: &MessageFacts) -> Result<(), EvidenceError> {
        if message_leaf(facts) != self.leaf {
            return Err(EvidenceError::LeafMismatch);
        }
        self.verify_path()
    }
}

/// The key a node signs evidence with now. Rotation swaps it while proposers keep running;
/// a batch's timestamp is read under the same lock as its key, so every batch the old key
/// signed carries a time before the swap (the retired key's `valid_until` is set after it).
pub struct EvidenceSigner {
    current: std::sync::RwLock<Arc<ActiveKey>>,
}

/// A signing key and the id it is published under.
pub struct ActiveKey {
    pub key_id: String,
    pub key: SigningKey,
}

impl EvidenceSigner {
    pub fn new(key_id: String, key: SigningKey) -> Self {
        Self { current: std::sync::RwLock::new(Arc::new(ActiveKey { key_id, key })) }
    }

    /// The key in use.
    pub fn current(&self) -> Arc<ActiveKey> {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Signs with `key` from now on; returns the key it replaces.
    pub fn replace(&self, key_id: String, key: SigningKey) -> Arc<ActiveKey> {
        let mut current = self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::replace(&mut *current, Arc::new(ActiveKey { key_id, key }))
    }

    /// Reads the time with `clock`, lets `build` make the leaves and header for that time,
    /// and seals them with the current key (its id and the time go into the header).
    pub fn seal(&self, clock: impl FnOnce() -> i64, build: impl FnOnce(i64) -> (Vec<Hash>, BatchHeader)) -> (SignedBatch, MerkleTree) {
        let active = self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = clock();
        let (leaves, header) = build(now);
        let header = BatchHeader { timestamp_unix_ms: now, key_id: active.key_id.clone(), ..header };
        seal_batch(leaves, header, &active.key)
    }
}

/// Builds the tree over `leaves` and signs its root once (`header`'s count and root are
/// filled in). Receipts are taken from the tree afterwards, for the leaves that need one.
pub fn seal_batch(leaves: Vec<Hash>, header: BatchHeader, key: &SigningKey) -> (SignedBatch, MerkleTree) {
    let tree = MerkleTree::build(leaves);
    let header = BatchHeader { leaf_count: tree.len() as u64, root: tree.root(), ..header };
    (SignedBatch::sign(header, key), tree)
}

/// Signs a batch of leaves; returns the signed batch and one receipt per leaf, in order.
pub fn seal(leaves: Vec<Hash>, header: BatchHeader, key: &SigningKey) -> (SignedBatch, Vec<Receipt>) {
    let (batch, tree) = seal_batch(leaves, header, key);
    let receipts = (0..tree.len()).filter_map(|i| tree.receipt(i, &batch)).collect();
    (batch, receipts)
}

/// Checks that `batches` (of one shard, in order) are each validly signed and each extends the
/// one before it: consecutive numbers, increasing log positions, `prev` linking to it.
pub fn verify_chain(batches: &[SignedBatch], keys: &KeyRing) -> Result<(), EvidenceError> {
    for (i, b) in batches.iter().enumerate() {
        b.verify(keys)?;
        let Some(before) = i.checked_sub(1).map(|j| &batches[j]) else { continue };
        let (h, p) = (&b.header, &before.header);
        let broken = |reason| Err(EvidenceError::ChainBroken { shard: h.shard, batch: h.batch, reason });
        if h.shard != p.shard {
            return broken("another shard");
        }
        if h.batch != p.batch + 1 {
            return broken("batch numbers are not consecutive");
        }
        if h.log_index <= p.log_index {
            return broken("log positions go backwards");
        }
        if h.prev != before.link() {
            return broken("prev does not link to the previous batch");
        }
    }
    Ok(())
}

/// One message's evidence in an archive: what was accepted, and its receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchivedMessage {
    pub facts: MessageFacts,
    pub receipt: Receipt,
    /// The recipient's ack, once it has acked: a delivery receipt. (Not skipped when absent:
    /// bincode, which carries archives between nodes, needs every field.)
    #[serde(default)]
    pub delivery: Option<ArchivedDelivery>,
}

/// A delivery's evidence: the ack and its receipt (signed in a later batch of the same shard).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchivedDelivery {
    pub facts: AckFacts,
    pub receipt: Receipt,
}

impl ArchivedDelivery {
    /// That the ack is the one the receipt stands for, of the message with leaf
    /// `message_leaf`, and its path leads to its batch's root (the signature is not checked).
    fn verify_path(&self, message_leaf: &Hash) -> Result<(), EvidenceError> {
        if self.facts.message_leaf != *message_leaf || ack_leaf(&self.facts) != self.receipt.leaf {
            return Err(EvidenceError::LeafMismatch);
        }
        self.receipt.verify_path()
    }
}

impl ArchivedMessage {
    /// Checks the message's receipt and, when present, its delivery receipt, signatures
    /// included: what `kerwen evidence verify RECEIPT` does.
    pub fn verify(&self, keys: &KeyRing) -> Result<(), EvidenceError> {
        self.receipt.verify_message(&self.facts, keys)?;
        if let Some(d) = &self.delivery {
            d.verify_path(&self.receipt.leaf)?;
            d.receipt.batch.verify(keys)?;
        }
        Ok(())
    }
}

/// A self-contained, offline-verifiable export of one shard's evidence: the public keys, the
/// signed batches from `first_batch` to `last_batch` without gaps, and the messages' facts and
/// receipts. Stating the range is what makes batches cut off either end detectable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Archive {
    pub shard: u32,
    pub first_batch: u64,
    pub last_batch: u64,
    /// The link of the last batch: a verifier holding a later head can check the archive
    /// is a prefix of what it knows.
    #[serde(with = "hex_bytes")]
    pub head: Hash,
    pub keys: KeyRing,
    pub batches: Vec<SignedBatch>,
    pub messages: Vec<ArchivedMessage>,
}

/// Why an archive does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArchiveError {
    #[error("the archive says batches {first}..={last} but holds {held}")]
    Range { first: u64, last: u64, held: String },
    #[error("the archive's head does not match its last batch")]
    Head,
    #[error("message {index} ({id}): {error}")]
    Message { index: usize, id: String, error: EvidenceError },
    #[error("message {index} ({id}) is signed in batch {batch}, which the archive does not hold")]
    Orphan { index: usize, id: String, batch: u64 },
    #[error("message {index} ({id}) is not of the exported mailbox")]
    OutOfScope { index: usize, id: String },
    #[error(transparent)]
    Evidence(#[from] EvidenceError),
}

impl Archive {
    /// Checks the whole archive. With `trusted` (the key ring the verifier got from the
    /// cluster or another trusted source), every key the archive carries must be exactly the
    /// trusted one and only trusted keys count; without it, the archive's own keys are used,
    /// which proves consistency but not who signed.
    pub fn verify(&self, trusted: Option<&KeyRing>) -> Result<(), ArchiveError> {
        let keys = match trusted {
            Some(trusted) => {
                for (id, k) in &self.keys.keys {
                    if trusted.keys.get(id) != Some(k) {
                        return Err(EvidenceError::UnknownKey(id.clone()).into());
                    }
                }
                trusted
            }
            None => &self.keys,
        };
        // Compared number by number: the stated range comes from the file and may be absurd.
        let in_range = self.last_batch.checked_sub(self.first_batch).and_then(|d| d.checked_add(1)) == Some(self.batches.len() as u64)
            && self.batches.iter().zip(self.first_batch..).all(|(b, n)| b.header.batch == n && b.header.shard == self.shard);
        if !in_range {
            let held = match (self.batches.first(), self.batches.last()) {
                (Some(f), Some(l)) => format!("{}..={} ({} batches)", f.header.batch, l.header.batch, self.batches.len()),
                _ => "none".to_owned(),
            };
            return Err(ArchiveError::Range { first: self.first_batch, last: self.last_batch, held });
        }
        verify_chain(&self.batches, keys)?;
        if self.batches.last().map(SignedBatch::link) != Some(self.head) {
            return Err(ArchiveError::Head);
        }
        for (index, m) in self.messages.iter().enumerate() {
            let id = m.facts.message_id.clone();
            let batch = m.receipt.batch.header.batch;
            let held = batch.checked_sub(self.first_batch).and_then(|i| self.batches.get(i as usize));
            if held != Some(&m.receipt.batch) {
                return Err(ArchiveError::Orphan { index, id, batch });
            }
            // Its batch equals one verified in the chain above: only the path is left to check.
            m.receipt.verify_message_path(&m.facts).map_err(|error| ArchiveError::Message { index, id: id.clone(), error })?;
            if let Some(d) = &m.delivery {
                let batch = d.receipt.batch.header.batch;
                let held = batch.checked_sub(self.first_batch).and_then(|i| self.batches.get(i as usize));
                if held != Some(&d.receipt.batch) {
                    return Err(ArchiveError::Orphan { index, id, batch });
                }
                d.verify_path(&m.receipt.leaf).map_err(|error| ArchiveError::Message { index, id, error })?;
            }
        }
        Ok(())
    }
}

/// What `kerwen evidence export` writes: one archive per shard that holds messages of the
/// mailbox in the exported time range. (The range itself is not part of it: nothing signed
/// could vouch for it, and a verifier must not read an unverified claim as proven.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvidenceExport {
    pub mailbox: String,
    pub archives: Vec<Archive>,
}

impl EvidenceExport {
    /// Checks every archive (see [`Archive::verify`]) and that all their messages are of the
    /// exported mailbox, so an archive cannot be swapped in from elsewhere.
    pub fn verify(&self, trusted: Option<&KeyRing>) -> Result<(), ArchiveError> {
        for archive in &self.archives {
            archive.verify(trusted)?;
            for (index, m) in archive.messages.iter().enumerate() {
                let f = &m.facts;
                if f.recipient != self.mailbox {
                    return Err(ArchiveError::OutOfScope { index, id: f.message_id.clone() });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n).map(|i| Sha256::digest((i as u64).to_be_bytes()).into()).collect()
    }

    #[test]
    fn every_leaf_proves_into_its_root_for_every_tree_size() {
        for n in 1..=40 {
            let tree = MerkleTree::build(leaves(n));
            for i in 0..n {
                let proof = tree.proof(i).unwrap();
                assert_eq!(proof.root_for(&tree.levels[0][i]), Some(tree.root()), "n {n} leaf {i}");
                // Another leaf, index or size does not lead to the root.
                assert_ne!(proof.root_for(&[7; 32]), Some(tree.root()));
                let moved = InclusionProof { index: (proof.index + 1) % n as u64, ..proof.clone() };
                if n > 1 {
                    assert_ne!(moved.root_for(&tree.levels[0][i]), Some(tree.root()), "n {n} leaf {i} moved");
                }
            }
            assert!(tree.proof(n).is_none());
        }
    }

    #[test]
    fn an_inner_node_cannot_pass_for_a_leaf() {
        let tree = MerkleTree::build(leaves(4));
        // The left inner node with the right one as its "path": the signed leaf count of 4
        // demands a path of two hashes, so the shortcut is refused.
        let shortcut = InclusionProof { index: 0, leaf_count: 4, path: vec![tree.levels[1][1]] };
        assert_eq!(shortcut.root_for(&tree.levels[1][0]), None);
        // And presented as a 2-leaf tree, the leaf count differs from the signed one.
        let as_two = InclusionProof { index: 0, leaf_count: 2, path: vec![tree.levels[1][1]] };
        assert_eq!(as_two.root_for(&tree.levels[1][0]), Some(tree.root()));
        assert_ne!(as_two.leaf_count, tree.len() as u64, "Receipt::verify compares it with the signed count");
    }
}
