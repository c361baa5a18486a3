//! Applying [`ClusterCommand`]s in the metadata group: the node registry (`R` keys), mirrored
//! in the [`MetaView`], from which every node learns its peers' addresses and the placement
//! coordinator which nodes take replicas.

use std::collections::BTreeMap;

use rocksdb::WriteBatch;

use super::{for_each_in_prefix, write, MetaView};
use crate::cluster::{ClusterCommand, NodeRecord, NodeState};
use crate::error::{BrokerError, Result};
use crate::model::{CommandResult, NodeId, METADATA_GROUP};
use crate::storage::keys::{self, KIND_NODE};
use crate::storage::{Store, CF_STATE};

fn node_key(id: NodeId) -> Vec<u8> {
    keys::state_key(METADATA_GROUP, KIND_NODE, &id.to_be_bytes())
}

/// Loads the registry from the store (on open and after a snapshot).
pub(super) fn load(store: &Store) -> Result<BTreeMap<NodeId, NodeRecord>> {
    let mut nodes = BTreeMap::new();
    for_each_in_prefix(store, &keys::state_key(METADATA_GROUP, KIND_NODE, &[]), |_, value| {
        let record: NodeRecord = store.decode(value)?;
        nodes.insert(record.id, record);
        Ok(true)
    })?;
    Ok(nodes)
}

/// Applies one registry change; refusals depend on replicated state only.
pub(super) fn apply(store: &Store, view: &MetaView, batch: &mut WriteBatch, cmd: ClusterCommand) -> Result<CommandResult> {
    let cf = store.cf(CF_STATE)?;
    let mut nodes = write(&view.nodes);
    let record = match cmd {
        ClusterCommand::Register { id, address, zone, admit } => {
            let state = match nodes.get(&id).map(|n| n.state) {
                Some(NodeState::Removed) if !admit => {
                    return Ok(CommandResult::Rejected(BrokerError::FailedPrecondition(format!(
                        "node {id} was removed from the cluster; an operator re-admits it with `kerwen node join {id} ADDRESS`"
                    ))));
                }
                Some(NodeState::Draining) => NodeState::Draining,
                _ => NodeState::Active,
            };
            NodeRecord { id, address, zone, state }
        }
        ClusterCommand::SetState { id, state } => {
            let Some(existing) = nodes.get(&id) else {
                return Ok(CommandResult::Rejected(BrokerError::NotFound(format!("node {id} is not registered"))));
            };
            // Only a join re-admits a removed node: a drain racing the removal (a retried
            // `kerwen node remove`, a second scale-down hook) must not make it a member again.
            if existing.state == NodeState::Removed && state != NodeState::Removed {
                return Ok(CommandResult::Rejected(BrokerError::FailedPrecondition(format!(
                    "node {id} was removed from the cluster; an operator re-admits it with `kerwen node join {id} ADDRESS`"
                ))));
            }
            NodeRecord { state, ..existing.clone() }
        }
    };
    if nodes.get(&record.id) == Some(&record) {
        return Ok(CommandResult::Changed(0));
    }
    batch.put_cf(&cf, node_key(record.id), store.encode(&record)?);
    nodes.insert(record.id, record);
    Ok(CommandResult::Changed(1))
}
