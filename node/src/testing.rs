//! Hooks for the cluster test harness. They only work against nodes started with
//! `--enable-fault-injection`.

use kerwen_broker::model::NodeId;
use kerwen_broker::BrokerError;
use kerwen_proto::v1::peer_client::PeerClient;
use kerwen_proto::v1::PeerRequest;

use crate::tls::ClientTls;
use crate::transport::{decode, encode};
use tonic::transport::Endpoint;

/// Makes the node whose peer port is `endpoint` drop all Raft and peer traffic to and from
/// `blocked` (an empty list heals it). The peer port admits node certificates only: `tls`
/// must present one (`None` for an `--insecure` node).
pub async fn set_blocked_peers(endpoint: &str, blocked: &[NodeId], tls: Option<ClientTls>) -> anyhow::Result<()> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = if endpoint.contains("://") { endpoint.to_owned() } else { format!("{scheme}://{endpoint}") };
    let mut e = Endpoint::from_shared(url)?;
    if let Some(tls) = tls {
        e = e.tls_config(tls.tonic_config())?;
    }
    let mut client = PeerClient::new(e.connect().await?);
    let body = encode(&blocked.to_vec())?;
    let reply = client.inject_fault(PeerRequest { group: 0, from: 0, body: body.into() }).await?;
    decode::<Result<(), BrokerError>>(&reply.into_inner().body)??;
    Ok(())
}
