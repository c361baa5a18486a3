//! Trust commands: `member`, `acl`, `group`, the discovery commands (`services`,
//! `allowed-services`, `whoami`), `certs issue` and `evidence keys`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use kerwen_broker::access::Principal;
use kerwen_broker::evidence::{Archive, ArchivedMessage, EvidenceExport, KeyRing};
use kerwen_proto::v1 as pb;
use serde_json::json;

use super::{connect, print_json_or, status_error, ClientOpts};
use crate::pki::{self, CertificateAuthority};

/// A subsystem's quota flags (absent: unlimited).
#[derive(Debug, Clone, Args)]
pub struct QuotaOpts {
    /// Messages per second it may publish (per node it sends through).
    #[arg(long)]
    pub max_messages_per_sec: Option<u64>,
    /// Payload bytes per second it may publish (per node it sends through).
    #[arg(long)]
    pub max_bytes_per_sec: Option<u64>,
    /// Payload bytes of its messages that may wait, unconsumed, in the cluster.
    #[arg(long)]
    pub max_stored_bytes: Option<u64>,
}

impl QuotaOpts {
    fn to_proto(&self) -> pb::Quota {
        pb::Quota {
            publish_messages_per_second: self.max_messages_per_sec,
            publish_bytes_per_second: self.max_bytes_per_sec,
            max_stored_bytes: self.max_stored_bytes,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum MemberCommand {
    /// Register a subsystem: INSTANCE/CLASS/MEMBER/SUBSYSTEM (admins).
    Add {
        subsystem: String,
        #[command(flatten)]
        quota: QuotaOpts,
    },
    /// Replace a subsystem's quota (admins; absent limits become unlimited).
    Quota {
        subsystem: String,
        #[command(flatten)]
        quota: QuotaOpts,
    },
    /// List registered subsystems.
    List,
}

#[derive(Debug, Subcommand)]
pub enum AclCommand {
    /// Let a subsystem or `group:NAME` send to a service (its owner or admins).
    Grant {
        service: String,
        #[arg(long = "to")]
        grantee: String,
    },
    /// Withdraw a grant.
    Revoke {
        service: String,
        #[arg(long = "from")]
        grantee: String,
    },
    /// List the grants of a service (every grant, for admins, without one).
    List { service: Option<String> },
}

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Add a registered subsystem to a group, creating the group (admins).
    Add { group: String, subsystem: String },
    /// Remove a subsystem from a group (admins).
    Remove { group: String, subsystem: String },
    /// List groups and their subsystems.
    List,
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Issue a certificate from the CA in a PKI directory (`ca.pem`, `ca.key`).
    Issue(IssueArgs),
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    /// A client subsystem: INSTANCE/CLASS/MEMBER/SUBSYSTEM.
    #[arg(long, conflicts_with_all = ["admin", "node"], required_unless_present_any = ["admin", "node"])]
    pub subsystem: Option<String>,
    /// An administrator's name (A-Za-z0-9._-).
    #[arg(long, conflicts_with = "node")]
    pub admin: Option<String>,
    /// A node id; give its host names and addresses with --host.
    #[arg(long)]
    pub node: Option<u64>,
    /// DNS name or IP address a node certificate is valid for (repeatable).
    #[arg(long = "host")]
    pub hosts: Vec<String>,
    /// PKI directory with the CA [default: the profile's pki_dir].
    #[arg(long)]
    pub pki_dir: Option<PathBuf>,
    /// Where to write NAME.pem and NAME.key [default: PKI_DIR/clients].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Validity in days.
    #[arg(long, default_value_t = 365)]
    pub days: u64,
}

fn member_json(m: &pb::Member) -> serde_json::Value {
    let q = m.quota.clone().unwrap_or_default();
    json!({"subsystem": m.subsystem, "registered_unix_ms": m.registered_unix_ms,
           "quota": {"max_messages_per_sec": q.publish_messages_per_second, "max_bytes_per_sec": q.publish_bytes_per_second,
                     "max_stored_bytes": q.max_stored_bytes}})
}

fn limit(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

pub async fn member(opts: &ClientOpts, cmd: MemberCommand) -> anyhow::Result<()> {
    let client = connect(opts).await?;
    let mut access = client.access();
    match cmd {
        MemberCommand::Add { subsystem, quota } => {
            let req = pb::AddMemberRequest { subsystem, quota: Some(quota.to_proto()) };
            let m = access.add_member(req).await.map_err(status_error)?.into_inner();
            print_json_or(opts, member_json(&m), || println!("registered {}", m.subsystem));
        }
        MemberCommand::Quota { subsystem, quota } => {
            let req = pb::SetQuotaRequest { subsystem, quota: Some(quota.to_proto()) };
            let m = access.set_quota(req).await.map_err(status_error)?.into_inner();
            print_json_or(opts, member_json(&m), || println!("quota of {} set", m.subsystem));
        }
        MemberCommand::List => {
            let members = access.list_members(pb::ListMembersRequest {}).await.map_err(status_error)?.into_inner().members;
            print_json_or(opts, json!(members.iter().map(member_json).collect::<Vec<_>>()), || {
                println!("{:<48} {:>12} {:>14} {:>16}", "SUBSYSTEM", "MSG/S", "BYTES/S", "STORED BYTES");
                for m in &members {
                    let q = m.quota.clone().unwrap_or_default();
                    println!(
                        "{:<48} {:>12} {:>14} {:>16}",
                        m.subsystem,
                        limit(q.publish_messages_per_second),
                        limit(q.publish_bytes_per_second),
                        limit(q.max_stored_bytes)
                    );
                }
            });
        }
    }
    Ok(())
}

pub async fn acl(opts: &ClientOpts, cmd: AclCommand) -> anyhow::Result<()> {
    let client = connect(opts).await?;
    let mut access = client.access();
    match cmd {
        AclCommand::Grant { service, grantee } => {
            let req = pb::GrantRequest { service: service.clone(), grantee: grantee.clone() };
            let changed = access.grant(req).await.map_err(status_error)?.into_inner().changed;
            print_json_or(opts, json!({"service": service, "grantee": grantee, "changed": changed}), || {
                println!("{grantee} may send to {service}{}", if changed { "" } else { " (already granted)" })
            });
        }
        AclCommand::Revoke { service, grantee } => {
            let req = pb::GrantRequest { service: service.clone(), grantee: grantee.clone() };
            let changed = access.revoke(req).await.map_err(status_error)?.into_inner().changed;
            print_json_or(opts, json!({"service": service, "grantee": grantee, "changed": changed}), || {
                println!("{grantee} may no longer send to {service}{}", if changed { "" } else { " (had no grant)" })
            });
        }
        AclCommand::List { service } => {
            let req = pb::ListGrantsRequest { service: service.unwrap_or_default() };
            let grants = access.list_grants(req).await.map_err(status_error)?.into_inner().grants;
            let rows: Vec<_> = grants.iter().map(|g| json!({"service": g.service, "grantee": g.grantee})).collect();
            print_json_or(opts, json!(rows), || {
                for g in &grants {
                    println!("{}  <-  {}", g.service, g.grantee);
                }
            });
        }
    }
    Ok(())
}

pub async fn group(opts: &ClientOpts, cmd: GroupCommand) -> anyhow::Result<()> {
    let client = connect(opts).await?;
    let mut access = client.access();
    match cmd {
        GroupCommand::Add { group, subsystem } => {
            let changed = access.add_to_group(pb::GroupRequest { group: group.clone(), subsystem: subsystem.clone() }).await;
            let changed = changed.map_err(status_error)?.into_inner().changed;
            print_json_or(opts, json!({"group": group, "subsystem": subsystem, "changed": changed}), || {
                println!("{subsystem} is in group {group}")
            });
        }
        GroupCommand::Remove { group, subsystem } => {
            let changed = access.remove_from_group(pb::GroupRequest { group: group.clone(), subsystem: subsystem.clone() }).await;
            let changed = changed.map_err(status_error)?.into_inner().changed;
            print_json_or(opts, json!({"group": group, "subsystem": subsystem, "changed": changed}), || {
                println!("{subsystem} is not in group {group}")
            });
        }
        GroupCommand::List => {
            let groups = access.list_groups(pb::ListGroupsRequest {}).await.map_err(status_error)?.into_inner().groups;
            let rows: Vec<_> = groups.iter().map(|g| json!({"group": g.group, "subsystems": g.subsystems})).collect();
            print_json_or(opts, json!(rows), || {
                for g in &groups {
                    println!("{}: {}", g.group, g.subsystems.join(", "));
                }
            });
        }
    }
    Ok(())
}

/// `kerwen services SUBSYSTEM`: the services a subsystem offers.
pub async fn services(opts: &ClientOpts, subsystem: String) -> anyhow::Result<()> {
    let client = connect(opts).await?;
    let services = client.access().list_services(pb::ListServicesRequest { subsystem }).await.map_err(status_error)?;
    print_lines(opts, services.into_inner().services);
    Ok(())
}

/// `kerwen allowed-services [--subsystem S]`: what the caller (or S, for admins) may send to.
pub async fn allowed_services(opts: &ClientOpts, subsystem: Option<String>) -> anyhow::Result<()> {
    let client = connect(opts).await?;
    let req = pb::AllowedServicesRequest { subsystem: subsystem.unwrap_or_default() };
    let services = client.access().allowed_services(req).await.map_err(status_error)?;
    print_lines(opts, services.into_inner().services);
    Ok(())
}

pub async fn whoami(opts: &ClientOpts) -> anyhow::Result<()> {
    let client = connect(opts).await?;
    let identity = client.access().who_am_i(pb::WhoAmIRequest {}).await.map_err(status_error)?.into_inner().identity;
    print_json_or(opts, json!({"identity": identity}), || {
        println!("{}", if identity.is_empty() { "anonymous (insecure cluster)" } else { &identity })
    });
    Ok(())
}

fn print_lines(opts: &ClientOpts, lines: Vec<String>) {
    print_json_or(opts, json!(lines), || {
        for l in &lines {
            println!("{l}");
        }
    });
}

/// `kerwen certs issue`: a certificate from a CA on disk, validated like the node validates.
pub fn certs(opts: &ClientOpts, cmd: CertsCommand) -> anyhow::Result<()> {
    let CertsCommand::Issue(args) = cmd;
    let pki_dir = match &args.pki_dir {
        Some(d) => d.clone(),
        None => {
            let path = opts.profile.clone().or_else(crate::profile::default_path).context("no profile: give --pki-dir")?;
            crate::profile::Profile::load(&path)?.pki_dir.context("the profile names no pki_dir: give --pki-dir")?
        }
    };
    let (who, stem) = match (&args.subsystem, &args.admin, args.node) {
        (Some(s), _, _) => {
            let id = s.parse().with_context(|| format!("--subsystem {s:?}"))?;
            let stem = pki::subsystem_file_stem(&id);
            (Principal::Subsystem(id), stem)
        }
        (_, Some(a), _) => (Principal::Admin(a.clone()), format!("admin-{a}")),
        (_, _, Some(n)) => (Principal::Node(n), pki::node_file_stem(n)),
        _ => bail!("give --subsystem, --admin or --node"),
    };
    if !matches!(who, Principal::Node(_)) && !args.hosts.is_empty() {
        bail!("--host is for node certificates");
    }
    let ca = CertificateAuthority::load(&pki_dir)?;
    let validity = std::time::Duration::from_secs(args.days.max(1) * 24 * 3600);
    let pair = ca.issue_for(&who, &args.hosts, validity)?;
    let out = args.out.clone().unwrap_or_else(|| pki_dir.join(pki::CLIENTS_DIR));
    let (cert, key) = pair.write(&out, &stem)?;
    print_json_or(opts, json!({"identity": who.uri(), "cert": cert, "key": key}), || {
        println!("issued {} ({})\n  cert {}\n  key  {}", who, who.uri(), cert.display(), key.display())
    });
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum EvidenceCommand {
    /// Every evidence signing key the cluster has published, current and retired (with
    /// `--json`: the key ring an offline verifier takes).
    Keys,
    /// Verify a receipt (`{"facts": …, "receipt": …}`) or an archive offline: inclusion
    /// paths, signatures, key validity and the hash chain. Contacts no cluster.
    Verify {
        /// The receipt, archive or export (JSON).
        file: PathBuf,
        /// Trusted key ring (`kerwen evidence keys --json`); without it, an archive's own
        /// keys are used, which proves consistency but not who signed.
        #[arg(long)]
        keys: Option<PathBuf>,
        /// The payload the receipt stands for: its SHA-256 and size must match.
        #[arg(long)]
        payload: Option<PathBuf>,
    },
    /// Write the evidence of a mailbox's messages (facts, receipts, delivery receipts, the
    /// signed batches and public keys: no payloads) to stdout, offline-verifiable with
    /// `kerwen evidence verify`. Works after the messages were acked and purged.
    Export {
        /// The mailbox (service id).
        #[arg(long)]
        mailbox: String,
        /// Messages accepted at or after this time (Unix ms) [default: 0].
        #[arg(long, default_value_t = 0)]
        from: i64,
        /// Messages accepted at or before this time (Unix ms) [default: now].
        #[arg(long)]
        to: Option<i64>,
    },
    /// Make the node serving this call sign with a new evidence key from now on; the old key
    /// stays published (valid until now) so what it signed still verifies. Admins only.
    RotateKey,
}

pub async fn evidence(opts: &ClientOpts, cmd: EvidenceCommand) -> anyhow::Result<()> {
    match cmd {
        EvidenceCommand::Verify { file, keys, payload } => return verify_offline(opts, &file, keys.as_deref(), payload.as_deref()),
        EvidenceCommand::Export { mailbox, from, to } => return export(opts, mailbox, from, to).await,
        EvidenceCommand::RotateKey => {
            let client = connect(opts).await?;
            let r = client.admin().rotate_signing_key(pb::RotateSigningKeyRequest {}).await.map_err(status_error)?.into_inner();
            print_json_or(opts, json!({"node": r.node_id, "retired": r.retired_key_id, "new": r.new_key_id}), || {
                println!("node {}: now signing with {}; {} retired", r.node_id, r.new_key_id, r.retired_key_id)
            });
            return Ok(());
        }
        EvidenceCommand::Keys => {}
    }
    let ring = connect(opts).await?.signing_key_ring().await.map_err(status_error)?;
    print_json_or(opts, serde_json::to_value(&ring)?, || {
        println!("{:<32} {:<64} {:>15} {:>15}", "KEY ID", "PUBLIC KEY (Ed25519)", "VALID FROM", "VALID UNTIL");
        for k in ring.keys.values() {
            let until = k.valid_until_unix_ms.map_or_else(|| "-".to_owned(), |u| u.to_string());
            println!("{:<32} {:<64} {:>15} {:>15}", k.key_id, hex::encode(k.public_key), k.valid_from_unix_ms, until);
        }
    });
    Ok(())
}

/// `kerwen evidence export`: the archives of every shard, as one JSON document on stdout.
async fn export(opts: &ClientOpts, mailbox: String, from: i64, to: Option<i64>) -> anyhow::Result<()> {
    let client = connect(opts).await?;
    let to = to.unwrap_or_else(crate::runtime::now_unix_ms);
    let request = pb::ExportEvidenceRequest { mailbox: mailbox.clone(), from_unix_ms: from, to_unix_ms: to };
    let response = client.admin().export_evidence(request).await.map_err(status_error)?.into_inner();
    let archives = response
        .archives
        .iter()
        .map(|a| serde_json::from_slice::<Archive>(a))
        .collect::<Result<Vec<_>, _>>()
        .context("the cluster sent an archive that does not parse")?;
    let export = EvidenceExport { mailbox, archives };
    println!("{}", serde_json::to_string(&export)?);
    Ok(())
}

fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// `kerwen evidence verify`: exits non-zero when anything does not verify.
fn verify_offline(opts: &ClientOpts, file: &std::path::Path, keys: Option<&std::path::Path>, payload: Option<&std::path::Path>) -> anyhow::Result<()> {
    use sha2::Digest;
    let trusted: Option<KeyRing> = keys.map(read_json).transpose()?;
    let value: serde_json::Value = read_json(file)?;
    let what = if value.get("archives").is_some() {
        let export: EvidenceExport = serde_json::from_value(value).context("not a valid evidence export")?;
        if payload.is_some() {
            bail!("--payload goes with a receipt, not an export");
        }
        export.verify(trusted.as_ref()).context("the export does not verify")?;
        let messages: usize = export.archives.iter().map(|a| a.messages.len()).sum();
        let delivered: usize = export.archives.iter().flat_map(|a| &a.messages).filter(|m| m.delivery.is_some()).count();
        format!("export of {}: {} shard archives, {messages} messages, {delivered} with delivery receipts", export.mailbox, export.archives.len())
    } else if value.get("batches").is_some() {
        let archive: Archive = serde_json::from_value(value).context("not a valid archive")?;
        if payload.is_some() {
            bail!("--payload goes with a receipt, not an archive");
        }
        archive.verify(trusted.as_ref()).context("the archive does not verify")?;
        format!("archive of shard {}: batches {}..={}, {} messages", archive.shard, archive.first_batch, archive.last_batch, archive.messages.len())
    } else {
        let m: ArchivedMessage = serde_json::from_value(value).context("neither an archive nor a receipt with its facts")?;
        let keys = trusted.context("a receipt needs --keys (the trusted key ring)")?;
        m.verify(&keys).context("the receipt does not verify")?;
        if let Some(p) = payload {
            let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            let sha: [u8; 32] = sha2::Sha256::digest(&bytes).into();
            if sha != m.facts.payload_sha256 || bytes.len() as u64 != m.facts.payload_len {
                bail!("the payload is not the one the receipt stands for");
            }
        }
        format!("receipt of message {} from {} to {}", m.facts.message_id, m.facts.sender, m.facts.recipient)
    };
    let anchored = if keys.is_some() { "trusted keys" } else { "the archive's own keys (give --keys to anchor them)" };
    print_json_or(opts, json!({"verified": true, "what": what, "keys": anchored}), || println!("verified: {what}, with {anchored}"));
    Ok(())
}
