//! Applying [`ClusterCommand`]s in the metadata group: the node registry (`R` keys), mirrored
//! in the [`MetaView`], from which every node learns its peers' addresses and the placement
//! coordinator which nodes take replicas.

use std::collections::BTreeMap;

use rocksdb::WriteBatch;

use super::{for_each_in_prefix, write, MetaView};
use crate::cluster::{ClusterCommand, NodeRecord, NodeRecordV1, NodeState};
use crate::error::{BrokerError, Result};
use crate::model::{CommandResult, NodeId, METADATA_GROUP};
use crate::storage::keys::{self, KIND_NODE};
use crate::storage::{decode_plain, Store, CF_STATE};

fn node_key(id: NodeId) -> Vec<u8> {
    keys::state_key(METADATA_GROUP, KIND_NODE, &id.to_be_bytes())
}

/// Loads the registry from the store (on open and after a snapshot).
pub(super) fn load(store: &Store) -> Result<BTreeMap<NodeId, NodeRecord>> {
    let mut nodes = BTreeMap::new();
    for_each_in_prefix(store, &keys::state_key(METADATA_GROUP, KIND_NODE, &[]), |_, value| {
        let record = decode_record(&store.open_bytes(value)?)?;
        nodes.insert(record.id, record);
        Ok(true)
    })?;
    Ok(nodes)
}

/// A registry record, or one written before client addresses were advertised (one field less).
fn decode_record(plain: &[u8]) -> Result<NodeRecord> {
    decode_plain::<NodeRecord>(plain).or_else(|_| decode_plain::<NodeRecordV1>(plain).map(NodeRecord::from))
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
            let client_address = nodes.get(&id).and_then(|n| n.client_address.clone());
            NodeRecord { id, address, zone, state, client_address }
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
        ClusterCommand::Advertise { id, client_address } => {
            let Some(existing) = nodes.get(&id) else {
                return Ok(CommandResult::Rejected(BrokerError::NotFound(format!("node {id} is not registered"))));
            };
            NodeRecord { client_address: Some(client_address), ..existing.clone() }
        }
    };
    if nodes.get(&record.id) == Some(&record) {
        return Ok(CommandResult::Changed(0));
    }
    batch.put_cf(&cf, node_key(record.id), store.encode(&record)?);
    nodes.insert(record.id, record);
    Ok(CommandResult::Changed(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_without_a_client_address_are_still_read() {
        #[derive(serde::Serialize)]
        struct Written(NodeId, String, Option<String>, NodeState);
        let old = crate::storage::encode_plain(&Written(3, "n3:7101".into(), Some("zone-a".into()), NodeState::Draining)).unwrap();
        let record = decode_record(&old).unwrap();
        assert_eq!((record.id, record.address.as_str(), record.state, record.client_address), (3, "n3:7101", NodeState::Draining, None));
        let new = NodeRecord { client_address: Some("n3:7001".into()), ..record };
        assert_eq!(decode_record(&crate::storage::encode_plain(&new).unwrap()).unwrap(), new);
    }
}
