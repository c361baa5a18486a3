//! `kerwen.v1.Admin`: mailboxes, their dead-letter queues, cluster status, evidence export,
//! signing-key rotation and operational data.

use std::sync::Arc;

use kerwen_broker::access::{Action, Principal};
use kerwen_broker::model::{
    dead_letter_partition, is_dead_letter, Command, CommandResult, DeliveryPolicy, MailboxInfo, MailboxLimits, Position,
    RedeliveryPolicy, METADATA_GROUP,
};
use kerwen_broker::storage::state_machine::MAX_PARTITIONS;
use kerwen_proto::v1 as pb;
use kerwen_proto::v1::admin_server::Admin;
use openraft::ServerState;
use tonic::{Request, Response, Status};

use crate::auth::{self, Caller};
use crate::opmon::{self, ExchangeKind, OpRecord, OpmonQuery};
use crate::runtime::{now_unix_ms, NodeRuntime, ReadAnswer, ReadQuery};
use crate::services::exchange::{to_proto_dead_letter, to_proto_position};
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
        lease_ms: info.policy.lease_ms,
        max_attempts: info.policy.redelivery.max_attempts,
        backoff_initial_ms: info.policy.redelivery.backoff_initial_ms,
        backoff_max_ms: info.policy.redelivery.backoff_max_ms,
        default_ttl_ms: info.policy.default_ttl_ms,
        ordered: info.policy.ordered,
        dead_letter_messages: 0,
        dead_letter_bytes: 0,
        evidence_retention_ms: info.limits.evidence_retention_ms,
        key_partitions: info.key_partitions,
    }
}

/// Most dead letters one list call returns.
const MAX_DEAD_LETTER_PAGE: u32 = 10_000;
/// Most dead letters one redrive command moves: applying it rewrites their payloads.
const REDRIVE_PAGE: u32 = 256;
/// Longest lease, back-off or default time to live a mailbox may ask for: 7 days.
const MAX_POLICY_MS: u64 = 7 * 24 * 60 * 60 * 1000;

/// The delivery policy asked for, defaults filled in (0 means default).
fn requested_policy(req: &pb::CreateMailboxRequest, default_lease_ms: u64) -> Result<DeliveryPolicy, Status> {
    let defaults = DeliveryPolicy::default();
    let or_default = |value: u64, default: u64| if value == 0 { default } else { value };
    let policy = DeliveryPolicy {
        lease_ms: or_default(req.lease_ms, default_lease_ms),
        redelivery: RedeliveryPolicy {
            max_attempts: if req.max_attempts == 0 { defaults.redelivery.max_attempts } else { req.max_attempts },
            backoff_initial_ms: or_default(req.backoff_initial_ms, defaults.redelivery.backoff_initial_ms),
            backoff_max_ms: or_default(req.backoff_max_ms, defaults.redelivery.backoff_max_ms),
        },
        default_ttl_ms: req.default_ttl_ms,
        ordered: req.ordered,
    };
    for (name, value) in [
        ("lease_ms", policy.lease_ms),
        ("backoff_initial_ms", policy.redelivery.backoff_initial_ms),
        ("backoff_max_ms", policy.redelivery.backoff_max_ms),
        ("default_ttl_ms", policy.default_ttl_ms),
    ] {
        if value > MAX_POLICY_MS {
            return Err(Status::invalid_argument(format!("{name} must be at most {MAX_POLICY_MS} (7 days), got {value}")));
        }
    }
    if policy.redelivery.backoff_initial_ms > policy.redelivery.backoff_max_ms {
        return Err(Status::invalid_argument(format!(
            "backoff_initial_ms ({}) must not exceed backoff_max_ms ({})",
            policy.redelivery.backoff_initial_ms, policy.redelivery.backoff_max_ms
        )));
    }
    Ok(policy)
}

/// Longest evidence retention: 100 years.
const MAX_EVIDENCE_RETENTION_MS: u64 = 100 * 365 * 24 * 60 * 60 * 1000;

/// Longest accepted dedup window.
const MAX_DEDUP_WINDOW_MS: u64 = 30 * 24 * 60 * 60 * 1000;

/// The limits asked for, defaults filled in (0 means default).
fn requested_limits(req: &pb::CreateMailboxRequest) -> Result<MailboxLimits, Status> {
    let or_default = |value: u64, default: u64| if value == 0 { default } else { value };
    let limits = MailboxLimits {
        dedup_window_ms: or_default(req.dedup_window_ms, MailboxLimits::DEFAULT_DEDUP_WINDOW_MS),
        max_messages: or_default(req.max_messages, MailboxLimits::DEFAULT_MAX_MESSAGES),
        max_bytes: or_default(req.max_bytes, MailboxLimits::DEFAULT_MAX_BYTES),
        evidence_retention_ms: match req.evidence_retention_days {
            0 => MailboxLimits::DEFAULT_EVIDENCE_RETENTION_MS,
            days => days.checked_mul(24 * 60 * 60 * 1000).filter(|ms| *ms <= MAX_EVIDENCE_RETENTION_MS).ok_or_else(|| {
                Status::invalid_argument(format!("evidence_retention_days must be at most {}, got {days}", MAX_EVIDENCE_RETENTION_MS / 86_400_000))
            })?,
        },
    };
    if limits.dedup_window_ms > MAX_DEDUP_WINDOW_MS {
        return Err(Status::invalid_argument(format!(
            "dedup_window_ms must be at most {MAX_DEDUP_WINDOW_MS} (30 days), got {}",
            limits.dedup_window_ms
        )));
    }
    Ok(limits)
}

impl AdminService {
    /// A mailbox the caller may manage.
    async fn mailbox(&self, caller: &Caller, service: &str) -> Result<MailboxInfo, Status> {
        auth::authorize(&self.runtime, caller, Action::ManageMailbox(auth::service_id("mailbox", service)?)).await?;
        self.runtime.mailbox(service).await.map_err(to_status)
    }

    /// Moves dead letters of one shard back into the mailbox; returns how many moved.
    async fn redrive(&self, shard: u32, mailbox: u64, positions: Vec<Position>) -> Result<u64, Status> {
        if positions.is_empty() {
            return Ok(0);
        }
        let cmd = Command::Redrive { mailbox, positions, now_unix_ms: now_unix_ms() };
        match self.runtime.write(shard, cmd).await.map_err(to_status)?.1 {
            CommandResult::Changed(n) => Ok(n),
            CommandResult::Rejected(e) => Err(to_status(e)),
            other => Err(Status::internal(format!("unexpected result {other:?}"))),
        }
    }

    /// Writes a mailbox-creating or -growing command and answers with the mailbox it left.
    async fn write_mailbox(&self, cmd: Command, done: &str) -> Result<Response<pb::MailboxInfo>, Status> {
        match self.runtime.write(METADATA_GROUP, cmd).await.map_err(to_status)?.1 {
            CommandResult::MailboxCreated(info) => {
                tracing::info!(mailbox = %info.service, partitions = info.partitions, key_partitions = info.key_partitions, "mailbox {done}");
                Ok(Response::new(to_proto(info)))
            }
            CommandResult::Rejected(e) => Err(to_status(e)),
            other => Err(Status::internal(format!("unexpected result {other:?}"))),
        }
    }
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
        let caller = auth::caller(&self.runtime, &request)?;
        let req = request.into_inner();
        let service = auth::service_id("service", &req.service)?;
        auth::authorize(&self.runtime, &caller, Action::ManageMailbox(service.clone())).await?;
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
            policy: requested_policy(&req, self.runtime.config.lease.as_millis() as u64)?,
        };
        self.write_mailbox(cmd, "created").await
    }

    async fn grow_mailbox(&self, request: Request<pb::GrowMailboxRequest>) -> Result<Response<pb::MailboxInfo>, Status> {
        let caller = auth::caller(&self.runtime, &request)?;
        let req = request.into_inner();
        let service = auth::service_id("service", &req.service)?;
        auth::authorize(&self.runtime, &caller, Action::ManageMailbox(service.clone())).await?;
        let cmd = Command::GrowMailbox { service: service.to_string(), partitions: req.partitions, shard_count: self.runtime.config.shards };
        self.write_mailbox(cmd, "grown").await
    }

    async fn list_mailboxes(&self, request: Request<pb::ListMailboxesRequest>) -> Result<Response<pb::ListMailboxesResponse>, Status> {
        let caller = auth::caller(&self.runtime, &request)?;
        auth::authorize(&self.runtime, &caller, Action::Discover).await?;
        let mailboxes = self.runtime.mailboxes().await.map_err(to_status)?;
        Ok(Response::new(pb::ListMailboxesResponse { mailboxes: mailboxes.into_iter().map(to_proto).collect() }))
    }

    async fn describe_mailbox(&self, request: Request<pb::DescribeMailboxRequest>) -> Result<Response<pb::MailboxInfo>, Status> {
        let caller = auth::caller(&self.runtime, &request)?;
        let service = request.into_inner().service;
        auth::authorize(&self.runtime, &caller, Action::ManageMailbox(auth::service_id("service", &service)?)).await?;
        let info = self.runtime.mailbox(&service).await.map_err(to_status)?;
        let stats = self.runtime.mailbox_stats(&info, false).await.map_err(to_status)?;
        let dead = self.runtime.mailbox_stats(&info, true).await.map_err(to_status)?;
        let mut out = to_proto(info);
        out.pending_messages = stats.messages;
        out.pending_bytes = stats.bytes;
        out.dead_letter_messages = dead.messages;
        out.dead_letter_bytes = dead.bytes;
        Ok(Response::new(out))
    }

    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let caller = auth::caller(&self.runtime, &request)?;
        let req = request.into_inner();
        let info = self.mailbox(&caller, &req.mailbox).await?;
        let limit = if req.limit == 0 { 100 } else { req.limit.min(MAX_DEAD_LETTER_PAGE) };
        let mut dead_letters = Vec::new();
        for (shard, partitions) in info.dead_letter_partitions_by_shard() {
            let left = limit.saturating_sub(dead_letters.len() as u32);
            if left == 0 {
                break;
            }
            let query = ReadQuery::DeadLetters { mailbox: info.id, partitions, limit: left };
            let ReadAnswer::DeadLetters(found) = self.runtime.read(shard, query).await.map_err(to_status)? else {
                return Err(Status::internal("unexpected answer to a dead-letter listing"));
            };
            dead_letters.extend(found.into_iter().map(|d| pb::DeadLetter {
                position: Some(to_proto_position(d.position)),
                id: d.id,
                payload_bytes: d.payload_bytes,
                ordering_key: d.ordering_key,
                accepted_unix_ms: d.accepted_unix_ms,
                info: Some(to_proto_dead_letter(&d.letter)),
            }));
        }
        Ok(Response::new(pb::ListDeadLettersResponse { dead_letters }))
    }

    async fn redrive_dead_letters(&self, request: Request<pb::RedriveRequest>) -> Result<Response<pb::RedriveResponse>, Status> {
        let caller = auth::caller(&self.runtime, &request)?;
        let req = request.into_inner();
        let info = self.mailbox(&caller, &req.mailbox).await?;
        let mut by_shard: std::collections::BTreeMap<u32, Vec<Position>> = Default::default();
        if !req.all {
            if req.positions.is_empty() {
                return Err(Status::invalid_argument("name the dead-letter positions to redrive, or ask for all"));
            }
            for p in &req.positions {
                if !is_dead_letter(p.partition) {
                    return Err(Status::invalid_argument(format!(
                        "position {}:{} is not in the dead-letter queue (its partitions have the top bit set)",
                        p.partition, p.sequence
                    )));
                }
                let shard = info
                    .shard_of_any(p.partition)
                    .ok_or_else(|| Status::invalid_argument(format!("partition {} does not exist", p.partition)))?;
                by_shard.entry(shard).or_default().push(Position { partition: p.partition, sequence: p.sequence });
            }
        }
        let mut redriven = 0;
        if req.all {
            // Page through each shard's dead letters until none are left to move.
            for (shard, partitions) in info.partitions_by_shard() {
                let partitions: Vec<u32> = partitions.into_iter().map(dead_letter_partition).collect();
                loop {
                    let query = ReadQuery::DeadLetters { mailbox: info.id, partitions: partitions.clone(), limit: REDRIVE_PAGE };
                    let ReadAnswer::DeadLetters(found) = self.runtime.read(shard, query).await.map_err(to_status)? else {
                        return Err(Status::internal("unexpected answer to a dead-letter listing"));
                    };
                    let positions: Vec<Position> = found.into_iter().map(|d| d.position).collect();
                    let moved = self.redrive(shard, info.id, positions).await?;
                    redriven += moved;
                    if moved == 0 {
                        break;
                    }
                }
            }
        } else {
            for (shard, positions) in by_shard {
                for page in positions.chunks(REDRIVE_PAGE as usize) {
                    redriven += self.redrive(shard, info.id, page.to_vec()).await?;
                }
            }
        }
        tracing::info!(mailbox = %info.service, redriven, "dead letters redriven");
        Ok(Response::new(pb::RedriveResponse { redriven }))
    }

    async fn cluster_status(&self, request: Request<pb::ClusterStatusRequest>) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let caller = auth::caller(&self.runtime, &request)?;
        auth::authorize(&self.runtime, &caller, Action::Discover).await?;
        let map = self.runtime.cluster_map().await;
        let (replicas, leaders) = (map.replica_counts(), map.leader_counts());
        let mut nodes: Vec<pb::NodeInfo> = map
            .nodes
            .values()
            .map(|n| pb::NodeInfo {
                id: n.id,
                address: n.address.clone(),
                state: n.state.as_str().to_owned(),
                zone: n.zone.clone(),
                replicas: replicas.get(&n.id).copied().unwrap_or(0) as u32,
                leaders: leaders.get(&n.id).copied().unwrap_or(0) as u32,
                reachable: map.reachable.contains(&n.id),
                client_address: n.client_address.clone(),
            })
            .collect();
        // Configured peers that have not registered yet (a cluster still starting).
        for (id, address) in self.runtime.peers.addresses() {
            if !map.nodes.contains_key(&id) {
                let count = |c: &std::collections::BTreeMap<u64, usize>| c.get(&id).copied().unwrap_or(0) as u32;
                nodes.push(pb::NodeInfo {
                    id,
                    address,
                    state: "unregistered".into(),
                    zone: None,
                    replicas: count(&replicas),
                    leaders: count(&leaders),
                    reachable: map.reachable.contains(&id),
                    client_address: None,
                });
            }
        }
        nodes.sort_by_key(|n| n.id);
        let me = self.runtime.node_id();
        let groups = self
            .runtime
            .all_rafts()
            .map(|(group, raft)| {
                let m = raft.metrics().borrow().clone();
                let hosted = crate::runtime::hosts_per(&m, me);
                pb::GroupStatus {
                    group,
                    leader: m.current_leader,
                    term: m.current_term,
                    last_log_index: m.last_log_index.unwrap_or(0),
                    last_applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
                    voters: m.membership_config.membership().voter_ids().collect(),
                    local_role: if hosted { role(m.state) } else { "none" }.to_owned(),
                    snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
                    purged_index: m.purged.map(|l| l.index).unwrap_or(0),
                }
            })
            .collect();
        let replicas = map
            .groups
            .iter()
            .map(|s| pb::GroupReplicas {
                group: s.group,
                leader: s.leader,
                voters: s.voters.iter().copied().collect(),
                learners: s.learners.iter().copied().collect(),
                lag: s.lag.iter().map(|(n, l)| (*n, *l)).collect(),
            })
            .collect();
        let moves = map.moves.iter().map(ToString::to_string).collect();
        let replication_factor = u32::try_from(self.runtime.config.replication_factor).unwrap_or(u32::MAX);
        Ok(Response::new(pb::ClusterStatusResponse { node_id: me, nodes, groups, replicas, moves, replication_factor }))
    }

    async fn join_node(&self, request: Request<pb::JoinNodeRequest>) -> Result<Response<pb::NodeChangeResponse>, Status> {
        let caller = auth::caller(&self.runtime, &request)?;
        auth::authorize(&self.runtime, &caller, Action::Administer).await?;
        let req = request.into_inner();
        self.runtime.register_node(req.id, req.address, req.zone, true).await.map_err(to_status)?;
        tracing::info!(target: "kerwen::audit", caller = %caller, node = req.id, "node joined");
        Ok(Response::new(pb::NodeChangeResponse {}))
    }

    async fn drain_node(&self, request: Request<pb::DrainNodeRequest>) -> Result<Response<pb::NodeChangeResponse>, Status> {
        let caller = auth::caller(&self.runtime, &request)?;
        auth::authorize(&self.runtime, &caller, Action::Administer).await?;
        let id = request.into_inner().id;
        self.runtime.drain_node(id).await.map_err(to_status)?;
        tracing::info!(target: "kerwen::audit", caller = %caller, node = id, "node draining");
        Ok(Response::new(pb::NodeChangeResponse {}))
    }

    async fn remove_node(&self, request: Request<pb::RemoveNodeRequest>) -> Result<Response<pb::NodeChangeResponse>, Status> {
        let caller = auth::caller(&self.runtime, &request)?;
        auth::authorize(&self.runtime, &caller, Action::Administer).await?;
        let id = request.into_inner().id;
        self.runtime.remove_node(id).await.map_err(to_status)?;
        tracing::info!(target: "kerwen::audit", caller = %caller, node = id, "node removed");
        Ok(Response::new(pb::NodeChangeResponse {}))
    }

    async fn export_evidence(&self, request: Request<pb::ExportEvidenceRequest>) -> Result<Response<pb::ExportEvidenceResponse>, Status> {
        let caller = auth::caller(&self.runtime, &request)?;
        let req = request.into_inner();
        let info = self.mailbox(&caller, &req.mailbox).await?;
        let to = time_range_end(req.from_unix_ms, req.to_unix_ms, now_unix_ms())?;
        let archives = self.runtime.export_evidence(&info, req.from_unix_ms, to).await.map_err(to_status)?;
        let archives = archives
            .iter()
            .map(|a| serde_json::to_vec(a).map(Into::into))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::internal(format!("encoding an archive: {e}")))?;
        Ok(Response::new(pb::ExportEvidenceResponse { archives }))
    }

    async fn rotate_signing_key(&self, request: Request<pb::RotateSigningKeyRequest>) -> Result<Response<pb::RotateSigningKeyResponse>, Status> {
        let caller = auth::caller(&self.runtime, &request)?;
        auth::authorize(&self.runtime, &caller, Action::Administer).await?;
        let (retired_key_id, new_key_id) = crate::signing::rotate(&self.runtime).await.map_err(to_status)?;
        Ok(Response::new(pb::RotateSigningKeyResponse { node_id: self.runtime.node_id(), retired_key_id, new_key_id }))
    }

    async fn operational_data(&self, request: Request<pb::OperationalDataRequest>) -> Result<Response<pb::OperationalDataResponse>, Status> {
        let caller = auth::caller(&self.runtime, &request)?;
        // An operator sees every exchange; a subsystem those it took part in.
        let party = match &caller {
            Caller::Anonymous | Caller::Authenticated(Principal::Admin(_)) => None,
            Caller::Authenticated(Principal::Subsystem(s)) => Some(s.to_string()),
            Caller::Authenticated(node @ Principal::Node(_)) => {
                return Err(Status::permission_denied(format!("{node} may not query operational data")));
            }
        };
        let query = opmon_query(request.into_inner(), party)?;
        let (answer, unanswered) = self.runtime.opmon_cluster(&query).await;
        Ok(Response::new(pb::OperationalDataResponse {
            records: answer.records.into_iter().map(to_proto_record).collect(),
            health: answer
                .health
                .into_iter()
                .map(|h| pb::ServiceHealth {
                    average_duration_ms: h.average_ms(),
                    service: h.service,
                    successes: h.successes,
                    failures: h.failures,
                    min_duration_ms: h.min_ms,
                    max_duration_ms: h.max_ms,
                    last_success_unix_ms: h.last_success_unix_ms,
                    last_failure_unix_ms: h.last_failure_unix_ms,
                })
                .collect(),
            truncated: answer.truncated,
            unanswered,
        }))
    }
}

/// The end of a `[from, to]` time range a request names (`to` = 0: `open_end`), refused when
/// it ends before it starts.
fn time_range_end(from_unix_ms: i64, to_unix_ms: i64, open_end: i64) -> Result<i64, Status> {
    let to = if to_unix_ms == 0 { open_end } else { to_unix_ms };
    if to < from_unix_ms {
        return Err(Status::invalid_argument(format!("the range ends ({to}) before it starts ({from_unix_ms})")));
    }
    Ok(to)
}

/// Checks an operational-data request and makes it a query scoped to `party`.
fn opmon_query(req: pb::OperationalDataRequest, party: Option<String>) -> Result<OpmonQuery, Status> {
    let kind = match req.kind.as_str() {
        "" => None,
        k => Some(ExchangeKind::parse(k).ok_or_else(|| Status::invalid_argument(format!("kind must be publish, deliver or ack, not {k:?}")))?),
    };
    // Unbounded rather than now: another node's clock may run a little ahead of this one's.
    let to_unix_ms = time_range_end(req.from_unix_ms, req.to_unix_ms, i64::MAX)?;
    let limit = match req.limit as usize {
        0 => opmon::DEFAULT_QUERY_LIMIT,
        n if n > opmon::MAX_QUERY_LIMIT => {
            return Err(Status::invalid_argument(format!("limit must be at most {}", opmon::MAX_QUERY_LIMIT)));
        }
        n => n,
    };
    Ok(OpmonQuery {
        from_unix_ms: req.from_unix_ms,
        to_unix_ms,
        kind,
        sender: req.sender,
        recipient: req.recipient,
        message_id: req.message_id,
        failed_only: req.failed_only,
        party,
        limit,
    })
}

fn to_proto_record(r: OpRecord) -> pb::OperationalRecord {
    pb::OperationalRecord {
        kind: r.kind.as_str().to_owned(),
        node: r.node,
        at_unix_ms: r.at_unix_ms,
        succeeded: r.succeeded(),
        client: r.client,
        sender: r.sender,
        recipient: r.recipient,
        message_id: r.message_id,
        payload_bytes: r.payload_bytes,
        accepted_unix_ms: r.accepted_unix_ms,
        duration_ms: r.duration_ms,
        attempt: r.attempt,
        duplicate: r.duplicate,
        fault: r.fault.unwrap_or_default(),
    }
}
