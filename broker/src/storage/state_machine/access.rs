//! Applying [`AccessCommand`]s in the metadata group: the member registry (`M` keys), send
//! grants (`g` keys), subsystem groups (`G` keys), the nodes' signing keys (`K`) and the
//! subsystems' payload encryption keys (`k`), kept in RocksDB and mirrored in the
//! [`MetaView`]'s [`AccessControl`], which the node consults on every request.

use rocksdb::WriteBatch;

use super::{for_each_in_prefix, read, write, MetaView};
use crate::access::{AccessCommand, AccessControl, Grantee, MemberRecord};
use crate::error::{BrokerError, Result};
use crate::model::{CommandResult, METADATA_GROUP};
use crate::evidence::PublicKeyRecord;
use crate::ids::SubsystemId;
use crate::storage::keys::{self, KIND_ENCRYPTION_KEY, KIND_GRANT, KIND_GROUP, KIND_MEMBER, KIND_SIGNING_KEY};
use crate::storage::{Store, CF_STATE};

fn member_key(subsystem: &str) -> Vec<u8> {
    keys::state_key(METADATA_GROUP, KIND_MEMBER, subsystem.as_bytes())
}

/// Loads the access-control state from the store (on open and after a snapshot).
pub(super) fn load(store: &Store) -> Result<AccessControl> {
    let mut acl = AccessControl::default();
    for_each_in_prefix(store, &keys::state_key(METADATA_GROUP, KIND_MEMBER, &[]), |_, value| {
        acl.put_member(store.decode::<MemberRecord>(value)?);
        Ok(true)
    })?;
    for_each_in_prefix(store, &keys::state_key(METADATA_GROUP, KIND_SIGNING_KEY, &[]), |_, value| {
        acl.register_signing_key(store.decode::<PublicKeyRecord>(value)?);
        Ok(true)
    })?;
    let prefix = keys::state_key(METADATA_GROUP, KIND_ENCRYPTION_KEY, &[]);
    for_each_in_prefix(store, &prefix, |key, value| {
        let (subsystem, _) = keys::parse_pair(&key[prefix.len()..])
            .ok_or_else(|| BrokerError::Storage(format!("malformed encryption key key {key:?}")))?;
        let subsystem: SubsystemId =
            subsystem.parse().map_err(|e| BrokerError::Storage(format!("stored encryption key owner is invalid: {e}")))?;
        acl.register_encryption_key(&subsystem, store.decode::<PublicKeyRecord>(value)?);
        Ok(true)
    })?;
    let pairs = |kind: u8| -> Result<Vec<(String, String)>> {
        let prefix = keys::state_key(METADATA_GROUP, kind, &[]);
        let mut out = Vec::new();
        for_each_in_prefix(store, &prefix, |key, _| {
            let (a, b) = keys::parse_pair(&key[prefix.len()..])
                .ok_or_else(|| BrokerError::Storage(format!("malformed access key {key:?}")))?;
            out.push((a.to_owned(), b.to_owned()));
            Ok(true)
        })?;
        Ok(out)
    };
    let corrupt = |what: &str, e: &dyn std::fmt::Display| BrokerError::Storage(format!("stored {what} is invalid: {e}"));
    for (service, grantee) in pairs(KIND_GRANT)? {
        let grantee: Grantee = grantee.parse().map_err(|e| corrupt("grantee", &e))?;
        acl.grant(&service, grantee);
    }
    for (group, subsystem) in pairs(KIND_GROUP)? {
        acl.add_to_group(&group, subsystem.parse().map_err(|e| corrupt("group member", &e))?);
    }
    Ok(acl)
}

/// Applies one access command; refusals are deterministic (they depend on replicated state only).
pub(super) fn apply(store: &Store, view: &MetaView, batch: &mut WriteBatch, cmd: AccessCommand) -> Result<CommandResult> {
    let cf = store.cf(CF_STATE)?;
    let rejected = |e: BrokerError| Ok(CommandResult::Rejected(e));
    let mut acl = write(&view.access);
    match cmd {
        AccessCommand::AddMember(record) => {
            if acl.member(&record.subsystem).is_some() {
                return rejected(BrokerError::AlreadyExists(format!("subsystem {} is already registered", record.subsystem)));
            }
            batch.put_cf(&cf, member_key(&record.subsystem.to_string()), store.encode(&record)?);
            acl.put_member(record);
        }
        AccessCommand::SetQuota { subsystem, quota } => {
            let Some(existing) = acl.member(&subsystem) else {
                return rejected(not_registered(&subsystem.to_string()));
            };
            let record = MemberRecord { quota, ..existing.clone() };
            batch.put_cf(&cf, member_key(&subsystem.to_string()), store.encode(&record)?);
            acl.put_member(record);
        }
        AccessCommand::Grant { service, grantee } => {
            if !read(&view.mailboxes).contains_key(&service) {
                return rejected(BrokerError::NotFound(format!("mailbox {service} does not exist")));
            }
            if let Some(e) = unknown_grantee(&acl, &grantee) {
                return rejected(e);
            }
            batch.put_cf(&cf, keys::pair_key(METADATA_GROUP, KIND_GRANT, &service, &grantee.to_string()), []);
            return Ok(CommandResult::Changed(u64::from(acl.grant(&service, grantee))));
        }
        AccessCommand::Revoke { service, grantee } => {
            batch.delete_cf(&cf, keys::pair_key(METADATA_GROUP, KIND_GRANT, &service, &grantee.to_string()));
            return Ok(CommandResult::Changed(u64::from(acl.revoke(&service, &grantee))));
        }
        AccessCommand::AddToGroup { group, subsystem } => {
            if acl.member(&subsystem).is_none() {
                return rejected(not_registered(&subsystem.to_string()));
            }
            batch.put_cf(&cf, keys::pair_key(METADATA_GROUP, KIND_GROUP, &group, &subsystem.to_string()), []);
            return Ok(CommandResult::Changed(u64::from(acl.add_to_group(&group, subsystem))));
        }
        AccessCommand::RegisterSigningKey(record) => {
            let existing = acl.signing_keys().keys.get(&record.key_id);
            if existing.is_some_and(|e| e.public_key != record.public_key) {
                return rejected(BrokerError::AlreadyExists(format!("signing key id {} is taken by another key", record.key_id)));
            }
            batch.put_cf(&cf, keys::state_key(METADATA_GROUP, KIND_SIGNING_KEY, record.key_id.as_bytes()), store.encode(&record)?);
            return Ok(CommandResult::Changed(u64::from(acl.register_signing_key(record))));
        }
        AccessCommand::RetireSigningKey { key_id, valid_until_unix_ms } => {
            if acl.signing_keys().keys.get(&key_id).is_none() {
                return rejected(BrokerError::NotFound(format!("signing key {key_id} is not published")));
            }
            let Some(record) = acl.retire_signing_key(&key_id, valid_until_unix_ms) else { return Ok(CommandResult::Changed(0)) };
            batch.put_cf(&cf, keys::state_key(METADATA_GROUP, KIND_SIGNING_KEY, key_id.as_bytes()), store.encode(&record)?);
            return Ok(CommandResult::Changed(1));
        }
        AccessCommand::RegisterEncryptionKey { subsystem, key } => {
            if acl.member(&subsystem).is_none() {
                return rejected(not_registered(&subsystem.to_string()));
            }
            if acl.encryption_keys(&subsystem).any(|e| e.key_id == key.key_id && e.public_key != key.public_key) {
                return rejected(BrokerError::AlreadyExists(format!(
                    "encryption key id {} of {subsystem} is taken by another key",
                    key.key_id
                )));
            }
            let stored = keys::pair_key(METADATA_GROUP, KIND_ENCRYPTION_KEY, &subsystem.to_string(), &key.key_id);
            batch.put_cf(&cf, stored, store.encode(&key)?);
            return Ok(CommandResult::Changed(u64::from(acl.register_encryption_key(&subsystem, key))));
        }
        AccessCommand::RetireEncryptionKey { subsystem, key_id, valid_until_unix_ms } => {
            if !acl.encryption_keys(&subsystem).any(|e| e.key_id == key_id) {
                return rejected(BrokerError::NotFound(format!("{subsystem} has no encryption key {key_id}")));
            }
            let Some(record) = acl.retire_encryption_key(&subsystem, &key_id, valid_until_unix_ms) else {
                return Ok(CommandResult::Changed(0));
            };
            let stored = keys::pair_key(METADATA_GROUP, KIND_ENCRYPTION_KEY, &subsystem.to_string(), &key_id);
            batch.put_cf(&cf, stored, store.encode(&record)?);
            return Ok(CommandResult::Changed(1));
        }
        AccessCommand::RemoveFromGroup { group, subsystem } => {
            batch.delete_cf(&cf, keys::pair_key(METADATA_GROUP, KIND_GROUP, &group, &subsystem.to_string()));
            return Ok(CommandResult::Changed(u64::from(acl.remove_from_group(&group, &subsystem))));
        }
    }
    Ok(CommandResult::Changed(1))
}

pub(super) fn not_registered(subsystem: &str) -> BrokerError {
    BrokerError::NotFound(format!("subsystem {subsystem} is not registered (kerwen member add {subsystem})"))
}

fn unknown_grantee(acl: &AccessControl, grantee: &Grantee) -> Option<BrokerError> {
    match grantee {
        Grantee::Subsystem(s) if acl.member(s).is_none() => Some(not_registered(&s.to_string())),
        Grantee::Group(g) if !acl.group_exists(g) => {
            Some(BrokerError::NotFound(format!("group {g} does not exist (kerwen group add {g} SUBSYSTEM)")))
        }
        _ => None,
    }
}
