//! Node-to-node services: openraft's RPCs (`Raft`) and forwarded work (`Peer`).
//!
//! Both refuse traffic from nodes cut off by the fault filter, so a test partition is
//! symmetric even when only one side was told about it.

use std::sync::Arc;
use std::time::Duration;

use kerwen_broker::model::{Command, NodeId, TypeConfig};
use kerwen_broker::BrokerError;
use kerwen_proto::v1::peer_server::Peer;
use kerwen_proto::v1::raft_server::Raft;
use kerwen_proto::v1::{
    PeerReply, PeerRequest, RaftBatchItem, RaftBatchItemReply, RaftBatchReply, RaftBatchRequest, RaftReply, RaftRequest,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use crate::opmon::OpmonQuery;
use crate::placement::PlacementRequest;
use crate::runtime::{FetchArgs, NodeRuntime, ReadQuery};
use crate::transport::{decode, encode};

pub struct InternalService {
    runtime: Arc<NodeRuntime>,
}

impl InternalService {
    pub fn new(runtime: Arc<NodeRuntime>) -> Self {
        Self { runtime }
    }

    fn admit(&self, from: NodeId) -> Result<(), Status> {
        if self.runtime.peers.is_blocked(from) {
            return Err(Status::unavailable(format!("node {from} is cut off (fault injection)")));
        }
        Ok(())
    }
}

fn reply<T: Serialize>(result: &T) -> Result<Response<RaftReply>, Status> {
    let body = encode(result).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftReply { body: body.into() }))
}

fn peer_reply<T: Serialize>(result: Result<T, BrokerError>) -> Result<Response<PeerReply>, Status> {
    let body = encode(&result).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(PeerReply { body: body.into() }))
}

fn bad_body(e: BrokerError) -> Status {
    Status::invalid_argument(e.to_string())
}

impl InternalService {
    /// Decodes an openraft request for its group, runs it on that group's Raft and encodes
    /// the `Result` (openraft errors travel back to the caller's openraft as values).
    async fn raft_call<Req, Resp, F, Fut>(&self, request: Request<RaftRequest>, call: F) -> Result<Response<RaftReply>, Status>
    where
        Req: DeserializeOwned,
        Resp: Serialize,
        F: FnOnce(openraft::Raft<TypeConfig>, Req) -> Fut,
        Fut: std::future::Future<Output = Resp>,
    {
        let req = request.into_inner();
        self.admit(req.from)?;
        let raft = self.runtime.raft(req.group).map_err(|e| Status::not_found(e.to_string()))?.clone();
        reply(&call(raft, decode(&req.body).map_err(bad_body)?).await)
    }

    /// Hands one batched AppendEntries to its group and encodes the group's answer.
    async fn append_one(&self, item: RaftBatchItem) -> RaftBatchItemReply {
        let answer = async {
            let raft = self.runtime.raft(item.group)?.clone();
            encode(&raft.append_entries(decode(&item.body)?).await)
        };
        match answer.await {
            Ok(body) => RaftBatchItemReply { body: body.into(), error: String::new() },
            Err(e) => RaftBatchItemReply { body: Default::default(), error: e.to_string() },
        }
    }
}

#[tonic::async_trait]
impl Raft for InternalService {
    /// Every group's append starts at once, so their writes reach the group commit together
    /// and share one sync; the reply waits for all of them.
    async fn append_entries_batch(&self, request: Request<RaftBatchRequest>) -> Result<Response<RaftBatchReply>, Status> {
        let req = request.into_inner();
        self.admit(req.from)?;
        let items = futures::future::join_all(req.items.into_iter().map(|item| self.append_one(item))).await;
        Ok(Response::new(RaftBatchReply { items }))
    }

    async fn vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        self.raft_call(request, |raft, rpc| async move { raft.vote(rpc).await }).await
    }

    async fn install_snapshot(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        self.raft_call(request, |raft, rpc| async move { raft.install_snapshot(rpc).await }).await
    }
}

#[tonic::async_trait]
impl Peer for InternalService {
    async fn write(&self, request: Request<PeerRequest>) -> Result<Response<PeerReply>, Status> {
        let req = request.into_inner();
        self.admit(req.from)?;
        let cmd: Command = decode(&req.body).map_err(bad_body)?;
        peer_reply(self.runtime.write_local(req.group, cmd).await)
    }

    async fn fetch(&self, request: Request<PeerRequest>) -> Result<Response<PeerReply>, Status> {
        let req = request.into_inner();
        self.admit(req.from)?;
        let mut args: FetchArgs = decode(&req.body).map_err(bad_body)?;
        args.wait_ms = args.wait_ms.min(Duration::from_secs(5).as_millis() as u64);
        peer_reply(self.runtime.fetch_local(req.group, args).await)
    }

    async fn read(&self, request: Request<PeerRequest>) -> Result<Response<PeerReply>, Status> {
        let req = request.into_inner();
        self.admit(req.from)?;
        let query: ReadQuery = decode(&req.body).map_err(bad_body)?;
        peer_reply(self.runtime.read_local(req.group, query).await)
    }

    async fn opmon(&self, request: Request<PeerRequest>) -> Result<Response<PeerReply>, Status> {
        let req = request.into_inner();
        self.admit(req.from)?;
        let query: OpmonQuery = decode(&req.body).map_err(bad_body)?;
        peer_reply(Ok(self.runtime.opmon.query(&query, crate::runtime::now_unix_ms())))
    }

    async fn placement(&self, request: Request<PeerRequest>) -> Result<Response<PeerReply>, Status> {
        let req = request.into_inner();
        self.admit(req.from)?;
        let question: PlacementRequest = decode(&req.body).map_err(bad_body)?;
        peer_reply(self.runtime.placement_local(req.group, question).await)
    }

    async fn inject_fault(&self, request: Request<PeerRequest>) -> Result<Response<PeerReply>, Status> {
        let req = request.into_inner();
        let blocked: Vec<NodeId> = decode(&req.body).map_err(bad_body)?;
        peer_reply(self.runtime.peers.set_blocked(blocked))
    }
}
