//! The node's evidence signing key: Ed25519, separate from its TLS key, made on first start
//! in the data dir (`signing-key.json`, readable by the node's user only) and published, public
//! half only, in the metadata group's key registry, where verifiers find every key that ever
//! signed. A restart keeps the key; losing the data dir means a new key under a new id, and
//! the old public key stays published. [`rotate`] replaces the key while the node runs.

use std::path::Path;
use std::sync::Weak;
use std::time::Duration;

use anyhow::{bail, Context};
use ed25519_dalek::SigningKey;
use kerwen_broker::access::AccessCommand;
use kerwen_broker::evidence::PublicKeyRecord;
use kerwen_broker::model::{Command, CommandResult, NodeId, METADATA_GROUP};
use kerwen_broker::BrokerError;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::runtime::{now_unix_ms, NodeRuntime};

/// File name of the key inside the data dir.
pub const KEY_FILE: &str = "signing-key.json";

/// This node's signing key and its published id.
pub struct NodeSigningKey {
    pub key_id: String,
    pub key: SigningKey,
    pub created_unix_ms: i64,
}

#[derive(Serialize, Deserialize)]
struct KeyFile {
    key_id: String,
    created_unix_ms: i64,
    secret_hex: String,
}

impl NodeSigningKey {
    /// Loads the node's key from `data_dir`, making one on first start.
    pub fn load_or_create(data_dir: &Path, node: NodeId) -> anyhow::Result<Self> {
        let path = data_dir.join(KEY_FILE);
        if path.exists() {
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let file: KeyFile = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
            let secret: [u8; 32] = hex::decode(&file.secret_hex)
                .ok()
                .and_then(|b| b.try_into().ok())
                .with_context(|| format!("{}: the secret is not 32 bytes of hex", path.display()))?;
            return Ok(Self { key_id: file.key_id, key: SigningKey::from_bytes(&secret), created_unix_ms: file.created_unix_ms });
        }
        let key = Self::generate(node)?;
        key.save(data_dir)?;
        tracing::info!(key_id = key.key_id, "made a new evidence signing key");
        Ok(key)
    }

    /// A fresh key (not saved).
    pub fn generate(node: NodeId) -> anyhow::Result<Self> {
        let mut secret = [0u8; 32];
        // ThreadRng is a CSPRNG seeded from the operating system.
        rand::rng().fill_bytes(&mut secret);
        if secret == [0; 32] {
            bail!("the random source returned zeros");
        }
        let created_unix_ms = now_unix_ms();
        // The random suffix keeps ids unique when two keys are made within one millisecond.
        let key_id = format!("node-{node}-{created_unix_ms}-{:04x}", rand::random::<u16>());
        Ok(Self { key_id, key: SigningKey::from_bytes(&secret), created_unix_ms })
    }

    /// Writes the key to `data_dir` (readable by the node's user only), replacing the old
    /// file in one rename so a crash leaves one whole key file or the other.
    pub fn save(&self, data_dir: &Path) -> anyhow::Result<()> {
        let file = KeyFile { key_id: self.key_id.clone(), created_unix_ms: self.created_unix_ms, secret_hex: hex::encode(self.key.to_bytes()) };
        std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
        let tmp = data_dir.join(format!("{KEY_FILE}.new"));
        crate::pki::write_file(&tmp, serde_json::to_string_pretty(&file)?.as_bytes(), 0o600)?;
        let path = data_dir.join(KEY_FILE);
        std::fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))
    }

    /// The public half as published.
    pub fn public_record(&self) -> PublicKeyRecord {
        PublicKeyRecord::of(self.key_id.clone(), &self.key, self.created_unix_ms)
    }
}

/// Replaces the node's signing key without stopping: the new key is published first (so
/// nothing it signs is ever unverifiable), saved, and used from then on; the old one is then
/// retired, valid until just after the switch. Returns the old and the new key id.
pub async fn rotate(runtime: &NodeRuntime) -> Result<(String, String), BrokerError> {
    let _one_at_a_time = runtime.key_rotation.lock().await;
    let new = NodeSigningKey::generate(runtime.node_id()).map_err(|e| BrokerError::Internal(e.to_string()))?;
    let record = new.public_record();
    if let CommandResult::Rejected(e) = runtime.write(METADATA_GROUP, Command::Access(AccessCommand::RegisterSigningKey(record))).await?.1 {
        return Err(e);
    }
    new.save(&runtime.config.data_dir).map_err(|e| BrokerError::Storage(format!("saving the new signing key: {e:#}")))?;
    let old = runtime.signer.replace(new.key_id.clone(), new.key);
    // Every batch the old key signed carries a time read before the switch.
    let valid_until_unix_ms = now_unix_ms() + 1;
    let retire = AccessCommand::RetireSigningKey { key_id: old.key_id.clone(), valid_until_unix_ms };
    if let CommandResult::Rejected(e) = runtime.write(METADATA_GROUP, Command::Access(retire)).await?.1 {
        return Err(e);
    }
    tracing::info!(old = old.key_id, new = new.key_id, "evidence signing key rotated");
    Ok((old.key_id.clone(), new.key_id))
}

/// Publishes the node's key in the metadata group, retrying until it is there (the cluster
/// may not have a metadata leader yet when the node starts). Ends with the node.
pub fn spawn_registration(runtime: Weak<NodeRuntime>, record: PublicKeyRecord) {
    tokio::spawn(async move {
        loop {
            let Some(rt) = runtime.upgrade() else { return };
            if rt.meta_view().signing_key(&record.key_id).is_some_and(|r| r == record) {
                return;
            }
            let cmd = Command::Access(AccessCommand::RegisterSigningKey(record.clone()));
            match rt.write(METADATA_GROUP, cmd).await {
                Ok((_, CommandResult::Changed(_))) => {
                    tracing::info!(key_id = record.key_id, "evidence signing key published");
                    return;
                }
                Ok((_, CommandResult::Rejected(e))) => {
                    tracing::error!(key_id = record.key_id, "cannot publish the evidence signing key: {e}");
                    return;
                }
                Ok(_) | Err(_) => {}
            }
            drop(rt);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}
