//! Hooks for the cluster test harness. They only work against nodes started with
//! `--enable-fault-injection`.

use kerwen_broker::model::NodeId;
use kerwen_broker::BrokerError;
use kerwen_proto::v1::peer_client::PeerClient;
use kerwen_proto::v1::PeerRequest;

use crate::transport::{decode, encode};

/// Makes the node at `endpoint` drop all Raft and peer traffic to and from `blocked` (an
/// empty list heals it).
pub async fn set_blocked_peers(endpoint: &str, blocked: &[NodeId]) -> anyhow::Result<()> {
    let url = if endpoint.contains("://") { endpoint.to_owned() } else { format!("http://{endpoint}") };
    let mut client = PeerClient::connect(url).await?;
    let body = encode(&blocked.to_vec())?;
    let reply = client.inject_fault(PeerRequest { group: 0, from: 0, body: body.into() }).await?;
    decode::<Result<(), BrokerError>>(&reply.into_inner().body)??;
    Ok(())
}
