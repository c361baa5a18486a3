//! Exchange topologies: the members, information systems, services, grants and sealing keys of
//! a data exchange, as the `[topology]` table of a scenario file (the load generator reads the
//! same file's `[[flow]]`s), and how to put one on a running cluster.
//!
//! `kerwen scenario apply FILE` and `kerwen dev --scenario NAME` use [`apply`] and
//! [`ensure_sealing_key`]; both are idempotent, so applying a topology twice, or to a cluster
//! that already holds part of it, changes only what is missing. Grants are only ever added:
//! a topology says who may send, and revoking is left to the operator (`kerwen acl revoke`).
//!
//! The built-in scenario [`SMEV`] (`loadtest/scenarios/smev.toml`) is compiled in, so
//! `kerwen dev --scenario smev` works from any directory.

use std::collections::BTreeSet;

use anyhow::Context;
use kerwen_broker::ids::{IdError, ServiceId, SubsystemId};
use kerwen_proto::v1::EncryptionKey;
use serde::Deserialize;
use tonic::Code;

use crate::client::{current_encryption_key, Client};
use crate::sealed::KeyStore;

/// The SMEV scenario: 10 ministries, 12 information systems, their flows.
pub const SMEV: &str = include_str!("../../loadtest/scenarios/smev.toml");

/// The scenario files built into the binary, by name.
pub const BUILT_IN: &[(&str, &str)] = &[("smev", SMEV)];

/// Who takes part in an exchange and who may send to whom.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// Members (organisations, X-Road's `INSTANCE/CLASS/MEMBER`), for the record: the cluster
    /// registers subsystems, and every system must belong to a listed member.
    #[serde(default, rename = "member")]
    pub members: Vec<MemberSpec>,
    /// Information systems (subsystems), each with the services it offers.
    #[serde(default, rename = "system")]
    pub systems: Vec<SystemSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberSpec {
    /// `INSTANCE/CLASS/MEMBER`, e.g. `TM/GOV/MINJUST`.
    pub id: String,
    pub name: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemSpec {
    /// `INSTANCE/CLASS/MEMBER/SUBSYSTEM`.
    pub id: String,
    pub name: String,
    /// Publishes an encryption key, so that senders seal payloads to it.
    #[serde(default)]
    pub sealed: bool,
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// The service's name within its system (the mailbox is `SYSTEM/NAME`).
    pub name: String,
    /// Partitions of its mailbox; 0 = the cluster's default.
    #[serde(default)]
    pub partitions: u32,
    /// Systems granted `send` (besides the owner, who always may).
    #[serde(default)]
    pub senders: Vec<String>,
}

/// A topology that cannot be applied as written.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("the scenario does not parse: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("the scenario has no [topology] with at least one [[topology.system]]")]
    Empty,
    #[error("{what} {id:?}: {source}")]
    BadId { what: &'static str, id: String, source: IdError },
    #[error("member {0:?} is not INSTANCE/CLASS/MEMBER")]
    BadMember(String),
    #[error("{what} {id} is listed twice")]
    Duplicate { what: &'static str, id: String },
    #[error("system {system} belongs to member {member}, which is not listed under [[topology.member]]")]
    UnknownMember { system: String, member: String },
    #[error("service {service} names sender {sender}, which is not a system of the topology")]
    UnknownSender { service: String, sender: String },
    #[error("service {service} cannot have more than 256 partitions")]
    TooManyPartitions { service: String },
}

/// The part of a scenario file this module reads; the rest belongs to the load generator.
#[derive(Deserialize)]
struct ScenarioFile {
    topology: Option<Topology>,
}

/// A service of the topology with its owner and grants.
#[derive(Debug, Clone)]
pub struct ServiceEntry<'a> {
    pub id: String,
    pub owner: &'a SystemSpec,
    pub spec: &'a ServiceSpec,
}

impl Topology {
    /// The validated topology of a scenario file's text.
    pub fn from_scenario(text: &str) -> Result<Topology, TopologyError> {
        let file: ScenarioFile = toml::from_str(text)?;
        let topology = file.topology.ok_or(TopologyError::Empty)?;
        topology.validate()?;
        Ok(topology)
    }

    /// A built-in scenario by name, or else a scenario file at that path.
    pub fn load(name_or_path: &str) -> anyhow::Result<Topology> {
        let text = match BUILT_IN.iter().find(|(name, _)| *name == name_or_path) {
            Some((_, text)) => (*text).to_owned(),
            None => std::fs::read_to_string(name_or_path).with_context(|| {
                let names: Vec<&str> = BUILT_IN.iter().map(|(n, _)| *n).collect();
                format!("reading scenario {name_or_path} (not a file, nor a built-in scenario: {})", names.join(", "))
            })?,
        };
        Topology::from_scenario(&text).with_context(|| format!("scenario {name_or_path}"))
    }

    /// Checks every id, that systems belong to listed members, and that grants name systems.
    pub fn validate(&self) -> Result<(), TopologyError> {
        if self.systems.is_empty() {
            return Err(TopologyError::Empty);
        }
        let mut members = BTreeSet::new();
        for m in &self.members {
            // A member id is a subsystem id without its last part.
            let probe = format!("{}/x", m.id);
            if m.id.split('/').count() != 3 || probe.parse::<SubsystemId>().is_err() {
                return Err(TopologyError::BadMember(m.id.clone()));
            }
            if !members.insert(m.id.as_str()) {
                return Err(TopologyError::Duplicate { what: "member", id: m.id.clone() });
            }
        }
        let mut systems = BTreeSet::new();
        for s in &self.systems {
            let id: SubsystemId = s.id.parse().map_err(|source| TopologyError::BadId { what: "system", id: s.id.clone(), source })?;
            let member = format!("{}/{}/{}", id.instance, id.member_class, id.member_code);
            if !members.contains(member.as_str()) {
                return Err(TopologyError::UnknownMember { system: s.id.clone(), member });
            }
            if !systems.insert(s.id.as_str()) {
                return Err(TopologyError::Duplicate { what: "system", id: s.id.clone() });
            }
        }
        let mut services = BTreeSet::new();
        for entry in self.services() {
            entry.id.parse::<ServiceId>().map_err(|source| TopologyError::BadId { what: "service", id: entry.id.clone(), source })?;
            if entry.spec.partitions > 256 {
                return Err(TopologyError::TooManyPartitions { service: entry.id.clone() });
            }
            if let Some(sender) = entry.spec.senders.iter().find(|s| !systems.contains(s.as_str())) {
                return Err(TopologyError::UnknownSender { service: entry.id.clone(), sender: sender.clone() });
            }
            if !services.insert(entry.id.clone()) {
                return Err(TopologyError::Duplicate { what: "service", id: entry.id });
            }
        }
        Ok(())
    }

    /// Every service of every system.
    pub fn services(&self) -> impl Iterator<Item = ServiceEntry<'_>> + '_ {
        self.systems
            .iter()
            .flat_map(|owner| owner.services.iter().map(move |spec| ServiceEntry { id: format!("{}/{}", owner.id, spec.name), owner, spec }))
    }

    pub fn system(&self, id: &str) -> Option<&SystemSpec> {
        self.systems.iter().find(|s| s.id == id)
    }

    pub fn service(&self, id: &str) -> Option<ServiceEntry<'_>> {
        self.services().find(|e| e.id == id)
    }

    /// Whether `sender` may send to `service` under this topology: it owns it or is granted.
    pub fn may_send(&self, sender: &str, service: &str) -> bool {
        self.service(service).is_some_and(|e| e.owner.id == sender || e.spec.senders.iter().any(|s| s == sender))
    }

}

/// What [`apply`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub systems_registered: usize,
    pub mailboxes_created: usize,
    pub grants_added: usize,
}

/// Registers the topology's systems, creates their mailboxes and adds its grants, through an
/// administrator's connection. What already exists is left as it is.
pub async fn apply(admin: &mut Client, topology: &Topology) -> anyhow::Result<Applied> {
    let mut applied = Applied::default();
    for system in &topology.systems {
        match admin.add_member(&system.id, None).await {
            Ok(_) => applied.systems_registered += 1,
            Err(s) if s.code() == Code::AlreadyExists => {}
            Err(s) => anyhow::bail!("registering {}: {} ({:?})", system.id, s.message(), s.code()),
        }
    }
    for entry in topology.services() {
        match admin.create_mailbox(&entry.id, entry.spec.partitions).await {
            Ok(_) => applied.mailboxes_created += 1,
            Err(s) if s.code() == Code::AlreadyExists => {}
            Err(s) => anyhow::bail!("creating mailbox {}: {} ({:?})", entry.id, s.message(), s.code()),
        }
        for sender in &entry.spec.senders {
            let changed = admin
                .grant(&entry.id, sender)
                .await
                .map_err(|s| anyhow::anyhow!("granting {sender} send on {}: {} ({:?})", entry.id, s.message(), s.code()))?;
            applied.grants_added += usize::from(changed);
        }
    }
    Ok(applied)
}

/// Makes sure the current encryption key of `subsystem` (the identity `client` connects as),
/// the one senders seal to, has its private half in `store`; generates and registers a new
/// current key when not. Returns the current key and whether it is new.
pub async fn ensure_sealing_key(client: &mut Client, store: &mut KeyStore, subsystem: &str) -> anyhow::Result<(EncryptionKey, bool)> {
    let registered = client.encryption_keys(subsystem).await.map_err(|s| anyhow::anyhow!("listing {subsystem}'s keys: {}", s.message()))?;
    if let Some(current) = current_encryption_key(&registered) {
        if store.keys(subsystem).any(|local| local.key_id == current.key_id) {
            return Ok((current.clone(), false));
        }
    }
    Ok((client.generate_encryption_key(store, subsystem, None).await?, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_smev_scenario_has_ten_members_and_twelve_systems() {
        let t = Topology::from_scenario(SMEV).expect("the built-in scenario is valid");
        assert_eq!(t.members.len(), 10);
        assert_eq!(t.systems.len(), 12);
        assert!(t.may_send("TM/GOV/MINLABOUR/social-benefits", "TM/GOV/MINJUST/civil-registry/birth-certificates"));
        assert!(t.may_send("TM/GOV/MINJUST/civil-registry", "TM/GOV/MINJUST/civil-registry/birth-certificates"), "owners send to themselves");
        assert!(!t.may_send("TM/GOV/MINHEALTH/health-records", "TM/GOV/MINJUST/civil-registry/birth-certificates"), "deny by default");
        // The README's walk-through quotes these numbers.
        let services: Vec<String> = t.services().map(|e| e.id).collect();
        assert_eq!(services.len(), 15);
        let t = &t;
        let ungranted = t.systems.iter().flat_map(|s| services.iter().filter(move |x| !t.may_send(&s.id, x))).count();
        assert_eq!(ungranted, 153);
    }

    #[test]
    fn topologies_that_cannot_be_applied_are_refused_with_the_reason() {
        let base = r#"
            [[topology.member]]
            id = "TM/GOV/A"
            name = "A"
            [[topology.system]]
            id = "TM/GOV/A/one"
            name = "one"
        "#;
        assert!(Topology::from_scenario(base).is_ok());
        let unknown_member = base.replace("TM/GOV/A/one", "TM/GOV/B/one");
        assert!(matches!(Topology::from_scenario(&unknown_member), Err(TopologyError::UnknownMember { .. })));
        let unknown_sender = format!("{base}\nservices = [{{ name = \"in\", senders = [\"TM/GOV/A/two\"] }}]");
        assert!(matches!(Topology::from_scenario(&unknown_sender), Err(TopologyError::UnknownSender { .. })));
        let bad_member = base.replace("id = \"TM/GOV/A\"", "id = \"TM/GOV\"");
        assert!(matches!(Topology::from_scenario(&bad_member), Err(TopologyError::BadMember(_))));
        assert!(matches!(Topology::from_scenario("name = \"x\""), Err(TopologyError::Empty)));
        let typo = base.replace("name = \"one\"", "name = \"one\"\nseald = true");
        assert!(matches!(Topology::from_scenario(&typo), Err(TopologyError::Parse(_))));
    }
}
