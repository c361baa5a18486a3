//! Encryption at rest: every value the node writes to RocksDB is sealed with an AEAD under the
//! node's own data key, so payloads on disk (SST files, WAL, the copies a backup makes) are not
//! readable without that key. Keys of the database stay plaintext: they hold ids and positions,
//! and range scans need their order.
//!
//! A sealed value is `tag (1 byte) | nonce (12) | ciphertext | AEAD tag (16)`, or, for
//! [`Algorithm::None`], `0 | plaintext`. The tag byte names the algorithm, so a value is opened
//! by what it was sealed with, not by what is configured now: changing the setting on an
//! existing data dir keeps every old value readable (and only new values use the new setting),
//! as long as the data key is the same. The empty value stays empty: index markers carry
//! nothing, and sealing them would only add 29 bytes to each.
//!
//! The data key is 32 random bytes in a file of its own (`data-key` in the node's data dir,
//! readable by the node's user only), outside the RocksDB directory so that a copy of the
//! database alone is not enough to read it. Each algorithm uses its own subkey derived from it
//! (HKDF-SHA-256), so one key is never used by two different ciphers.

use std::borrow::Cow;
use std::fmt;
use std::io::Write;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

use crate::error::{BrokerError, Result};

/// Bytes of a data key.
pub const DATA_KEY_LEN: usize = 32;
/// File name of the data key inside a node's data dir.
pub const DATA_KEY_FILE: &str = "data-key";

const TAG_NONE: u8 = 0;
const TAG_AES_256_GCM: u8 = 1;
const TAG_CHACHA20_POLY1305: u8 = 2;
/// Algorithm tag and nonce in front of the ciphertext.
const HEADER_LEN: usize = 1 + NONCE_LEN;
/// What sealing adds to a value with an AEAD algorithm.
pub const SEAL_OVERHEAD: usize = HEADER_LEN + 16;

/// How new values are sealed (`--encryption-at-rest`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// AES-256 in Galois/Counter Mode (hardware-accelerated on current x86 and ARM).
    #[default]
    Aes256Gcm,
    /// ChaCha20-Poly1305 (fast without AES instructions).
    ChaCha20Poly1305,
    /// No encryption: values are written in plaintext (still readable: old sealed values).
    None,
}

impl Algorithm {
    /// Every algorithm, by its setting name.
    pub const ALL: [Algorithm; 3] = [Algorithm::Aes256Gcm, Algorithm::ChaCha20Poly1305, Algorithm::None];

    /// The setting's spelling (`aes-256-gcm`, `chacha20-poly1305`, `none`).
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Aes256Gcm => "aes-256-gcm",
            Algorithm::ChaCha20Poly1305 => "chacha20-poly1305",
            Algorithm::None => "none",
        }
    }

    fn tag(self) -> u8 {
        match self {
            Algorithm::Aes256Gcm => TAG_AES_256_GCM,
            Algorithm::ChaCha20Poly1305 => TAG_CHACHA20_POLY1305,
            Algorithm::None => TAG_NONE,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Algorithm {
    type Err = BrokerError;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|a| a.name() == s).ok_or_else(|| {
            BrokerError::InvalidArgument(format!("unknown encryption at rest {s:?}: use aes-256-gcm, chacha20-poly1305 or none"))
        })
    }
}

/// A node's data key. `Debug` never shows it.
#[derive(Clone)]
pub struct DataKey([u8; DATA_KEY_LEN]);

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(..)")
    }
}

impl DataKey {
    pub fn from_bytes(bytes: [u8; DATA_KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// A new random key from the operating system's generator.
    pub fn generate() -> Result<Self> {
        let mut key = [0u8; DATA_KEY_LEN];
        SystemRandom::new().fill(&mut key).map_err(|_| BrokerError::Internal("the system random generator failed".into()))?;
        Ok(Self(key))
    }

    /// Reads the key at `path`, or makes one there if there is no file yet (mode 0600).
    /// A file of any other size is refused rather than used: it is not a key this node wrote.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) => return Self::parse(path, &bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(BrokerError::Storage(format!("reading the data key {}: {e}", path.display()))),
        }
        let key = Self::generate()?;
        let io = |what: &str, e: std::io::Error| BrokerError::Storage(format!("{what} the data key {}: {e}", path.display()));
        // Written whole and synced under a temporary name, then linked into place: the link
        // fails if the file appeared meanwhile (a second process on the same data dir), so a
        // key that may already have sealed data is never replaced; a crash leaves no half key.
        let tmp = path.with_extension(format!("tmp~{}", std::process::id()));
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| io("writing", e))?;
            f.write_all(&key.0).map_err(|e| io("writing", e))?;
            f.sync_all().map_err(|e| io("syncing", e))?;
        }
        let linked = std::fs::hard_link(&tmp, path);
        // The temporary name goes either way; failing to remove it only leaves a stray file.
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let bytes = std::fs::read(path).map_err(|e| io("reading", e))?;
                return Self::parse(path, &bytes);
            }
            Err(e) => return Err(io("creating", e)),
        }
        // The new name must be durable before any value is sealed with the key.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io("syncing the directory of", e))?;
        }
        Ok(key)
    }

    fn parse(path: &Path, bytes: &[u8]) -> Result<Self> {
        let key: [u8; DATA_KEY_LEN] = bytes.try_into().map_err(|_| {
            BrokerError::Storage(format!(
                "{} holds {} bytes, but a data key is exactly {DATA_KEY_LEN}: it is not a key this node wrote \
                 (restore the node's own data-key file; without it the node's data cannot be read)",
                path.display(),
                bytes.len()
            ))
        })?;
        Ok(Self(key))
    }
}

/// Seals values for RocksDB and opens them again.
pub struct AtRestCipher {
    algorithm: Algorithm,
    aes: LessSafeKey,
    chacha: LessSafeKey,
    /// Nonce = `nonce_high` (4 bytes) | `nonce_low` (8 bytes, the counter), both drawn at random
    /// when the cipher is made.
    ///
    /// Why not a random nonce per value: with random 96-bit nonces a repeat becomes likely
    /// (birthday bound) after about 2^48 values under one key, and NIST caps them at 2^32. Here
    /// the counter makes every nonce of one process distinct (it would take 2^64 seals to wrap),
    /// so randomness is drawn once per start, not once per value: a repeat needs two starts with
    /// the same key to draw the same high 32 bits and overlapping counter ranges, about
    /// starts² × seals-per-start / 2^96 — for a million restarts sealing 2^32 values each, 2^-24.
    nonce_high: u32,
    nonce_low: AtomicU64,
}

impl fmt::Debug for AtRestCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AtRestCipher").field("algorithm", &self.algorithm).finish_non_exhaustive()
    }
}

/// Domain separation of the subkeys derived from a data key.
const HKDF_SALT: &[u8] = b"kerwen encryption at rest v1";

impl AtRestCipher {
    /// A cipher sealing new values with `algorithm`; it opens values sealed with any algorithm
    /// under the same `key`.
    pub fn new(algorithm: Algorithm, key: &DataKey) -> Result<Self> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(&key.0);
        let subkey = |alg: &'static aead::Algorithm, info: &'static [u8]| -> Result<LessSafeKey> {
            let info = [info];
            let okm = prk.expand(&info, alg).map_err(|_| BrokerError::Internal("deriving a data subkey".into()))?;
            Ok(LessSafeKey::new(UnboundKey::from(okm)))
        };
        let aes = subkey(&aead::AES_256_GCM, Algorithm::Aes256Gcm.name().as_bytes())?;
        let chacha = subkey(&aead::CHACHA20_POLY1305, Algorithm::ChaCha20Poly1305.name().as_bytes())?;
        let mut start = [0u8; 12];
        SystemRandom::new().fill(&mut start).map_err(|_| BrokerError::Internal("the system random generator failed".into()))?;
        let [h0, h1, h2, h3, l0, l1, l2, l3, l4, l5, l6, l7] = start;
        Ok(Self {
            algorithm,
            aes,
            chacha,
            nonce_high: u32::from_be_bytes([h0, h1, h2, h3]),
            nonce_low: AtomicU64::new(u64::from_be_bytes([l0, l1, l2, l3, l4, l5, l6, l7])),
        })
    }

    /// A cipher with a fresh random key: for stores that are never reopened (tests, benches).
    pub fn ephemeral(algorithm: Algorithm) -> Result<Self> {
        Self::new(algorithm, &DataKey::generate()?)
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    fn next_nonce(&self) -> [u8; NONCE_LEN] {
        // Relaxed is enough: only the uniqueness of each returned value matters, which the
        // atomic increment gives whatever the ordering.
        let low = self.nonce_low.fetch_add(1, Ordering::Relaxed);
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..4].copy_from_slice(&self.nonce_high.to_be_bytes());
        nonce[4..].copy_from_slice(&low.to_be_bytes());
        nonce
    }

    /// Seals the plaintext that `write` appends to the buffer it is given: the value is
    /// serialized straight into the output, encrypted in place, and the AEAD tag appended, so
    /// sealing costs one buffer of `plaintext_len + SEAL_OVERHEAD` and no copy.
    pub fn seal_with(&self, plaintext_len: usize, write: impl FnOnce(&mut Vec<u8>) -> Result<()>) -> Result<Vec<u8>> {
        let key = match self.algorithm {
            Algorithm::None => {
                let mut out = Vec::with_capacity(1 + plaintext_len);
                out.push(TAG_NONE);
                write(&mut out)?;
                return Ok(if out.len() == 1 { Vec::new() } else { out });
            }
            Algorithm::Aes256Gcm => &self.aes,
            Algorithm::ChaCha20Poly1305 => &self.chacha,
        };
        let mut out = Vec::with_capacity(SEAL_OVERHEAD + plaintext_len);
        out.push(self.algorithm.tag());
        out.extend_from_slice(&[0; NONCE_LEN]);
        write(&mut out)?;
        if out.len() == HEADER_LEN {
            return Ok(Vec::new());
        }
        let nonce = self.next_nonce();
        out[1..HEADER_LEN].copy_from_slice(&nonce);
        let tag = key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut out[HEADER_LEN..])
            .map_err(|_| BrokerError::Internal("sealing a record failed (value too large for the cipher)".into()))?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Seals `plaintext` (one copy into the output buffer).
    pub fn seal(&self, plaintext: &[u8]) -> Result<Vec<u8>> {
        self.seal_with(plaintext.len(), |out| {
            out.extend_from_slice(plaintext);
            Ok(())
        })
    }

    /// Opens a sealed value, whatever algorithm sealed it. Plaintext values are borrowed.
    pub fn open<'a>(&self, sealed: &'a [u8]) -> Result<Cow<'a, [u8]>> {
        let Some((&tag, rest)) = sealed.split_first() else { return Ok(Cow::Borrowed(sealed)) };
        let key = match tag {
            TAG_NONE => return Ok(Cow::Borrowed(rest)),
            TAG_AES_256_GCM => &self.aes,
            TAG_CHACHA20_POLY1305 => &self.chacha,
            other => {
                return Err(BrokerError::Storage(format!(
                    "a stored record names an unknown cipher ({other}): the record is corrupt, or was written by a \
                     newer version"
                )))
            }
        };
        if rest.len() < SEAL_OVERHEAD - 1 {
            return Err(BrokerError::Storage(format!("a stored record is too short to be sealed ({} bytes): it is corrupt", sealed.len())));
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| BrokerError::Internal("nonce length".into()))?;
        let mut buf = ciphertext.to_vec();
        let len = key
            .open_in_place(nonce, Aad::empty(), &mut buf)
            .map_err(|_| {
                BrokerError::Storage(
                    "a stored record cannot be decrypted: the data key is not the one it was written with, or the \
                     record is corrupt"
                        .into(),
                )
            })?
            .len();
        buf.truncate(len);
        Ok(Cow::Owned(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"KERWEN-AT-REST-UNIT-CANARY with some length to it";

    fn cipher(algorithm: Algorithm) -> AtRestCipher {
        AtRestCipher::new(algorithm, &DataKey::from_bytes([7; DATA_KEY_LEN])).expect("cipher")
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn every_algorithm_round_trips_and_only_none_leaves_plaintext() {
        for algorithm in Algorithm::ALL {
            let c = cipher(algorithm);
            let sealed = c.seal(SECRET).expect("seal");
            assert_eq!(sealed[0], algorithm.tag(), "{algorithm}");
            assert_eq!(c.open(&sealed).expect("open").as_ref(), SECRET, "{algorithm}");
            assert_eq!(contains(&sealed, SECRET), algorithm == Algorithm::None, "{algorithm}");
            if algorithm != Algorithm::None {
                assert_eq!(sealed.len(), SECRET.len() + SEAL_OVERHEAD);
            }
            assert!(c.seal(b"").expect("seal").is_empty(), "markers stay empty");
            assert!(c.open(b"").expect("open").is_empty());
        }
    }

    #[test]
    fn values_sealed_with_one_algorithm_open_under_any_setting_with_the_same_key() {
        for sealer in Algorithm::ALL {
            let sealed = cipher(sealer).seal(SECRET).expect("seal");
            for opener in Algorithm::ALL {
                assert_eq!(cipher(opener).open(&sealed).expect("open").as_ref(), SECRET, "{sealer} -> {opener}");
            }
        }
    }

    #[test]
    fn a_flipped_byte_anywhere_fails_to_open() {
        for algorithm in [Algorithm::Aes256Gcm, Algorithm::ChaCha20Poly1305] {
            let c = cipher(algorithm);
            let sealed = c.seal(SECRET).expect("seal");
            // Past the tag byte: nonce, ciphertext and AEAD tag are all authenticated.
            for i in 1..sealed.len() {
                let mut bad = sealed.clone();
                bad[i] ^= 0x01;
                assert!(matches!(c.open(&bad), Err(BrokerError::Storage(_))), "{algorithm}: byte {i}");
            }
            assert!(c.open(&sealed[..sealed.len() - 1]).is_err(), "truncated");
            let mut unknown = sealed.clone();
            unknown[0] = 9;
            assert!(c.open(&unknown).is_err(), "unknown algorithm tag");
        }
    }

    #[test]
    fn a_wrong_key_fails_with_a_clear_error() {
        for algorithm in [Algorithm::Aes256Gcm, Algorithm::ChaCha20Poly1305] {
            let sealed = cipher(algorithm).seal(SECRET).expect("seal");
            let other = AtRestCipher::new(algorithm, &DataKey::from_bytes([8; DATA_KEY_LEN])).expect("cipher");
            let e = other.open(&sealed).expect_err("wrong key");
            assert!(matches!(&e, BrokerError::Storage(m) if m.contains("data key")), "{e}");
        }
    }

    #[test]
    fn nonces_differ_between_values_and_between_starts() {
        let c = cipher(Algorithm::Aes256Gcm);
        let nonce = |sealed: &[u8]| sealed[1..HEADER_LEN].to_vec();
        let a = c.seal(SECRET).expect("seal");
        let b = c.seal(SECRET).expect("seal");
        assert_ne!(nonce(&a), nonce(&b));
        assert_ne!(a, b, "same plaintext, different ciphertext");
        let restarted = cipher(Algorithm::Aes256Gcm).seal(SECRET).expect("seal");
        assert_ne!(nonce(&a), nonce(&restarted), "each start draws its own nonce range");
        let mut seen = std::collections::HashSet::new();
        assert!((0..10_000).all(|_| seen.insert(c.next_nonce())));
    }

    #[test]
    fn the_key_file_is_made_once_private_and_wrong_sizes_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(DATA_KEY_FILE);
        let key = DataKey::load_or_create(&path).expect("create");
        assert_eq!(std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777, 0o600);
        assert_eq!(DataKey::load_or_create(&path).expect("load").0, key.0, "a restart keeps the key");
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 1, "no temporary file left");
        std::fs::write(&path, [1u8; 31]).expect("write");
        let e = DataKey::load_or_create(&path).expect_err("short key").to_string();
        assert!(e.contains("31 bytes") && e.contains("exactly 32"), "{e}");
    }
}
