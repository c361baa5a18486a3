//! Client commands of the `kerwen` binary: mailboxes, publish, consume, dead letters, status
//! (here), members, access rights, discovery and certificates (`access`), operational data
//! (`opmon`), encryption keys (`keys`), request/reply (`request`) and scenarios (`scenario`). Output is for
//! people by default and one JSON document (or one per line for streams) with `--json`.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use kerwen_broker::model::{dead_letter_partition, is_dead_letter, DEAD_LETTER_BIT};
use kerwen_proto::v1 as pb;
use serde_json::json;
use tracing::Instrument;

use crate::client::{Client, ClientTls, Event};
use crate::profile::Profile;
use crate::tls::TlsFiles;

pub mod access;
pub mod keys;
pub mod node;
pub mod opmon;
pub mod request;
pub mod scenario;

/// Where and how to talk to the cluster. Without flags, the client profile says it (see
/// [`crate::profile`]; `kerwen dev` writes one).
#[derive(Debug, Clone, Default, Args)]
pub struct ClientOpts {
    /// Comma-separated node endpoints; the first reachable one is used [default: the
    /// profile's, else the `kerwen dev` nodes].
    #[arg(long, env = "KERWEN_ENDPOINT", global = true)]
    pub endpoint: Option<String>,
    /// Client profile (TOML) [default: ~/.config/kerwen/profile.toml].
    #[arg(long, env = "KERWEN_PROFILE", global = true)]
    pub profile: Option<PathBuf>,
    /// Act as this subsystem (INSTANCE/CLASS/MEMBER/SUBSYSTEM): its certificate is taken from
    /// the profile's PKI directory, and issued there first if missing (development).
    #[arg(long = "as", env = "KERWEN_AS", value_name = "SUBSYSTEM", global = true)]
    pub as_subsystem: Option<String>,
    /// CA bundle (PEM) instead of the profile's.
    #[arg(long, env = "KERWEN_TLS_CA", global = true, requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) instead of the profile's.
    #[arg(long, env = "KERWEN_TLS_CERT", global = true, requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM) instead of the profile's.
    #[arg(long, env = "KERWEN_TLS_KEY", global = true, requires_all = ["tls_ca", "tls_cert"])]
    pub tls_key: Option<PathBuf>,
    /// Plaintext, for a cluster run with `--insecure`.
    #[arg(long, env = "KERWEN_INSECURE", global = true)]
    pub insecure: bool,
    /// Directory of the subsystems' private encryption keys (sealed payloads) [default: the
    /// profile's PKI directory's `sealing-keys`, else beside the profile].
    #[arg(long, env = "KERWEN_KEYS_DIR", global = true)]
    pub keys_dir: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

impl ClientOpts {
    /// The client profile these options name, or the default one if it exists.
    pub fn load_profile(&self) -> anyhow::Result<Option<Profile>> {
        match &self.profile {
            Some(path) => Ok(Some(Profile::load(path)?)),
            None => match crate::profile::default_path() {
                Some(path) if path.exists() => Ok(Some(Profile::load(&path)?)),
                _ => Ok(None),
            },
        }
    }

    /// The local key store of private encryption keys (see [`crate::sealed::KeyStore`]).
    pub fn key_store(&self) -> anyhow::Result<crate::sealed::KeyStore> {
        let dir = match &self.keys_dir {
            Some(dir) => dir.clone(),
            None => {
                let profile = self.load_profile()?;
                match (profile.and_then(|p| p.pki_dir), self.profile.clone().or_else(crate::profile::default_path)) {
                    (Some(pki), _) => pki.join(crate::sealed::KEY_STORE_DIR),
                    (None, Some(path)) => path.parent().map(|d| d.join(crate::sealed::KEY_STORE_DIR)).context("the profile path has no directory")?,
                    (None, None) => bail!("no key store: give --keys-dir (or KERWEN_KEYS_DIR)"),
                }
            }
        };
        Ok(crate::sealed::KeyStore::load(&dir)?)
    }

    /// The endpoints and TLS settings these options and the profile resolve to.
    pub fn resolve(&self) -> anyhow::Result<(String, Option<ClientTls>)> {
        let profile = if self.insecure { None } else { self.load_profile()? };
        let endpoints = self
            .endpoint
            .clone()
            .or_else(|| profile.as_ref().map(|p| p.endpoints.clone()))
            .unwrap_or_else(|| crate::client::DEFAULT_ENDPOINTS.to_owned());
        if self.insecure {
            return Ok((endpoints, None));
        }
        let files = match (&self.tls_ca, &self.tls_cert, &self.tls_key, &profile) {
            (Some(ca), Some(cert), Some(key), _) => TlsFiles { ca: ca.clone(), cert: cert.clone(), key: key.clone() },
            (_, _, _, Some(p)) => p.tls_files(),
            _ => bail!(
                "no client certificate: start `kerwen dev` (it writes a profile), give --profile or --tls-ca/--tls-cert/--tls-key, \
                 or --insecure for a plaintext cluster"
            ),
        };
        let files = match &self.as_subsystem {
            Some(subsystem) => {
                let subsystem = subsystem.parse().with_context(|| format!("--as {subsystem}"))?;
                let pki_dir = profile
                    .as_ref()
                    .and_then(|p| p.pki_dir.clone())
                    .context("--as needs a profile with a pki_dir (the CA that issues the subsystem's certificate)")?;
                let id = crate::pki::subsystem_identity(&pki_dir, &subsystem)?;
                TlsFiles { ca: files.ca, cert: id.cert, key: id.key }
            }
            None => files,
        };
        Ok((endpoints, Some(ClientTls::from_files(&files)?)))
    }
}

#[derive(Debug, Subcommand)]
pub enum MailboxCommand {
    /// Create the mailbox of a service: INSTANCE/CLASS/MEMBER/SUBSYSTEM/SERVICE[/VERSION].
    Create {
        service: String,
        /// Number of partitions (FIFO holds per partition); default: the cluster's.
        #[arg(long, default_value_t = 0)]
        partitions: u32,
        /// Most messages stored (published, not yet acked); default 10,000,000.
        #[arg(long, default_value_t = 0)]
        max_messages: u64,
        /// Most payload bytes stored; default 10 GiB.
        #[arg(long, default_value_t = 0)]
        max_bytes: u64,
        /// A message id published again within this many ms is not stored twice; default 24 h.
        #[arg(long, default_value_t = 0)]
        dedup_window_ms: u64,
        #[command(flatten)]
        delivery: DeliveryOpts,
    },
    /// Add partitions to a mailbox. Messages with an ordering key keep their partition, so
    /// per-key order holds; the new partitions take unkeyed messages. Open subscriptions end
    /// and are reopened over every partition.
    Grow {
        service: String,
        /// The new number of partitions (more than now, at most 256).
        #[arg(long)]
        partitions: u32,
    },
    /// List all mailboxes.
    List,
    /// Show a mailbox with its pending message count.
    Describe { service: String },
}

/// A mailbox's delivery policy (0 or absent: the default).
#[derive(Debug, Clone, Args)]
pub struct DeliveryOpts {
    /// How long a delivery is leased to its consumer before it is redelivered; default 30 s.
    #[arg(long, default_value_t = 0)]
    pub lease_ms: u64,
    /// Deliveries before a message moves to the dead-letter queue; default 5.
    #[arg(long, default_value_t = 0)]
    pub max_attempts: u32,
    /// Redelivery back-off after the first failed attempt, doubling after each; default 1 s.
    #[arg(long, default_value_t = 0)]
    pub backoff_initial_ms: u64,
    /// Longest redelivery back-off; default 5 min.
    #[arg(long, default_value_t = 0)]
    pub backoff_max_ms: u64,
    /// Time to live of messages published without one; default: none.
    #[arg(long, default_value_t = 0)]
    pub default_ttl_ms: u64,
    /// Deliver messages with the same ordering key one at a time, in publish order.
    #[arg(long)]
    pub ordered: bool,
    /// How long each message's evidence is kept after it was accepted; default 2555 (7 years).
    #[arg(long, default_value_t = 0)]
    pub evidence_retention_days: u64,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List a mailbox's dead letters (without payloads).
    List {
        mailbox: String,
        /// Most entries shown.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Move dead letters back into the mailbox (attempts start over).
    Redrive {
        mailbox: String,
        /// Dead-letter positions as PARTITION:SEQUENCE, as `dlq list` shows them (repeatable).
        #[arg(long = "position", value_name = "PARTITION:SEQUENCE", required_unless_present = "all")]
        positions: Vec<String>,
        /// Redrive every dead letter of the mailbox.
        #[arg(long, conflicts_with = "positions")]
        all: bool,
    },
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Recipient service id (the mailbox).
    #[arg(long)]
    pub to: String,
    /// Payload given inline.
    #[arg(long, conflicts_with = "file")]
    pub data: Option<String>,
    /// Payload read from a file (default: standard input).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Message id (idempotency key); default: a random one.
    #[arg(long)]
    pub id: Option<String>,
    /// Ordering key: messages with the same key keep their order.
    #[arg(long)]
    pub key: Option<String>,
    /// Header as NAME=VALUE (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE")]
    pub headers: Vec<String>,
    /// Time to live in milliseconds; default: the mailbox's.
    #[arg(long)]
    pub ttl_ms: Option<u64>,
    /// Write the message's receipt (its facts and the cluster's signed proof of acceptance)
    /// to this file, for `kerwen evidence verify`.
    #[arg(long)]
    pub receipt: Option<PathBuf>,
    /// Seal the payload to the recipient subsystem's current encryption key (HPKE): the
    /// cluster stores and delivers bytes only the recipient can read.
    #[arg(long)]
    pub seal: bool,
}

#[derive(Debug, Args)]
pub struct DownloadArgs {
    /// Mailbox (service id) the message was delivered from.
    #[arg(long)]
    pub from: String,
    /// The delivery's position as PARTITION:SEQUENCE (as `consume` prints it).
    #[arg(long)]
    pub position: String,
    /// File to write; if it exists, the download resumes after its current length.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Mailbox (service id) to consume.
    #[arg(long)]
    pub from: String,
    /// Stop after this many messages (default: run until Ctrl-C).
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop when no message arrived for this many seconds.
    #[arg(long)]
    pub timeout_secs: Option<u64>,
    /// Do not ack (messages are redelivered after the lease or on disconnect).
    #[arg(long)]
    pub no_ack: bool,
    /// Consume the mailbox's dead-letter queue instead.
    #[arg(long)]
    pub dead_letters: bool,
    /// Download chunked (large) payloads into this directory, one file per message id,
    /// before acking them. Without it they are acked unread.
    #[arg(long)]
    pub save_dir: Option<PathBuf>,
}

pub(crate) fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

/// Prints `value` as JSON with `--json`, else runs `text`.
pub(crate) fn print_json_or(opts: &ClientOpts, value: serde_json::Value, text: impl FnOnce()) {
    if opts.json {
        println!("{value}");
    } else {
        text();
    }
}

pub(crate) async fn connect(opts: &ClientOpts) -> anyhow::Result<Client> {
    let (endpoints, tls) = opts.resolve()?;
    // One-shot commands: a second connection to a leader costs more than the hop it saves.
    Client::connect_list_with(&endpoints, tls).await.map(Client::without_direct_routing).map_err(status_error)
}

fn mailbox_json(m: &pb::MailboxInfo) -> serde_json::Value {
    json!({
        "service": m.service,
        "id": m.id,
        "partitions": m.partitions,
        "key_partitions": m.key_partitions,
        "partition_shards": m.partition_shards,
        "pending_messages": m.pending_messages,
        "pending_bytes": m.pending_bytes,
        "created_unix_ms": m.created_unix_ms,
        "dedup_window_ms": m.dedup_window_ms,
        "max_messages": m.max_messages,
        "max_bytes": m.max_bytes,
        "lease_ms": m.lease_ms,
        "max_attempts": m.max_attempts,
        "backoff_initial_ms": m.backoff_initial_ms,
        "backoff_max_ms": m.backoff_max_ms,
        "default_ttl_ms": m.default_ttl_ms,
        "ordered": m.ordered,
        "evidence_retention_ms": m.evidence_retention_ms,
        "dead_letter_messages": m.dead_letter_messages,
        "dead_letter_bytes": m.dead_letter_bytes,
    })
}

pub async fn mailbox(opts: &ClientOpts, cmd: MailboxCommand) -> anyhow::Result<()> {
    let mut client = connect(opts).await?;
    match cmd {
        MailboxCommand::Create { service, partitions, max_messages, max_bytes, dedup_window_ms, delivery } => {
            let req = pb::CreateMailboxRequest {
                service,
                partitions,
                max_messages,
                max_bytes,
                dedup_window_ms,
                lease_ms: delivery.lease_ms,
                max_attempts: delivery.max_attempts,
                backoff_initial_ms: delivery.backoff_initial_ms,
                backoff_max_ms: delivery.backoff_max_ms,
                default_ttl_ms: delivery.default_ttl_ms,
                ordered: delivery.ordered,
                evidence_retention_days: delivery.evidence_retention_days,
            };
            let m = client.create_mailbox_with(req).await.map_err(status_error)?;
            if opts.json {
                println!("{}", mailbox_json(&m));
            } else {
                println!("created mailbox {} ({} partitions)", m.service, m.partitions);
            }
        }
        MailboxCommand::Grow { service, partitions } => {
            let m = client.grow_mailbox(&service, partitions).await.map_err(status_error)?;
            if opts.json {
                println!("{}", mailbox_json(&m));
            } else {
                println!(
                    "mailbox {} has {} partitions (on shards {:?}); ordering keys stay on the first {}",
                    m.service, m.partitions, m.partition_shards, m.key_partitions
                );
            }
        }
        MailboxCommand::List => {
            let list = client.list_mailboxes().await.map_err(status_error)?;
            if opts.json {
                println!("{}", serde_json::Value::Array(list.iter().map(mailbox_json).collect()));
            } else if list.is_empty() {
                println!("no mailboxes");
            } else {
                println!("{:<60} {:>10}", "MAILBOX", "PARTITIONS");
                for m in list {
                    println!("{:<60} {:>10}", m.service, m.partitions);
                }
            }
        }
        MailboxCommand::Describe { service } => {
            let m = client.describe_mailbox(&service).await.map_err(status_error)?;
            if opts.json {
                println!("{}", mailbox_json(&m));
            } else {
                println!("mailbox     {}", m.service);
                println!("partitions  {} (on shards {:?}; ordering keys on the first {})", m.partitions, m.partition_shards, m.key_partitions);
                println!("pending     {} messages, {} bytes", m.pending_messages, m.pending_bytes);
                println!("dead letters {} messages, {} bytes", m.dead_letter_messages, m.dead_letter_bytes);
                println!("limits      {} messages, {} bytes; dedup window {} ms", m.max_messages, m.max_bytes, m.dedup_window_ms);
                let ttl = if m.default_ttl_ms == 0 { "none".to_owned() } else { format!("{} ms", m.default_ttl_ms) };
                println!(
                    "delivery    lease {} ms, {} attempts, back-off {}..{} ms, default ttl {}{}",
                    m.lease_ms,
                    m.max_attempts,
                    m.backoff_initial_ms,
                    m.backoff_max_ms,
                    ttl,
                    if m.ordered { ", ordered" } else { "" }
                );
            }
        }
    }
    Ok(())
}

pub(crate) fn random_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Files larger than this are published as a chunked upload (the nodes' default limit for an
/// inline payload is 4 MiB).
const INLINE_PAYLOAD_MAX: u64 = 4 * 1024 * 1024;
/// Upload chunk size.
const UPLOAD_CHUNK_BYTES: usize = 1024 * 1024;
/// Upload streams tried (each resuming the last) before giving up.
const UPLOAD_ATTEMPTS: u32 = 5;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file, read in chunks.
fn file_sha256(path: &std::path::Path) -> anyhow::Result<[u8; 32]> {
    use sha2::{Digest, Sha256};
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; UPLOAD_CHUNK_BYTES];
    loop {
        let n = file.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(hasher.finalize().into());
        }
        hasher.update(&buf[..n]);
    }
}

/// Publishes a large file as a chunked upload, resuming through any node after a failure.
async fn publish_chunked(opts: &ClientOpts, message: pb::Message, path: &std::path::Path, size: u64) -> anyhow::Result<pb::PublishResult> {
    use std::io::{Seek, SeekFrom};
    let sha256 = file_sha256(path)?;
    let mut last_error = None;
    for attempt in 1..=UPLOAD_ATTEMPTS {
        let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let upload = crate::client::Upload { message: message.clone(), total_bytes: size, sha256, chunk_bytes: UPLOAD_CHUNK_BYTES };
        let outcome = match connect(opts).await {
            Ok(mut client) => {
                client
                    .upload(upload, move |offset, len| {
                        file.seek(SeekFrom::Start(offset))?;
                        let mut buf = vec![0u8; len];
                        file.read_exact(&mut buf)?;
                        Ok(buf.into())
                    })
                    .await
            }
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
        };
        match outcome {
            Ok(o) => {
                if o.resumed_from > 0 {
                    eprintln!("resumed the upload at byte {}", o.resumed_from);
                }
                return o.result.context("the upload ended without a result");
            }
            Err(s) if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Aborted | tonic::Code::Unknown) => {
                eprintln!("upload attempt {attempt} of {UPLOAD_ATTEMPTS} failed ({}); resuming", s.message());
                last_error = Some(s);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(s) => return Err(status_error(s)),
        }
    }
    Err(status_error(last_error.unwrap_or_else(|| tonic::Status::unavailable("no attempt made"))))
}

pub async fn publish(opts: &ClientOpts, args: PublishArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.file {
        let size = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
        if size > INLINE_PAYLOAD_MAX && args.seal {
            return publish_sealed_file(opts, &args, path).await;
        }
        if size > INLINE_PAYLOAD_MAX {
            let message = message_of(&args, Vec::new())?;
            let r = publish_chunked(opts, message, path, size).await?;
            print_published(opts, &args.to, &r);
            return Ok(());
        }
    }
    let payload = read_payload(args.data.as_deref(), args.file.as_deref())?;
    let mut client = connect(opts).await?;
    let payload = if args.seal { client.seal_for(&args.to, &payload).await.map_err(status_error)? } else { payload };
    let message = message_of(&args, payload)?;
    let response = client.publish(vec![message.clone()]).await.map_err(status_error)?;
    for r in &response.results {
        if let Some(path) = &args.receipt {
            write_receipt(path, &message, r)?;
        }
        print_published(opts, &args.to, r);
    }
    Ok(())
}

/// A payload given inline, else read from a file, else from standard input.
pub(crate) fn read_payload(data: Option<&str>, file: Option<&std::path::Path>) -> anyhow::Result<Vec<u8>> {
    match (data, file) {
        (Some(data), _) => Ok(data.as_bytes().to_vec()),
        (None, Some(path)) => std::fs::read(path).with_context(|| format!("reading {}", path.display())),
        (None, None) => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf).context("reading standard input")?;
            Ok(buf)
        }
    }
}

/// Seals a large file into a temporary file (mode 0600, removed afterwards) and uploads it in chunks.
async fn publish_sealed_file(opts: &ClientOpts, args: &PublishArgs, path: &std::path::Path) -> anyhow::Result<()> {
    let plaintext = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let sealed = connect(opts).await?.seal_for(&args.to, &plaintext).await.map_err(status_error)?;
    drop(plaintext);
    let temp = std::env::temp_dir().join(format!("kerwen-sealed-{}", random_id()));
    crate::pki::write_file(&temp, &sealed, 0o600)?;
    let message = message_of(args, Vec::new())?;
    let result = publish_chunked(opts, message, &temp, sealed.len() as u64).await;
    let _ = std::fs::remove_file(&temp);
    print_published(opts, &args.to, &result?);
    Ok(())
}

/// Saves a published message's facts and receipt as `kerwen evidence verify` reads them.
fn write_receipt(path: &std::path::Path, sent: &pb::Message, result: &pb::PublishResult) -> anyhow::Result<()> {
    let receipt = result.receipt.as_ref().context("the cluster returned no receipt (is it run with --no-evidence?)")?;
    let file = kerwen_broker::evidence::ArchivedMessage {
        facts: crate::receipts::publish_facts(sent, result)?,
        receipt: crate::receipts::from_proto(receipt)?,
        delivery: None,
    };
    // Compact: with no insignificant whitespace, any changed byte changes what is verified.
    std::fs::write(path, serde_json::to_vec(&file)?).with_context(|| format!("writing {}", path.display()))
}

fn message_of(args: &PublishArgs, payload: Vec<u8>) -> anyhow::Result<pb::Message> {
    let mut headers = HashMap::new();
    for h in &args.headers {
        let (k, v) = h.split_once('=').with_context(|| format!("header {h:?} is not NAME=VALUE"))?;
        headers.insert(k.to_owned(), v.to_owned());
    }
    Ok(pb::Message {
        id: args.id.clone().unwrap_or_else(random_id),
        recipient: args.to.clone(),
        headers,
        payload: payload.into(),
        ordering_key: args.key.clone(),
        ttl_ms: args.ttl_ms,
        sender: String::new(),
    })
}

fn print_published(opts: &ClientOpts, to: &str, r: &pb::PublishResult) {
    let pos = r.position.unwrap_or_default();
    if opts.json {
        println!(
            "{}",
            json!({"id": r.id, "partition": pos.partition, "sequence": pos.sequence, "shard": r.shard, "commit_index": r.commit_index})
        );
    } else {
        println!("published {} to {} (partition {}, sequence {})", r.id, to, pos.partition, pos.sequence);
    }
}

pub async fn download(opts: &ClientOpts, args: DownloadArgs) -> anyhow::Result<()> {
    let position = parse_position(&args.position)?;
    let mut client = connect(opts).await?;
    let (bytes, start, digest) = download_to(&mut client, &args.from, position, &args.out).await?;
    if opts.json {
        println!("{}", json!({"file": args.out, "bytes": bytes, "resumed_from": start, "sha256": hex(&digest)}));
    } else {
        println!("wrote {} bytes to {} (sha256 {})", bytes, args.out.display(), hex(&digest));
    }
    Ok(())
}

/// Appends a chunked payload to `out` from its current length on; returns the final length,
/// where it started and the whole file's SHA-256.
async fn download_to(client: &mut Client, mailbox: &str, position: pb::Position, out: &std::path::Path) -> anyhow::Result<(u64, u64, [u8; 32])> {
    use std::io::Write;
    let mut file =
        std::fs::OpenOptions::new().create(true).append(true).open(out).with_context(|| format!("opening {}", out.display()))?;
    let start = file.metadata()?.len();
    let mut stream = client.download(mailbox, position, start).await.map_err(status_error)?;
    let mut offset = start;
    while let Some(chunk) = stream.message().await.map_err(status_error)? {
        if chunk.offset != offset {
            bail!("the server sent bytes from {}, expected {offset}", chunk.offset);
        }
        file.write_all(&chunk.data).with_context(|| format!("writing {}", out.display()))?;
        offset += chunk.data.len() as u64;
    }
    file.sync_all()?;
    // Hash the whole file (a resumed download's earlier bytes included).
    Ok((offset, start, file_sha256(out)?))
}

/// Saves a delivery's chunked payload under `dir` and checks it against its SHA-256.
async fn save_large(client: &mut Client, dir: &std::path::Path, d: &pb::Delivery) -> anyhow::Result<()> {
    let (Some(large), Some(m), Some(position)) = (&d.large_payload, &d.message, d.position) else { return Ok(()) };
    let name: String = m.id.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.=+,()".contains(c) { c } else { '_' }).collect();
    let path = dir.join(name);
    let (bytes, _, digest) = download_to(client, &m.recipient, position, &path).await?;
    if digest[..] != large.sha256[..] {
        bail!("{} ({bytes} bytes) does not match the message's sha256 {}; not acked", path.display(), hex(&large.sha256));
    }
    eprintln!("saved {} ({bytes} bytes, sha256 verified)", path.display());
    Ok(())
}

/// What became of a sealed payload on delivery.
pub(crate) enum Unsealed {
    Opened { key_id: String },
    Closed { reason: String },
}

/// Opens a sealed inline payload in place when the key store holds the recipient's key.
pub(crate) fn unseal(store: Result<&crate::sealed::KeyStore, &anyhow::Error>, d: &mut pb::Delivery) -> Option<Unsealed> {
    let m = d.message.as_mut()?;
    if !crate::sealed::is_sealed(&m.payload) {
        return None;
    }
    let store = match store {
        Ok(store) => store,
        Err(e) => return Some(Unsealed::Closed { reason: format!("{e:#}") }),
    };
    Some(match store.open(&m.recipient, &m.payload) {
        Ok(opened) => {
            m.payload = opened.plaintext.into();
            Unsealed::Opened { key_id: opened.key_id }
        }
        Err(e) => Unsealed::Closed { reason: e.to_string() },
    })
}

pub(crate) fn print_delivery(json_output: bool, d: &pb::Delivery, sealed: Option<&Unsealed>) {
    let m = d.message.clone().unwrap_or_default();
    let pos = d.position.unwrap_or_default();
    let text = std::str::from_utf8(&m.payload).ok();
    if json_output {
        let mut v = json!({
            "id": m.id,
            "recipient": m.recipient,
            "sender": m.sender,
            "partition": pos.partition,
            "sequence": pos.sequence,
            "attempt": d.attempt,
            "headers": m.headers,
            "payload_len": m.payload.len(),
        });
        if let Some(l) = &d.large_payload {
            v["large_payload"] = json!({"total_bytes": l.total_bytes, "sha256": hex(&l.sha256)});
        }
        if let Some(dl) = &d.dead_letter {
            v["dead_letter"] = dead_letter_json(dl);
        }
        match sealed {
            Some(Unsealed::Opened { key_id }) => v["sealed"] = json!({"opened": true, "key_id": key_id}),
            Some(Unsealed::Closed { reason }) => v["sealed"] = json!({"opened": false, "reason": reason}),
            None => {}
        }
        match text {
            Some(t) => v["payload_utf8"] = json!(t),
            None => v["payload_hex"] = json!(hex(&m.payload)),
        }
        println!("{v}");
    } else {
        let body = match &d.large_payload {
            Some(l) => format!(
                "<{} bytes, sha256 {}: kerwen download --from {} --position {}:{} --out FILE>",
                l.total_bytes,
                hex(&l.sha256),
                m.recipient,
                partition_name(pos.partition),
                pos.sequence
            ),
            None => match sealed {
                Some(Unsealed::Closed { reason }) => format!("<{} bytes sealed: {reason}>", m.payload.len()),
                _ => text.map(|t| t.trim_end().to_owned()).unwrap_or_else(|| format!("<{} bytes of binary>", m.payload.len())),
            },
        };
        let body = match sealed {
            Some(Unsealed::Opened { key_id }) => format!("(sealed, key {key_id}) {body}"),
            _ => body,
        };
        let reason = d.dead_letter.as_ref().map(|dl| format!(" dead letter: {}", dl.reason)).unwrap_or_default();
        let sender = if m.sender.is_empty() { String::new() } else { format!(" from {}", m.sender) };
        println!(
            "[partition {} seq {} attempt {}{reason}] {}{sender}: {}",
            partition_name(pos.partition),
            pos.sequence,
            d.attempt,
            m.id,
            body
        );
    }
}

pub async fn consume(opts: &ClientOpts, args: ConsumeArgs) -> anyhow::Result<()> {
    if args.count == Some(0) {
        bail!("--count must be at least 1");
    }
    let credits = args.count.unwrap_or(256).min(256) as u32;
    // Needed only if a sealed payload arrives; a missing store is reported then.
    let keys = opts.key_store();
    let mut client = connect(opts).await?;
    let mut sub = client.subscribe_to(&args.from, credits, args.dead_letters).await.map_err(status_error)?;
    let idle = args.timeout_secs.map(Duration::from_secs).unwrap_or(Duration::from_secs(u64::MAX / 4));
    let mut received = 0u64;
    let mut acks_sent = 0u64;
    loop {
        if args.count.is_some_and(|c| received >= c) {
            break;
        }
        let event = tokio::select! {
            e = sub.next_event(idle) => e,
            _ = tokio::signal::ctrl_c() => break,
        };
        match event {
            Ok(Some(Event::Delivery(mut d))) => {
                received += 1;
                let sealed = unseal(keys.as_ref(), &mut d);
                // Continues the message's trace when this process exports traces.
                let span = tracing::info_span!(
                    "process",
                    otel.name = crate::telemetry::operation_name("process", &args.from).as_ref(),
                    otel.kind = "consumer",
                    messaging.system = crate::telemetry::MESSAGING_SYSTEM,
                    messaging.operation.type = "process",
                    messaging.operation.name = "process",
                    messaging.destination.name = args.from.as_str(),
                    messaging.message.id = d.message.as_ref().map_or("", |m| m.id.as_str()),
                );
                crate::telemetry::set_parent(&span, || d.traceparent.as_deref().and_then(|tp| crate::telemetry::from_traceparent(tp, None)));
                async {
                    print_delivery(opts.json, &d, sealed.as_ref());
                    if let Some(dir) = &args.save_dir {
                        save_large(&mut client, dir, &d).await?;
                    }
                    if !args.no_ack {
                        if let Some(pos) = d.position {
                            sub.ack(vec![pos]).await.map_err(status_error)?;
                            acks_sent += 1;
                        }
                    }
                    if args.count.is_none() || args.count.is_some_and(|c| received + u64::from(credits) <= c) {
                        sub.credit(1).await.map_err(status_error)?;
                    }
                    anyhow::Ok(())
                }
                .instrument(span)
                .await?;
            }
            Ok(Some(Event::Acked(_))) => {}
            Ok(None) => bail!("the server closed the subscription"),
            Err(s) if s.code() == tonic::Code::DeadlineExceeded => break,
            Err(s) => return Err(status_error(s)),
        }
    }
    // Only report success once the acks are committed: the messages are gone for good.
    sub.wait_acked(acks_sent, Duration::from_secs(30)).await.map_err(status_error)?;
    if !opts.json {
        eprintln!("{received} message(s) received, {acks_sent} acked");
    }
    Ok(())
}

/// Dead-letter partitions have the top bit set; people read them as `dlq:N`.
fn partition_name(partition: u32) -> String {
    if is_dead_letter(partition) {
        format!("dlq:{}", partition & !DEAD_LETTER_BIT)
    } else {
        partition.to_string()
    }
}

fn dead_letter_json(dl: &pb::DeadLetterInfo) -> serde_json::Value {
    let from = dl.from.unwrap_or_default();
    let history: Vec<_> = dl
        .history
        .iter()
        .map(|a| json!({"consumer": a.consumer, "leased_unix_ms": a.leased_unix_ms, "outcome": a.outcome, "ended_unix_ms": a.ended_unix_ms}))
        .collect();
    json!({
        "reason": dl.reason,
        "from_partition": from.partition,
        "from_sequence": from.sequence,
        "dead_lettered_unix_ms": dl.dead_lettered_unix_ms,
        "attempts": dl.attempts,
        "history": history,
    })
}

/// Parses PARTITION:SEQUENCE; the partition may be written `dlq:N` as `dlq list` prints it.
fn parse_position(text: &str) -> anyhow::Result<pb::Position> {
    let (partition, sequence) = text.rsplit_once(':').with_context(|| format!("position {text:?} is not PARTITION:SEQUENCE"))?;
    let partition = match partition.strip_prefix("dlq:") {
        Some(p) => p.parse::<u32>().map(dead_letter_partition),
        None => partition.parse::<u32>(),
    }
    .with_context(|| format!("bad partition in {text:?}"))?;
    let sequence = sequence.parse::<u64>().with_context(|| format!("bad sequence in {text:?}"))?;
    Ok(pb::Position { partition, sequence })
}

pub async fn dlq(opts: &ClientOpts, cmd: DlqCommand) -> anyhow::Result<()> {
    let mut client = connect(opts).await?;
    match cmd {
        DlqCommand::List { mailbox, limit } => {
            let list = client.list_dead_letters(&mailbox, limit).await.map_err(status_error)?;
            if opts.json {
                let entries: Vec<_> = list
                    .iter()
                    .map(|d| {
                        let pos = d.position.unwrap_or_default();
                        json!({
                            "position": format!("{}:{}", partition_name(pos.partition), pos.sequence),
                            "id": d.id,
                            "payload_bytes": d.payload_bytes,
                            "ordering_key": d.ordering_key,
                            "accepted_unix_ms": d.accepted_unix_ms,
                            "dead_letter": d.info.as_ref().map(dead_letter_json),
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(entries));
            } else if list.is_empty() {
                println!("no dead letters in {mailbox}");
            } else {
                println!("{:<16} {:<40} {:<13} {:>8} {:>10}", "POSITION", "ID", "REASON", "ATTEMPTS", "BYTES");
                for d in list {
                    let pos = d.position.unwrap_or_default();
                    let info = d.info.unwrap_or_default();
                    let position = format!("{}:{}", partition_name(pos.partition), pos.sequence);
                    println!("{:<16} {:<40} {:<13} {:>8} {:>10}", position, d.id, info.reason, info.attempts, d.payload_bytes);
                }
            }
        }
        DlqCommand::Redrive { mailbox, positions, all } => {
            let positions = positions.iter().map(|p| parse_position(p)).collect::<anyhow::Result<Vec<_>>>()?;
            let moved = client.redrive(&mailbox, positions, all).await.map_err(status_error)?;
            if opts.json {
                println!("{}", json!({"redriven": moved}));
            } else {
                println!("redrove {moved} message(s) into {mailbox}");
            }
        }
    }
    Ok(())
}

pub async fn status(opts: &ClientOpts) -> anyhow::Result<()> {
    let mut client = connect(opts).await?;
    let s = client.cluster_status().await.map_err(status_error)?;
    if opts.json {
        let groups: Vec<_> = s
            .groups
            .iter()
            .map(|g| {
                json!({"group": g.group, "leader": g.leader, "term": g.term, "last_log_index": g.last_log_index,
                       "last_applied_index": g.last_applied_index, "voters": g.voters, "local_role": g.local_role})
            })
            .collect();
        let nodes: Vec<_> = s
            .nodes
            .iter()
            .map(|n| {
                json!({"id": n.id, "address": n.address, "client_address": n.client_address, "state": n.state, "zone": n.zone, "replicas": n.replicas,
                       "leaders": n.leaders, "reachable": n.reachable})
            })
            .collect();
        let replicas: Vec<_> = s
            .replicas
            .iter()
            .map(|g| json!({"group": g.group, "leader": g.leader, "voters": g.voters, "learners": g.learners, "lag": g.lag}))
            .collect();
        println!(
            "{}",
            json!({"answered_by": s.node_id, "nodes": nodes, "groups": groups, "replicas": replicas, "moves": s.moves})
        );
        return Ok(());
    }
    println!("answered by node {} ({})", s.node_id, client.endpoint());
    node::print_nodes(&s);
    println!("{:<10} {:>7} {:>6} {:>10} {:>10} {:<10} VOTERS", "GROUP", "LEADER", "TERM", "LAST LOG", "APPLIED", "THIS NODE");
    for g in &s.groups {
        let name = if g.group == 0 { "metadata".to_owned() } else { format!("shard {}", g.group) };
        // Members as the group's leader reports them (this node may host no replica).
        let members = s.replicas.iter().find(|r| r.group == g.group);
        let leader = members.map(|r| r.leader).or(g.leader).map(|l| l.to_string()).unwrap_or_else(|| "-".into());
        let voters = members.map_or(&g.voters, |r| &r.voters);
        let learners = members.filter(|r| !r.learners.is_empty()).map(|r| format!(" learners {:?}", r.learners)).unwrap_or_default();
        let lagging: Vec<String> = members.map(|r| r.lag.iter().filter(|(_, l)| **l > 0).map(|(n, l)| format!("{n}:-{l}")).collect()).unwrap_or_default();
        let learners = if lagging.is_empty() { learners } else { format!("{learners} lag {}", lagging.join(" ")) };
        println!(
            "{:<10} {:>7} {:>6} {:>10} {:>10} {:<10} {:?}{}",
            name, leader, g.term, g.last_log_index, g.last_applied_index, g.local_role, voters, learners
        );
    }
    Ok(())
}
