//! `kerwen keys`: the calling subsystem's payload encryption keys (sealed payloads, see
//! [`crate::sealed`]). Private halves go to the local key store, public halves to the member
//! registry, where senders find them.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use kerwen_broker::access::Principal;
use kerwen_proto::v1 as pb;
use serde_json::json;

use super::{connect, status_error, ClientOpts};
use crate::client::Client;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate a key pair for the calling subsystem: the private half is saved in the key
    /// store, the public half registered for senders to seal to (the newest key is current).
    Generate {
        /// Key id [default: k + the current Unix time in milliseconds].
        #[arg(long)]
        key_id: Option<String>,
    },
    /// Generate and register a new key, then retire the subsystem's other keys. Their private
    /// halves stay in the key store: messages sealed to them before still open.
    Rotate {
        #[arg(long)]
        key_id: Option<String>,
    },
    /// Stop offering one of the calling subsystem's keys to senders.
    Retire { key_id: String },
    /// A subsystem's registered keys [default: the caller's], and whether the local key
    /// store holds each private half.
    List { subsystem: Option<String> },
    /// Open a sealed payload saved to a file (a large one `consume --save-dir` downloaded)
    /// with the local key store; works offline.
    Open {
        file: PathBuf,
        /// The service it was sent to (sealed payloads are bound to it).
        #[arg(long)]
        recipient: String,
        /// Where to write the plaintext.
        #[arg(long)]
        out: PathBuf,
        /// Also print the message's payload key: revealing it (it opens this message and no
        /// other) lets a third party check the content with `kerwen keys prove`.
        #[arg(long)]
        reveal: bool,
    },
    /// Check what a sealed payload says, given the payload key its recipient revealed; with
    /// the message's evidence (which covers the sealed bytes) this proves the content.
    /// Offline; needs no private key.
    Prove {
        file: PathBuf,
        #[arg(long)]
        recipient: String,
        /// The revealed payload key (64 hex digits).
        #[arg(long)]
        payload_key: String,
        /// Where to write the plaintext.
        #[arg(long)]
        out: PathBuf,
    },
}

/// The subsystem the cluster sees this client as.
async fn own_subsystem(client: &Client) -> anyhow::Result<String> {
    let identity = client.access().who_am_i(pb::WhoAmIRequest {}).await.map_err(status_error)?.into_inner().identity;
    match Principal::from_uri(&identity) {
        Ok(Some(Principal::Subsystem(s))) => Ok(s.to_string()),
        _ => bail!("encryption keys belong to a subsystem; this client is {identity:?} (use --as SUBSYSTEM or its certificate)"),
    }
}

fn key_json(k: &pb::EncryptionKey, local: bool) -> serde_json::Value {
    json!({
        "subsystem": k.subsystem,
        "key_id": k.key_id,
        "public_key": hex::encode(&k.public_key),
        "valid_from_unix_ms": k.valid_from_unix_ms,
        "valid_until_unix_ms": k.valid_until_unix_ms,
        "private_key_here": local,
    })
}

async fn generate(opts: &ClientOpts, client: &mut Client, subsystem: &str, key_id: Option<String>) -> anyhow::Result<pb::EncryptionKey> {
    let mut store = opts.key_store()?;
    client.generate_encryption_key(&mut store, subsystem, key_id).await
}

async fn retire(client: &Client, subsystem: &str, key_id: &str) -> anyhow::Result<pb::EncryptionKey> {
    let req = pb::RetireEncryptionKeyRequest { subsystem: subsystem.to_owned(), key_id: key_id.to_owned() };
    Ok(client.access().retire_encryption_key(req).await.map_err(status_error)?.into_inner())
}

/// Opens a sealed file offline.
fn open_file(opts: &ClientOpts, file: &Path, recipient: &str, out: &Path, reveal: bool) -> anyhow::Result<()> {
    let sealed = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let opened = opts.key_store()?.open(recipient, &sealed)?;
    crate::pki::write_file(out, &opened.plaintext, 0o600)?;
    eprintln!("opened with key {}: {} bytes written to {}", opened.key_id, opened.plaintext.len(), out.display());
    if reveal {
        println!("{}", hex::encode(opened.payload_key));
    }
    Ok(())
}

/// Decrypts a sealed file with a revealed payload key, offline.
fn prove_file(file: &Path, recipient: &str, payload_key: &str, out: &Path) -> anyhow::Result<()> {
    let sealed = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let key: [u8; 32] = hex::decode(payload_key)
        .ok()
        .and_then(|k| k.try_into().ok())
        .context("--payload-key must be 64 hex digits")?;
    let plaintext = crate::sealed::open_with_payload_key(recipient, &sealed, &key)?;
    crate::pki::write_file(out, &plaintext, 0o600)?;
    eprintln!("the payload key matches the sealed bytes: {} bytes of plaintext written to {}", plaintext.len(), out.display());
    Ok(())
}

/// A connection to the cluster and the subsystem it sees this client as.
async fn connect_as_subsystem(opts: &ClientOpts) -> anyhow::Result<(Client, String)> {
    let client = connect(opts).await?;
    let subsystem = own_subsystem(&client).await?;
    Ok((client, subsystem))
}

pub async fn keys(opts: &ClientOpts, cmd: KeysCommand) -> anyhow::Result<()> {
    let print = |k: &pb::EncryptionKey, what: &str| {
        if opts.json {
            println!("{}", key_json(k, true));
        } else {
            println!("{what} encryption key {} of {}", k.key_id, k.subsystem);
        }
    };
    match cmd {
        KeysCommand::Generate { key_id } => {
            let (mut client, subsystem) = connect_as_subsystem(opts).await?;
            print(&generate(opts, &mut client, &subsystem, key_id).await?, "registered");
        }
        KeysCommand::Rotate { key_id } => {
            let (mut client, subsystem) = connect_as_subsystem(opts).await?;
            let new = generate(opts, &mut client, &subsystem, key_id).await?;
            print(&new, "registered");
            for old in client.encryption_keys(&subsystem).await.map_err(status_error)? {
                if old.key_id != new.key_id && old.valid_until_unix_ms.is_none() {
                    print(&retire(&client, &subsystem, &old.key_id).await?, "retired");
                }
            }
        }
        KeysCommand::Retire { key_id } => {
            let (client, subsystem) = connect_as_subsystem(opts).await?;
            print(&retire(&client, &subsystem, &key_id).await?, "retired");
        }
        KeysCommand::List { subsystem } => {
            let mut client = connect(opts).await?;
            let subsystem = match subsystem {
                Some(s) => s,
                None => own_subsystem(&client).await?,
            };
            let store = opts.key_store().ok();
            let local = |k: &pb::EncryptionKey| store.as_ref().is_some_and(|s| s.keys(&k.subsystem).any(|l| l.key_id == k.key_id));
            let keys = client.encryption_keys(&subsystem).await.map_err(status_error)?;
            if opts.json {
                println!("{}", json!(keys.iter().map(|k| key_json(k, local(k))).collect::<Vec<_>>()));
            } else {
                for k in &keys {
                    let state = if k.valid_until_unix_ms.is_some() { "retired" } else { "current" };
                    let here = if local(k) { ", private key here" } else { "" };
                    println!("{} {} ({state}{here}) {}", k.subsystem, k.key_id, hex::encode(&k.public_key));
                }
            }
        }
        KeysCommand::Open { file, recipient, out, reveal } => open_file(opts, &file, &recipient, &out, reveal)?,
        KeysCommand::Prove { file, recipient, payload_key, out } => prove_file(&file, &recipient, &payload_key, &out)?,
    }
    Ok(())
}
