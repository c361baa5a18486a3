//! `kerwen.v1.Admin`: mailboxes and cluster status.

use std::sync::Arc;

use kerwen_broker::ids::ServiceId;
use kerwen_broker::model::{Command, CommandResult, MailboxInfo, MailboxLimits, METADATA_GROUP};
use kerwen_broker::storage::state_machine::MAX_PARTITIONS;
use kerwen_proto::v1 as pb;
use kerwen_proto::v1::admin_server::Admin;
use openraft::ServerState;
use tonic::{Request, Response, Status};

use crate::runtime::{now_unix_ms, NodeRuntime};
use crate::status::to_status;

pub struct AdminService {
    runtime: Arc<NodeRuntime>,
}

impl AdminService {
    pub fn new(runtime: Arc<NodeRuntime>) -> Self {
        Self { runtime }
    }
}

fn to_proto(info: MailboxInfo) -> pb::MailboxInfo {
    pb::MailboxInfo {
        service: info.service,
        id: info.id,
        partitions: info.partitions,
        partition_shards: info.partition_shards,
        pending_messages: 0,
        pending_bytes: 0,
        created_unix_ms: info.created_unix_ms,
        dedup_window_ms: info.limits.dedup_window_ms,
        max_messages: info.limits.max_messages,
        max_bytes: info.limits.max_bytes,
    }
}

/// Longest accepted dedup window.
const MAX_DEDUP_WINDOW_MS: u64 = 30 * 24 * 60 * 60 * 1000;

/// The limits asked for, defaults filled in (0 means default).
fn requested_limits(req: &pb::CreateMailboxRequest) -> Result<MailboxLimits, Status> {
    let or_default = |value: u64, default: u64| if value == 0 { default } else { value };
    let limits = MailboxLimits {
        dedup_window_ms: or_default(req.dedup_window_ms, MailboxLimits::DEFAULT_DEDUP_WINDOW_MS),
        max_messages: or_default(req.max_messages, MailboxLimits::DEFAULT_MAX_MESSAGES),
        max_bytes: or_default(req.max_bytes, MailboxLimits::DEFAULT_MAX_BYTES),
    };
    if limits.dedup_window_ms > MAX_DEDUP_WINDOW_MS {
        return Err(Status::invalid_argument(format!(
            "dedup_window_ms must be at most {MAX_DEDUP_WINDOW_MS} (30 days), got {}",
            limits.dedup_window_ms
        )));
    }
    Ok(limits)
}

fn role(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_mailbox(&self, request: Request<pb::CreateMailboxRequest>) -> Result<Response<pb::MailboxInfo>, Status> {
        let req = request.into_inner();
        let service: ServiceId = req.service.parse().map_err(|e| Status::invalid_argument(format!("service: {e}")))?;
        let partitions = if req.partitions == 0 { self.runtime.config.default_partitions } else { req.partitions };
        if partitions > MAX_PARTITIONS {
            return Err(Status::invalid_argument(format!("partitions must be 1..={MAX_PARTITIONS}, got {partitions}")));
        }
        let cmd = Command::CreateMailbox {
            service: service.to_string(),
            partitions,
            shard_count: self.runtime.config.shards,
            created_unix_ms: now_unix_ms(),
            limits: requested_limits(&req)?,
        };
        match self.runtime.write(METADATA_GROUP, cmd).await.map_err(to_status)?.1 {
            CommandResult::MailboxCreated(info) => {
                tracing::info!(mailbox = %info.service, partitions = info.partitions, "mailbox created");
                Ok(Response::new(to_proto(info)))
            }
            CommandResult::Rejected(e) => Err(to_status(e)),
            other => Err(Status::internal(format!("unexpected result {other:?}"))),
        }
    }

    async fn list_mailboxes(&self, _request: Request<pb::ListMailboxesRequest>) -> Result<Response<pb::ListMailboxesResponse>, Status> {
        let mailboxes = self.runtime.mailboxes().await.map_err(to_status)?;
        Ok(Response::new(pb::ListMailboxesResponse { mailboxes: mailboxes.into_iter().map(to_proto).collect() }))
    }

    async fn describe_mailbox(&self, request: Request<pb::DescribeMailboxRequest>) -> Result<Response<pb::MailboxInfo>, Status> {
        let service = request.into_inner().service;
        service.parse::<ServiceId>().map_err(|e| Status::invalid_argument(format!("service: {e}")))?;
        let info = self.runtime.mailbox(&service).await.map_err(to_status)?;
        let stats = self.runtime.mailbox_stats(&info).await.map_err(to_status)?;
        let mut out = to_proto(info);
        out.pending_messages = stats.messages;
        out.pending_bytes = stats.bytes;
        Ok(Response::new(out))
    }

    async fn cluster_status(&self, _request: Request<pb::ClusterStatusRequest>) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let nodes = self
            .runtime
            .peers
            .addresses()
            .into_iter()
            .map(|(id, address)| pb::NodeInfo { id, address })
            .collect();
        let groups = self
            .runtime
            .all_rafts()
            .map(|(group, raft)| {
                let m = raft.metrics().borrow().clone();
                pb::GroupStatus {
                    group,
                    leader: m.current_leader,
                    term: m.current_term,
                    last_log_index: m.last_log_index.unwrap_or(0),
                    last_applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
                    voters: m.membership_config.membership().voter_ids().collect(),
                    local_role: role(m.state).to_owned(),
                    snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
                    purged_index: m.purged.map(|l| l.index).unwrap_or(0),
                }
            })
            .collect();
        Ok(Response::new(pb::ClusterStatusResponse { node_id: self.runtime.node_id(), nodes, groups }))
    }
}
