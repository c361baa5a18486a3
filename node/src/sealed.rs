//! Sealed payloads: end-to-end encryption from the sending subsystem to the recipient's, so
//! the cluster (and whoever operates it) stores, replicates, signs and delivers bytes it
//! cannot read.
//!
//! A recipient subsystem registers X25519 public keys in the member registry
//! (`Access.RegisterEncryptionKey`, `kerwen keys generate`); the private halves stay in its
//! local [`KeyStore`]. A sender seals to the recipient's current key with HPKE (RFC 9180,
//! base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256): the HPKE context exports a fresh
//! 32-byte payload key, and the payload is encrypted with ChaCha20-Poly1305 under it.
//!
//! Why export a key instead of HPKE's own `Seal`: the recipient can later prove what a
//! message said by revealing the payload key (it opens this one message and nothing else).
//! A third party checks the key against the commitment in the envelope, decrypts, and
//! compares the sealed bytes with the evidence the cluster signed (which covers the sealed
//! bytes' SHA-256). The commitment makes the key binding: no second key opens the same
//! bytes to another plaintext.
//!
//! Envelope (all lengths fixed except the key id):
//! `"KWS1" | key id length (1 byte) | key id | enc (32) | key commitment (32) | ciphertext+tag`.
//! HPKE's `info` and the AEAD's associated data both name the recipient service, so a sealed
//! payload cannot be replayed to another service and still open.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hpke::aead::ExportOnlyAead;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

type Kem = X25519HkdfSha256;

/// The first bytes of every sealed payload.
pub const MAGIC: &[u8; 4] = b"KWS1";
const INFO_PREFIX: &[u8] = b"kerwen sealed payload v1\0";
const EXPORT_LABEL: &[u8] = b"kerwen payload key";
const COMMIT_DOMAIN: &[u8] = b"kerwen payload key commitment\0";
const TAG_LEN: usize = 16;
/// Longest key id, in bytes (as for names in the registry).
pub const MAX_KEY_ID_LEN: usize = 64;

/// Why a payload could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the payload is not sealed (it does not start with {MAGIC:?})")]
    NotSealed,
    #[error("the sealed payload is malformed: {0}")]
    Malformed(&'static str),
    #[error("no private key {key_id:?} for {subsystem} in the key store {dir}")]
    UnknownKey { subsystem: String, key_id: String, dir: String },
    #[error("the sealed payload does not open (another recipient's, or changed)")]
    DoesNotOpen,
    #[error("the revealed payload key does not match the envelope's commitment")]
    WrongRevealedKey,
    #[error("the recipient is not a service id: {0}")]
    BadRecipient(String),
    #[error("the public key is not an X25519 key")]
    BadPublicKey,
    #[error("key store {path}: {message}")]
    Store { path: String, message: String },
}

/// The parts of a sealed payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub key_id: &'a str,
    pub enc: &'a [u8; 32],
    pub commitment: &'a [u8; 32],
    /// Ciphertext followed by the 16-byte tag.
    pub ciphertext: &'a [u8],
    /// Everything before the ciphertext (authenticated, with the recipient).
    header: &'a [u8],
}

/// Whether `payload` is a sealed payload (by its magic; [`Envelope::parse`] checks the rest).
pub fn is_sealed(payload: &[u8]) -> bool {
    payload.starts_with(MAGIC)
}

impl<'a> Envelope<'a> {
    pub fn parse(payload: &'a [u8]) -> Result<Self, SealError> {
        let rest = payload.strip_prefix(MAGIC).ok_or(SealError::NotSealed)?;
        let (&len, rest) = rest.split_first().ok_or(SealError::Malformed("no key id"))?;
        let len = usize::from(len);
        if len == 0 || len > MAX_KEY_ID_LEN || rest.len() < len + 64 + TAG_LEN {
            return Err(SealError::Malformed("truncated"));
        }
        let key_id = std::str::from_utf8(&rest[..len]).map_err(|_| SealError::Malformed("key id is not UTF-8"))?;
        let enc = rest[len..len + 32].try_into().map_err(|_| SealError::Malformed("enc"))?;
        let commitment = rest[len + 32..len + 64].try_into().map_err(|_| SealError::Malformed("commitment"))?;
        let header_len = MAGIC.len() + 1 + len + 64;
        Ok(Self { key_id, enc, commitment, ciphertext: &payload[header_len..], header: &payload[..header_len] })
    }
}

fn info(recipient: &str) -> Vec<u8> {
    [INFO_PREFIX, recipient.as_bytes()].concat()
}

fn commitment(payload_key: &[u8; 32]) -> [u8; 32] {
    Sha256::new().chain_update(COMMIT_DOMAIN).chain_update(payload_key).finalize().into()
}

fn aead_key(payload_key: &[u8; 32]) -> Result<LessSafeKey, SealError> {
    // A payload key encrypts exactly one payload, so a fixed nonce never repeats under it.
    let key = UnboundKey::new(&CHACHA20_POLY1305, payload_key).map_err(|_| SealError::Malformed("payload key"))?;
    Ok(LessSafeKey::new(key))
}

fn associated_data(header: &[u8], recipient: &str) -> Vec<u8> {
    [header, recipient.as_bytes()].concat()
}

/// Seals `plaintext` for the recipient service `recipient`, whose subsystem's current
/// encryption key is `key_id` / `public_key`.
pub fn seal(recipient: &str, key_id: &str, public_key: &[u8; 32], plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
    if key_id.is_empty() || key_id.len() > MAX_KEY_ID_LEN {
        return Err(SealError::Malformed("key id length"));
    }
    let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(public_key).map_err(|_| SealError::BadPublicKey)?;
    let (enc, context) = hpke::setup_sender::<ExportOnlyAead, HkdfSha256, Kem, _>(&OpModeS::Base, &pk, &info(recipient), &mut rand::rng())
        .map_err(|_| SealError::BadPublicKey)?;
    let mut payload_key = [0u8; 32];
    context.export(EXPORT_LABEL, &mut payload_key).map_err(|_| SealError::Malformed("export"))?;
    let mut out = Vec::with_capacity(MAGIC.len() + 1 + key_id.len() + 64 + plaintext.len() + TAG_LEN);
    out.extend_from_slice(MAGIC);
    out.push(key_id.len() as u8);
    out.extend_from_slice(key_id.as_bytes());
    out.extend_from_slice(&enc.to_bytes());
    out.extend_from_slice(&commitment(&payload_key));
    let aad = associated_data(&out, recipient);
    let mut body = plaintext.to_vec();
    aead_key(&payload_key)?
        .seal_in_place_append_tag(Nonce::assume_unique_for_key([0; 12]), Aad::from(aad), &mut body)
        .map_err(|_| SealError::Malformed("payload too large"))?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// A sealed payload opened by its recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub plaintext: Vec<u8>,
    pub key_id: String,
    /// Reveal this (and only this) to prove the content to a third party:
    /// [`open_with_payload_key`] checks it against the envelope and decrypts.
    pub payload_key: [u8; 32],
}

/// Opens a payload sealed to `recipient` with the recipient subsystem's private key.
pub fn open(recipient: &str, secret: &SecretKey, payload: &[u8]) -> Result<Opened, SealError> {
    let envelope = Envelope::parse(payload)?;
    let sk = <Kem as hpke::Kem>::PrivateKey::from_bytes(&secret.secret).map_err(|_| SealError::DoesNotOpen)?;
    let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(envelope.enc).map_err(|_| SealError::Malformed("enc"))?;
    let context = hpke::setup_receiver::<ExportOnlyAead, HkdfSha256, Kem>(&OpModeR::Base, &sk, &enc, &info(recipient))
        .map_err(|_| SealError::DoesNotOpen)?;
    let mut payload_key = [0u8; 32];
    context.export(EXPORT_LABEL, &mut payload_key).map_err(|_| SealError::Malformed("export"))?;
    let plaintext = decrypt(&envelope, recipient, &payload_key).map_err(|_| SealError::DoesNotOpen)?;
    Ok(Opened { plaintext, key_id: envelope.key_id.to_owned(), payload_key })
}

/// What a third party runs on a revealed payload key: the plaintext the sealed bytes carry.
pub fn open_with_payload_key(recipient: &str, payload: &[u8], payload_key: &[u8; 32]) -> Result<Vec<u8>, SealError> {
    decrypt(&Envelope::parse(payload)?, recipient, payload_key)
}

/// Decrypts with `payload_key`: `WrongRevealedKey` when the envelope commits to another key.
fn decrypt(envelope: &Envelope<'_>, recipient: &str, payload_key: &[u8; 32]) -> Result<Vec<u8>, SealError> {
    if commitment(payload_key) != *envelope.commitment {
        return Err(SealError::WrongRevealedKey);
    }
    let mut body = envelope.ciphertext.to_vec();
    let aad = associated_data(envelope.header, recipient);
    let len = aead_key(payload_key)?
        .open_in_place(Nonce::assume_unique_for_key([0; 12]), Aad::from(aad), &mut body)
        .map_err(|_| SealError::DoesNotOpen)?
        .len();
    body.truncate(len);
    Ok(body)
}

/// A subsystem's private encryption key, as kept in its [`KeyStore`] (JSON, mode 0600).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretKey {
    pub subsystem: String,
    pub key_id: String,
    #[serde(with = "kerwen_broker::evidence::hex_bytes")]
    pub public_key: [u8; 32],
    #[serde(with = "kerwen_broker::evidence::hex_bytes")]
    secret: [u8; 32],
    pub created_unix_ms: i64,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretKey").field("subsystem", &self.subsystem).field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

impl SecretKey {
    /// A fresh key pair for `subsystem`, named `key_id`.
    pub fn generate(subsystem: &str, key_id: &str, created_unix_ms: i64) -> Self {
        let (sk, pk) = Kem::gen_keypair(&mut rand::rng());
        let mut secret = [0u8; 32];
        secret.copy_from_slice(&sk.to_bytes());
        let mut public_key = [0u8; 32];
        public_key.copy_from_slice(&pk.to_bytes());
        Self { subsystem: subsystem.to_owned(), key_id: key_id.to_owned(), public_key, secret, created_unix_ms }
    }
}

/// Name of the key store directory beside a CA's files (`PKI_DIR/sealing-keys`), where
/// `kerwen keys` and `kerwen dev --scenario` keep it by default.
pub const KEY_STORE_DIR: &str = "sealing-keys";

/// A directory of one or more subsystems' private encryption keys, one file per key
/// (`SUBSYSTEM with / as ~` `.` `KEY ID` `.json`). Old keys stay: they open what was sealed
/// to them before a rotation.
#[derive(Debug, Clone)]
pub struct KeyStore {
    dir: PathBuf,
    keys: BTreeMap<(String, String), SecretKey>,
}

impl KeyStore {
    /// Reads every key in `dir` (an absent directory is an empty store).
    pub fn load(dir: &Path) -> Result<Self, SealError> {
        let fail = |path: &Path, e: &dyn std::fmt::Display| SealError::Store { path: path.display().to_string(), message: e.to_string() };
        let mut keys = BTreeMap::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self { dir: dir.to_owned(), keys }),
            Err(e) => return Err(fail(dir, &e)),
        };
        for entry in entries {
            let path = entry.map_err(|e| fail(dir, &e))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let text = std::fs::read(&path).map_err(|e| fail(&path, &e))?;
            let key: SecretKey = serde_json::from_slice(&text).map_err(|e| fail(&path, &e))?;
            keys.insert((key.subsystem.clone(), key.key_id.clone()), key);
        }
        Ok(Self { dir: dir.to_owned(), keys })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Saves a new key (never overwrites one).
    pub fn add(&mut self, key: SecretKey) -> Result<(), SealError> {
        let path = self.dir.join(format!("{}.{}.json", key.subsystem.replace('/', "~"), key.key_id));
        let fail = |e: &dyn std::fmt::Display| SealError::Store { path: path.display().to_string(), message: e.to_string() };
        std::fs::create_dir_all(&self.dir).map_err(|e| fail(&e))?;
        let text = serde_json::to_vec_pretty(&key).map_err(|e| fail(&e))?;
        let mut file = std::fs::OpenOptions::new();
        file.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut file, 0o600);
        let mut file = file.open(&path).map_err(|e| fail(&e))?;
        std::io::Write::write_all(&mut file, &text).map_err(|e| fail(&e))?;
        file.sync_all().map_err(|e| fail(&e))?;
        self.keys.insert((key.subsystem.clone(), key.key_id.clone()), key);
        Ok(())
    }

    pub fn keys<'a>(&'a self, subsystem: &'a str) -> impl Iterator<Item = &'a SecretKey> + 'a {
        self.keys.values().filter(move |k| k.subsystem == subsystem)
    }

    /// Opens a payload sealed to the service `recipient` with whichever of its subsystem's
    /// keys it names.
    pub fn open(&self, recipient: &str, payload: &[u8]) -> Result<Opened, SealError> {
        let service: kerwen_broker::ids::ServiceId =
            recipient.parse().map_err(|e| SealError::BadRecipient(format!("{recipient}: {e}")))?;
        let subsystem = service.subsystem.to_string();
        let envelope = Envelope::parse(payload)?;
        let key = self.keys.get(&(subsystem.clone(), envelope.key_id.to_owned())).ok_or_else(|| SealError::UnknownKey {
            subsystem,
            key_id: envelope.key_id.to_owned(),
            dir: self.dir.display().to_string(),
        })?;
        open(recipient, key, payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TO: &str = "TM/GOV/MINFIN/tax/declarations";

    #[test]
    fn seals_for_the_recipient_only() {
        let key = SecretKey::generate("TM/GOV/MINFIN/tax", "k1", 0);
        let sealed = seal(TO, "k1", &key.public_key, b"citizen 42: income 1000").unwrap();
        assert!(is_sealed(&sealed));
        assert!(!sealed.windows(6).any(|w| w == b"income"), "plaintext visible");
        let opened = open(TO, &key, &sealed).unwrap();
        assert_eq!(opened.plaintext, b"citizen 42: income 1000");
        assert_eq!(opened.key_id, "k1");

        let stranger = SecretKey::generate("TM/GOV/MINEDU/schools", "k1", 0);
        assert!(matches!(open(TO, &stranger, &sealed), Err(SealError::DoesNotOpen)));
        assert!(matches!(open("TM/GOV/MINFIN/tax/other", &key, &sealed), Err(SealError::DoesNotOpen)), "bound to the service");
        assert!(matches!(open(TO, &key, b"plain"), Err(SealError::NotSealed)));
    }

    #[test]
    fn every_changed_byte_is_refused() {
        let key = SecretKey::generate("TM/GOV/MINFIN/tax", "k1", 0);
        let sealed = seal(TO, "k1", &key.public_key, b"payload").unwrap();
        for i in 0..sealed.len() {
            let mut changed = sealed.clone();
            changed[i] ^= 0x01;
            assert!(open(TO, &key, &changed).is_err(), "byte {i} changed and still opened");
        }
    }

    #[test]
    fn a_revealed_payload_key_proves_the_content() {
        let key = SecretKey::generate("TM/GOV/MINFIN/tax", "k1", 0);
        let sealed = seal(TO, "k1", &key.public_key, b"the declaration").unwrap();
        let opened = open(TO, &key, &sealed).unwrap();
        assert_eq!(open_with_payload_key(TO, &sealed, &opened.payload_key).unwrap(), b"the declaration");
        let mut other = opened.payload_key;
        other[0] ^= 1;
        assert!(matches!(open_with_payload_key(TO, &sealed, &other), Err(SealError::WrongRevealedKey)));
    }

    #[test]
    fn the_store_keeps_old_keys_for_what_was_sealed_to_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = KeyStore::load(&dir.path().join("keys")).unwrap();
        let old = SecretKey::generate("TM/GOV/MINFIN/tax", "k1", 0);
        let new = SecretKey::generate("TM/GOV/MINFIN/tax", "k2", 1);
        let before = seal(TO, "k1", &old.public_key, b"before").unwrap();
        let after = seal(TO, "k2", &new.public_key, b"after").unwrap();
        store.add(old.clone()).unwrap();
        store.add(new).unwrap();
        assert!(store.add(old).is_err(), "a key file is never overwritten");
        let store = KeyStore::load(&dir.path().join("keys")).unwrap();
        assert_eq!(store.open(TO, &before).unwrap().plaintext, b"before");
        assert_eq!(store.open(TO, &after).unwrap().plaintext, b"after");
        let mut strangers = KeyStore::load(&dir.path().join("other")).unwrap();
        strangers.add(SecretKey::generate("TM/GOV/MINEDU/schools", "k2", 1)).unwrap();
        assert!(matches!(strangers.open(TO, &after), Err(SealError::UnknownKey { .. })));
    }
}
