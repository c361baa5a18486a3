//! Who may do what. Callers are identified by their certificate (a [`Principal`]); the
//! metadata group keeps the member registry, the access rights on services (grants to a
//! subsystem or to a named group of subsystems) and per-subsystem quotas; [`AccessControl`]
//! decides. Pure decisions, no I/O: the node asks before it proposes or reads anything.
//!
//! Deny by default: an unregistered subsystem may do nothing, a registered one may send only
//! to its own services and to services that granted it `send`, and consume only its own
//! mailboxes. Admins manage the cluster but never send or read mail. Node identities are for
//! node-to-node traffic and may do nothing on the client API.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::evidence::{KeyRing, PublicKeyRecord};
use crate::ids::{IdError, ServiceId, SubsystemId};
use crate::model::NodeId;

/// URI SAN scheme of a client subsystem's certificate: `kerwen:TM/GOV/MINCOM/registry`.
pub const SUBSYSTEM_URI_SCHEME: &str = "kerwen:";
/// URI SAN scheme of an administrator's certificate: `kerwen-admin:alice`.
pub const ADMIN_URI_SCHEME: &str = "kerwen-admin:";
/// URI SAN scheme of a node's certificate: `kerwen-node:3`.
pub const NODE_URI_SCHEME: &str = "kerwen-node:";

/// Longest admin or group name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Principal {
    /// A cluster node (node-to-node traffic only).
    Node(NodeId),
    /// An operator of the cluster.
    Admin(String),
    /// A client subsystem of a member organisation.
    Subsystem(SubsystemId),
}

/// Why a certificate's identity was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the certificate carries no kerwen identity (a URI SAN kerwen:, kerwen-admin: or kerwen-node:)")]
    Missing,
    #[error("the certificate carries more than one kerwen identity")]
    Ambiguous,
    #[error("subsystem identity rejected: {0}")]
    Subsystem(#[from] IdError),
    #[error("name {0:?} must be 1..={MAX_NAME_LEN} characters from A-Za-z0-9._-")]
    Name(String),
    #[error("node identity {0:?} is not a node id greater than 0")]
    Node(String),
}

/// Validates an admin or group name: strict ASCII, so no look-alike spells the same name.
pub fn validate_name(name: &str) -> Result<(), IdentityError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::Name(name.to_owned()))
    }
}

impl Principal {
    /// Parses one URI SAN. `Ok(None)` for URIs of other schemes (e.g. SPIFFE ids), which a
    /// certificate may carry besides its kerwen identity.
    pub fn from_uri(uri: &str) -> Result<Option<Self>, IdentityError> {
        if let Some(rest) = uri.strip_prefix(SUBSYSTEM_URI_SCHEME) {
            return Ok(Some(Self::Subsystem(rest.parse()?)));
        }
        if let Some(rest) = uri.strip_prefix(ADMIN_URI_SCHEME) {
            validate_name(rest)?;
            return Ok(Some(Self::Admin(rest.to_owned())));
        }
        if let Some(rest) = uri.strip_prefix(NODE_URI_SCHEME) {
            // Digits only: `u64::from_str` would also take a leading `+`.
            let id = (!rest.is_empty() && rest.len() <= 20 && rest.bytes().all(|b| b.is_ascii_digit()))
                .then(|| rest.parse::<NodeId>().ok())
                .flatten()
                .filter(|id| *id > 0)
                .ok_or_else(|| IdentityError::Node(rest.to_owned()))?;
            return Ok(Some(Self::Node(id)));
        }
        Ok(None)
    }

    /// The identity of a certificate from all its URI SANs: exactly one must be a kerwen one.
    pub fn from_uris<'a>(uris: impl IntoIterator<Item = &'a str>) -> Result<Self, IdentityError> {
        let mut found = None;
        for uri in uris {
            if let Some(p) = Self::from_uri(uri)? {
                if found.replace(p).is_some() {
                    return Err(IdentityError::Ambiguous);
                }
            }
        }
        found.ok_or(IdentityError::Missing)
    }

    /// The URI SAN that carries this identity.
    pub fn uri(&self) -> String {
        match self {
            Self::Node(id) => format!("{NODE_URI_SCHEME}{id}"),
            Self::Admin(name) => format!("{ADMIN_URI_SCHEME}{name}"),
            Self::Subsystem(s) => format!("{SUBSYSTEM_URI_SCHEME}{s}"),
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Node(id) => write!(f, "node {id}"),
            Self::Admin(name) => write!(f, "admin {name}"),
            Self::Subsystem(s) => write!(f, "subsystem {s}"),
        }
    }
}

/// Who a grant is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Grantee {
    Subsystem(SubsystemId),
    /// A named group of subsystems (`group:NAME`).
    Group(String),
}

/// Prefix of a group grantee in its text form.
pub const GROUP_PREFIX: &str = "group:";

impl FromStr for Grantee {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, IdentityError> {
        match s.strip_prefix(GROUP_PREFIX) {
            Some(name) => {
                validate_name(name)?;
                Ok(Self::Group(name.to_owned()))
            }
            None => Ok(Self::Subsystem(s.parse()?)),
        }
    }
}

impl fmt::Display for Grantee {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Subsystem(s) => write!(f, "{s}"),
            Self::Group(g) => write!(f, "{GROUP_PREFIX}{g}"),
        }
    }
}

/// Per-subsystem limits on what it sends. `None` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubsystemQuota {
    /// Messages per second it may publish (enforced by each node on what it receives).
    pub publish_messages_per_second: Option<u64>,
    /// Payload bytes per second it may publish (enforced by each node on what it receives).
    pub publish_bytes_per_second: Option<u64>,
    /// Payload bytes of its messages that may wait, unconsumed, in the cluster at once.
    pub max_stored_bytes: Option<u64>,
}

/// A registered subsystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub subsystem: SubsystemId,
    pub registered_unix_ms: i64,
    pub quota: SubsystemQuota,
}

/// What a caller asks to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Publish or upload to a service's mailbox.
    Send(ServiceId),
    /// Subscribe to, download from, or list the dead letters of a mailbox.
    Consume(ServiceId),
    /// Create a mailbox, redrive its dead letters, describe it.
    ManageMailbox(ServiceId),
    /// Grant or revoke `send` on a service.
    ManageAccess(ServiceId),
    /// Register or retire a subsystem's payload encryption keys (the subsystem itself).
    ManageKeys(SubsystemId),
    /// Register members, change quotas and groups.
    Administer,
    /// Cluster status and discovery (list clients, services).
    Discover,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Send(s) => write!(f, "send to {s}"),
            Self::Consume(s) => write!(f, "consume {s}"),
            Self::ManageMailbox(s) => write!(f, "manage mailbox {s}"),
            Self::ManageAccess(s) => write!(f, "manage access to {s}"),
            Self::ManageKeys(s) => write!(f, "manage the encryption keys of {s}"),
            Self::Administer => write!(f, "administer the cluster"),
            Self::Discover => write!(f, "discover"),
        }
    }
}

/// A refused action; `Display` is what the caller and the audit log see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{principal} may not {action}: {reason}")]
pub struct Denied {
    pub principal: String,
    pub action: String,
    pub reason: String,
}

/// The replicated access-control state of the metadata group.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AccessControl {
    members: BTreeMap<SubsystemId, MemberRecord>,
    /// Service id → who may send to it.
    grants: BTreeMap<String, BTreeSet<Grantee>>,
    /// Group name → its subsystems.
    groups: BTreeMap<String, BTreeSet<SubsystemId>>,
    /// The nodes' evidence signing keys (public halves), current and retired: what a verifier
    /// needs to check receipts, kept for as long as evidence is.
    signing_keys: KeyRing,
    /// Subsystem → its payload encryption keys (X25519 public halves) by key id, current and
    /// retired: senders seal to the current one; retired ones stay listed so a recipient can
    /// tell which of its private keys opens a message sealed before the rotation.
    encryption_keys: BTreeMap<SubsystemId, KeyRing>,
}

impl AccessControl {
    /// Allows or refuses `action` for `who`.
    pub fn authorize(&self, who: &Principal, action: &Action) -> Result<(), Denied> {
        let deny = |reason: &str| Err(Denied { principal: who.to_string(), action: action.to_string(), reason: reason.to_owned() });
        match who {
            Principal::Node(_) => deny("node certificates are for node-to-node traffic only"),
            Principal::Admin(_) => match action {
                Action::Send(_) | Action::Consume(_) => deny("administrators manage the cluster but never send or read mail"),
                // A key registered by an operator could be one the operator holds the private
                // half of: sealed payloads would then be readable by whoever runs the cluster.
                Action::ManageKeys(_) => deny("only the subsystem itself may register its encryption keys"),
                _ => Ok(()),
            },
            Principal::Subsystem(s) => {
                if !self.members.contains_key(s) {
                    return deny("the subsystem is not registered (kerwen member add)");
                }
                match action {
                    Action::Send(service) => {
                        if service.subsystem == *s || self.may_send(s, &service.to_string()) {
                            Ok(())
                        } else {
                            deny("no send grant (kerwen acl grant)")
                        }
                    }
                    Action::Consume(service) | Action::ManageMailbox(service) | Action::ManageAccess(service) => {
                        if service.subsystem == *s {
                            Ok(())
                        } else {
                            deny("only the owning subsystem may do this")
                        }
                    }
                    Action::ManageKeys(owner) if owner == s => Ok(()),
                    Action::ManageKeys(_) => deny("only the subsystem itself may do this"),
                    Action::Administer => deny("only administrators may do this"),
                    Action::Discover => Ok(()),
                }
            }
        }
    }

    fn may_send(&self, who: &SubsystemId, service: &str) -> bool {
        self.grants.get(service).is_some_and(|grantees| {
            grantees.iter().any(|g| match g {
                Grantee::Subsystem(x) => x == who,
                Grantee::Group(name) => self.groups.get(name).is_some_and(|m| m.contains(who)),
            })
        })
    }

    pub fn member(&self, subsystem: &SubsystemId) -> Option<&MemberRecord> {
        self.members.get(subsystem)
    }

    pub fn members(&self) -> impl Iterator<Item = &MemberRecord> {
        self.members.values()
    }

    pub fn grants(&self, service: &str) -> impl Iterator<Item = &Grantee> {
        self.grants.get(service).into_iter().flatten()
    }

    pub fn all_grants(&self) -> impl Iterator<Item = (&String, &Grantee)> {
        self.grants.iter().flat_map(|(s, gs)| gs.iter().map(move |g| (s, g)))
    }

    pub fn groups(&self) -> &BTreeMap<String, BTreeSet<SubsystemId>> {
        &self.groups
    }

    pub fn group_exists(&self, name: &str) -> bool {
        self.groups.contains_key(name)
    }

    /// Of `services`, those `who` may send to (X-Road's `allowedMethods`).
    pub fn allowed_services<'a>(&self, who: &SubsystemId, services: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let Some(_) = self.members.get(who) else { return Vec::new() };
        services
            .into_iter()
            .filter(|s| match s.parse::<ServiceId>() {
                Ok(id) => id.subsystem == *who || self.may_send(who, s),
                Err(_) => false,
            })
            .map(str::to_owned)
            .collect()
    }

    pub fn signing_keys(&self) -> &KeyRing {
        &self.signing_keys
    }

    /// Registers a signing key; false when the same key was already registered under its id.
    /// A different key under a registered id is refused by the caller before this.
    pub fn register_signing_key(&mut self, record: PublicKeyRecord) -> bool {
        self.signing_keys.register(record)
    }

    /// Sets when a signing key stops being valid (only ever earlier); the changed record.
    pub fn retire_signing_key(&mut self, key_id: &str, valid_until_unix_ms: i64) -> Option<PublicKeyRecord> {
        self.signing_keys.retire(key_id, valid_until_unix_ms)
    }

    /// The encryption keys `subsystem` registered, current and retired, by key id.
    pub fn encryption_keys(&self, subsystem: &SubsystemId) -> impl Iterator<Item = &PublicKeyRecord> {
        self.encryption_keys.get(subsystem).into_iter().flat_map(|ring| ring.keys.values())
    }

    /// Registers a subsystem's encryption key; false when the same key was already registered
    /// under its id. A different key under a registered id is refused by the caller before this.
    pub fn register_encryption_key(&mut self, subsystem: &SubsystemId, record: PublicKeyRecord) -> bool {
        self.encryption_keys.entry(subsystem.clone()).or_default().register(record)
    }

    /// Sets when a subsystem's encryption key stops being offered to senders (only ever
    /// earlier); the changed record.
    pub fn retire_encryption_key(&mut self, subsystem: &SubsystemId, key_id: &str, valid_until_unix_ms: i64) -> Option<PublicKeyRecord> {
        self.encryption_keys.get_mut(subsystem)?.retire(key_id, valid_until_unix_ms)
    }

    pub fn put_member(&mut self, record: MemberRecord) {
        self.members.insert(record.subsystem.clone(), record);
    }

    /// Adds a grant; false when it already existed.
    pub fn grant(&mut self, service: &str, grantee: Grantee) -> bool {
        self.grants.entry(service.to_owned()).or_default().insert(grantee)
    }

    /// Removes a grant; false when there was none.
    pub fn revoke(&mut self, service: &str, grantee: &Grantee) -> bool {
        let Some(set) = self.grants.get_mut(service) else { return false };
        let removed = set.remove(grantee);
        if set.is_empty() {
            self.grants.remove(service);
        }
        removed
    }

    /// Adds a subsystem to a group (creating the group); false when it was already in it.
    pub fn add_to_group(&mut self, group: &str, subsystem: SubsystemId) -> bool {
        self.groups.entry(group.to_owned()).or_default().insert(subsystem)
    }

    /// Removes a subsystem from a group (an emptied group disappears); false when absent.
    pub fn remove_from_group(&mut self, group: &str, subsystem: &SubsystemId) -> bool {
        let Some(set) = self.groups.get_mut(group) else { return false };
        let removed = set.remove(subsystem);
        if set.is_empty() {
            self.groups.remove(group);
        }
        removed
    }
}

/// A change to the access-control state (a metadata-group command).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccessCommand {
    /// Registers a subsystem (refused if it exists).
    AddMember(MemberRecord),
    /// Replaces a registered subsystem's quota.
    SetQuota { subsystem: SubsystemId, quota: SubsystemQuota },
    /// Lets `grantee` send to `service` (whose mailbox must exist).
    Grant { service: String, grantee: Grantee },
    Revoke { service: String, grantee: Grantee },
    AddToGroup { group: String, subsystem: SubsystemId },
    RemoveFromGroup { group: String, subsystem: SubsystemId },
    /// Publishes a node's evidence signing key (public half).
    RegisterSigningKey(PublicKeyRecord),
    /// Ends a signing key's validity (it stays published for verifying what it signed).
    RetireSigningKey { key_id: String, valid_until_unix_ms: i64 },
    /// Publishes a subsystem's payload encryption key (X25519 public half) for senders to
    /// seal to (the subsystem must be registered; a key id is never reused for another key).
    RegisterEncryptionKey { subsystem: SubsystemId, key: PublicKeyRecord },
    /// Stops offering a subsystem's encryption key to senders; it stays listed.
    RetireEncryptionKey { subsystem: SubsystemId, key_id: String, valid_until_unix_ms: i64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(s: &str) -> SubsystemId {
        s.parse().unwrap()
    }

    fn svc(s: &str) -> ServiceId {
        s.parse().unwrap()
    }

    fn registered(acl: &mut AccessControl, s: &str) -> Principal {
        acl.put_member(MemberRecord { subsystem: sub(s), registered_unix_ms: 0, quota: SubsystemQuota::default() });
        Principal::Subsystem(sub(s))
    }

    #[test]
    fn parses_identities_from_uris() {
        assert_eq!(
            Principal::from_uris(["spiffe://x/y", "kerwen:TM/GOV/MINCOM/registry"]).unwrap(),
            Principal::Subsystem(sub("TM/GOV/MINCOM/registry"))
        );
        assert_eq!(Principal::from_uris(["kerwen-admin:ops.alice"]).unwrap(), Principal::Admin("ops.alice".into()));
        assert_eq!(Principal::from_uris(["kerwen-node:3"]).unwrap(), Principal::Node(3));
        assert_eq!(Principal::from_uris(["spiffe://x"]), Err(IdentityError::Missing));
        assert_eq!(Principal::from_uris(["kerwen-node:1", "kerwen-admin:a"]), Err(IdentityError::Ambiguous));
        for bad in [
            "kerwen:TM/GOV/MINCOM",
            "kerwen:TM/GOV/MINCOM/registry/extra",
            "kerwen:TM/GOV/MIN\u{0421}OM/registry",
            "kerwen:TM/GOV/MINCOM/reg%2Fistry",
            "kerwen:TM/GOV/MINCOM/reg istry",
            "kerwen-admin:",
            "kerwen-admin:a/b",
            "kerwen-admin:\u{0430}dmin",
            "kerwen-node:0",
            "kerwen-node:+3",
            "kerwen-node:3a",
        ] {
            assert!(Principal::from_uri(bad).is_err(), "{bad:?} must be rejected");
        }
        let long = format!("kerwen:TM/GOV/{}/registry", "M".repeat(65));
        assert!(Principal::from_uri(&long).is_err());
        let p = Principal::Subsystem(sub("TM/GOV/MINCOM/registry"));
        assert_eq!(Principal::from_uris([p.uri().as_str()]).unwrap(), p);
    }

    #[test]
    fn deny_by_default_and_grants() {
        let mut acl = AccessControl::default();
        let owner = registered(&mut acl, "TM/GOV/MINFIN/tax");
        let sender = registered(&mut acl, "TM/GOV/MINCOM/registry");
        let stranger = Principal::Subsystem(sub("TM/GOV/MINEDU/schools"));
        let mailbox = svc("TM/GOV/MINFIN/tax/declarations");

        assert!(acl.authorize(&owner, &Action::Send(mailbox.clone())).is_ok(), "self-send");
        assert!(acl.authorize(&owner, &Action::Consume(mailbox.clone())).is_ok());
        let denied = acl.authorize(&sender, &Action::Send(mailbox.clone())).unwrap_err();
        assert!(denied.to_string().contains("TM/GOV/MINCOM/registry"), "{denied}");
        assert!(acl.authorize(&sender, &Action::Consume(mailbox.clone())).is_err());
        assert!(acl.authorize(&stranger, &Action::Discover).is_err(), "unregistered");

        assert!(acl.grant(&mailbox.to_string(), Grantee::Subsystem(sub("TM/GOV/MINCOM/registry"))));
        assert!(acl.authorize(&sender, &Action::Send(mailbox.clone())).is_ok());
        assert!(acl.authorize(&sender, &Action::Consume(mailbox.clone())).is_err(), "a grant is send only");
        assert!(acl.revoke(&mailbox.to_string(), &Grantee::Subsystem(sub("TM/GOV/MINCOM/registry"))));
        assert!(acl.authorize(&sender, &Action::Send(mailbox.clone())).is_err());

        acl.add_to_group("ministries", sub("TM/GOV/MINCOM/registry"));
        acl.grant(&mailbox.to_string(), Grantee::Group("ministries".into()));
        assert!(acl.authorize(&sender, &Action::Send(mailbox.clone())).is_ok(), "via group");
        acl.remove_from_group("ministries", &sub("TM/GOV/MINCOM/registry"));
        assert!(acl.authorize(&sender, &Action::Send(mailbox.clone())).is_err());

        let admin = Principal::Admin("ops".into());
        assert!(acl.authorize(&admin, &Action::ManageMailbox(mailbox.clone())).is_ok());
        assert!(acl.authorize(&admin, &Action::Send(mailbox.clone())).is_err());
        assert!(acl.authorize(&admin, &Action::Consume(mailbox.clone())).is_err());
        assert!(acl.authorize(&Principal::Node(1), &Action::Discover).is_err());
        assert!(acl.authorize(&sender, &Action::Administer).is_err());

        let own_keys = Action::ManageKeys(sub("TM/GOV/MINCOM/registry"));
        assert!(acl.authorize(&sender, &own_keys).is_ok());
        assert!(acl.authorize(&owner, &own_keys).is_err(), "another subsystem's keys");
        assert!(acl.authorize(&admin, &own_keys).is_err(), "operators never choose whom mail is sealed to");
    }

    #[test]
    fn encryption_keys_rotate_and_retire() {
        let mut acl = AccessControl::default();
        let s = sub("TM/GOV/MINFIN/tax");
        let key = |id: &str, byte: u8, from: i64| PublicKeyRecord { key_id: id.into(), public_key: [byte; 32], valid_from_unix_ms: from, valid_until_unix_ms: None };
        assert!(acl.register_encryption_key(&s, key("k1", 1, 10)));
        assert!(!acl.register_encryption_key(&s, key("k1", 1, 10)), "same key again changes nothing");
        assert!(acl.register_encryption_key(&s, key("k2", 2, 20)));
        assert_eq!(acl.retire_encryption_key(&s, "k1", 30).map(|r| r.valid_until_unix_ms), Some(Some(30)));
        assert_eq!(acl.retire_encryption_key(&s, "k1", 40), None, "retiring never extends validity");
        assert_eq!(acl.retire_encryption_key(&s, "k9", 40), None);
        let ids: Vec<_> = acl.encryption_keys(&s).map(|k| (k.key_id.as_str(), k.valid_until_unix_ms)).collect();
        assert_eq!(ids, [("k1", Some(30)), ("k2", None)]);
        assert_eq!(acl.encryption_keys(&sub("TM/GOV/MINEDU/schools")).count(), 0);
    }
}
