//! Cluster membership on a node: the node registry, replica placement and moves.
//!
//! - **Registry.** Every node registers its peer address in the metadata group at start
//!   (`ClusterCommand::Register`), and learns the other nodes' addresses from it, so a node
//!   that joins later is reachable by nodes started before it.
//! - **Where replicas are.** Each group's leader knows the group's members; the `Placement`
//!   peer call asks a node for the replica sets of the groups it leads, and for the leader of
//!   a group it hosts (a node that hosts no replica of a group forwards through that answer).
//! - **Coordinator.** The node leading the metadata group plans moves with
//!   [`kerwen_broker::cluster::plan_moves`] every `COORDINATOR_INTERVAL` and has each
//!   group's leader carry them out (at most `MAX_CONCURRENT_MOVES` at a time, so moves do not
//!   starve client traffic). Nothing about a move is kept but the group's own membership: a
//!   new coordinator sees a half-done move as a learner and finishes or drops it.
//! - **Operators** join, drain and remove nodes through `Admin` (`kerwen node ...`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use kerwen_broker::cluster::{plan_leader_transfer, plan_moves, replica_counts, ClusterCommand, Move, NodeRecord, NodeState, PlanInput, ReplicaSet};
use kerwen_broker::model::{Command, CommandResult, GroupId, NodeId, METADATA_GROUP};
use kerwen_broker::BrokerError;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::runtime::{hosts_per, leads_per, matched_per, own_leader_view_per, NodeRuntime};
use crate::transport::PeerMethod;

/// How often the coordinator looks for moves to make.
const COORDINATOR_INTERVAL: Duration = Duration::from_secs(2);
/// Moves in flight at once, cluster-wide: each streams a snapshot and log to a new replica.
const MAX_CONCURRENT_MOVES: usize = 2;
/// Longest a new replica may take to catch up before its move is abandoned (and retried).
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest a handover of leadership may take before it is called off.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a follower holds its elections for a handover.
const HOLD_LIMIT: Duration = Duration::from_secs(15);
/// How long a leaving voter gets to learn it is one no more (see `execute_move`).
const RETIRE_WAIT: Duration = Duration::from_secs(10);
/// A learner this close to the leader's log counts as caught up.
const CATCH_UP_SLACK_ENTRIES: u64 = 64;
/// Bound on one node's answer to a placement question.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);
/// Interval of the registration check (a node re-registers if its record is missing or stale).
const REGISTRATION_INTERVAL: Duration = Duration::from_secs(5);
/// Written into the data directory once the node belongs to a cluster (formed or joined):
/// from then on it never initializes a group again, whatever `--peers` says.
pub const MEMBER_MARKER: &str = "cluster-member";

/// A question to a node about placement (the `Peer.Placement` call).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PlacementRequest {
    /// The leader of the call's group, if the node hosts a replica of it.
    Leader,
    /// The replica sets of the groups the node leads.
    Replicas,
    /// Carry out a move of a group the node leads; `address` is the added node's.
    Move { step: Move, address: Option<String> },
    /// Hand the leadership of a group the node leads to voter `to`.
    HandOver { to: NodeId },
    /// Do not campaign in the group (for at most `HOLD_LIMIT`) while its leader hands over,
    /// or campaign again (`hold: false`).
    HoldElections { hold: bool },
    /// Campaign in the group now (the target of a handover, once the leader's lease ran out).
    Campaign,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PlacementAnswer {
    Leader(Option<NodeId>),
    Replicas(Vec<ReplicaSet>),
    Moved,
    /// Who leads the group after a handover (the target, unless an election went otherwise).
    HandedOver(Option<NodeId>),
    Held,
}

/// What `kerwen status` shows of the cluster: the registry, every group's replicas as their
/// leaders report them, and the nodes that did not answer.
#[derive(Debug, Clone, Default)]
pub struct ClusterMap {
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    pub groups: Vec<ReplicaSet>,
    pub reachable: BTreeSet<NodeId>,
    /// Moves the answering node coordinates right now.
    pub moves: Vec<Move>,
}

impl ClusterMap {
    /// Replicas per node (voters and learners).
    pub fn replica_counts(&self) -> BTreeMap<NodeId, usize> {
        replica_counts(self.nodes.keys().copied(), &self.groups)
    }

    /// Groups led per node.
    pub fn leader_counts(&self) -> BTreeMap<NodeId, usize> {
        let mut counts: BTreeMap<NodeId, usize> = self.nodes.keys().map(|n| (*n, 0)).collect();
        for set in &self.groups {
            *counts.entry(set.leader).or_default() += 1;
        }
        counts
    }
}

impl NodeRuntime {
    /// The replica set of `group` if this node leads it.
    fn replica_set(&self, group: GroupId) -> Option<ReplicaSet> {
        let raft = self.raft(group).ok()?;
        let metrics = raft.metrics();
        let m = metrics.borrow();
        if !leads_per(&m, self.node_id()) {
            return None;
        }
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners = membership.learner_ids().filter(|l| !voters.contains(l)).collect();
        let last = m.last_log_index.unwrap_or(0);
        let lag = m
            .replication
            .iter()
            .flatten()
            .filter_map(|(node, matched)| matched.map(|l| (*node, last.saturating_sub(l.index))))
            .collect();
        Some(ReplicaSet { group, leader: self.node_id(), voters, learners, lag })
    }

    /// The replica sets of every group this node leads.
    fn led_replica_sets(&self) -> Vec<ReplicaSet> {
        self.all_rafts().filter_map(|(group, _)| self.replica_set(group)).collect()
    }

    /// Asks `node` a placement question about `group`, answered here when it is this node.
    async fn ask(self: &Arc<Self>, node: NodeId, group: GroupId, request: PlacementRequest, timeout: Duration) -> Result<PlacementAnswer, BrokerError> {
        if node == self.node_id() {
            return Box::pin(self.placement_local(group, request)).await;
        }
        self.peers.call(node, group, PeerMethod::Placement, &request, timeout).await
    }

    /// Answers a placement question from another node.
    pub async fn placement_local(self: &Arc<Self>, group: GroupId, request: PlacementRequest) -> Result<PlacementAnswer, BrokerError> {
        match request {
            PlacementRequest::Leader => {
                let leader = self.raft(group).ok().and_then(|raft| own_leader_view_per(&raft.metrics().borrow(), self.node_id())).flatten();
                Ok(PlacementAnswer::Leader(leader))
            }
            PlacementRequest::Replicas => Ok(PlacementAnswer::Replicas(self.led_replica_sets())),
            PlacementRequest::Move { step, address } => {
                self.execute_move(step, address).await?;
                Ok(PlacementAnswer::Moved)
            }
            PlacementRequest::HandOver { to } => Ok(PlacementAnswer::HandedOver(self.hand_over(group, to).await?)),
            PlacementRequest::HoldElections { hold } => {
                self.hold_elections(group, hold)?;
                Ok(PlacementAnswer::Held)
            }
            PlacementRequest::Campaign => {
                self.raft(group)?.trigger().elect().await.map_err(|e| BrokerError::Unavailable(format!("group {group}: {e}")))?;
                Ok(PlacementAnswer::Held)
            }
        }
    }

    /// Hands the leadership of `group` (led here) to voter `to`. openraft 0.9 has no
    /// leadership transfer, so it is steered: the other voters hold their elections, this
    /// node stops heartbeats and refuses leader work, and the only timer left to fire is the
    /// target's. Everything is restored however it ends; holds also expire by themselves.
    async fn hand_over(self: &Arc<Self>, group: GroupId, to: NodeId) -> Result<Option<NodeId>, BrokerError> {
        let me = self.node_id();
        let set = self.replica_set(group).ok_or_else(|| BrokerError::NotLeader { group, leader: None })?;
        if to == me || !set.voters.contains(&to) {
            return Err(BrokerError::InvalidArgument(format!("group {group}: node {to} is not another voter")));
        }
        let others: Vec<NodeId> = set.voters.iter().copied().filter(|v| *v != me && *v != to).collect();
        let hold = |hold: bool| {
            let others = others.clone();
            async move {
                let calls = others.into_iter().map(|node| self.ask(node, group, PlacementRequest::HoldElections { hold }, ASK_TIMEOUT));
                futures::future::join_all(calls).await.into_iter().collect::<Result<Vec<_>, _>>()
            }
        };
        let raft = self.raft(group)?;
        let outcome = async {
            hold(true).await?;
            tracing::info!(group, to, "handing leadership over");
            // From now on `run_heartbeats` sends none for the group (`is_leaving`).
            self.handing_over.lock().unwrap_or_else(|p| p.into_inner()).insert(group);
            raft.runtime_config().elect(false);
            let deadline = Instant::now() + HANDOVER_TIMEOUT;
            // The followers refuse to vote while their lease on this leader lasts (openraft's
            // leader lease: the longest election timeout after the last heartbeat); the target
            // campaigns as soon as it has run out rather than when its own timer fires.
            tokio::time::sleep(self.leader_lease()).await;
            if let Err(e) = self.ask(to, group, PlacementRequest::Campaign, ASK_TIMEOUT).await {
                tracing::debug!(group, to, error = %e, "asking the handover's target to campaign failed; its own timer will");
            }
            loop {
                let leader = raft.metrics().borrow().current_leader;
                if leader.is_some_and(|l| l != me) || Instant::now() >= deadline {
                    return Ok(leader);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        .await;
        self.handing_over.lock().unwrap_or_else(|p| p.into_inner()).remove(&group);
        raft.runtime_config().elect(!self.is_draining());
        if let Err(e) = hold(false).await {
            tracing::debug!(group, error = %e, "releasing the election holds failed; they expire by themselves");
        }
        outcome
    }

    /// How long a follower keeps refusing votes after the leader's last heartbeat, plus a
    /// margin for the last heartbeat in flight.
    fn leader_lease(&self) -> Duration {
        Duration::from_millis(self.meta.raft.config().election_timeout_max) + Duration::from_millis(200)
    }

    /// Holds (or releases) this node's elections in `group`. A hold ends by itself after
    /// `HOLD_LIMIT`, so a leader that dies mid-handover leaves no follower unable to campaign.
    fn hold_elections(self: &Arc<Self>, group: GroupId, hold: bool) -> Result<(), BrokerError> {
        let raft = self.raft(group)?;
        let token = {
            let mut holds = self.election_holds.lock().unwrap_or_else(|p| p.into_inner());
            if hold {
                let token = holds.get(&group).map_or(1, |t| t + 1);
                holds.insert(group, token);
                Some(token)
            } else {
                holds.remove(&group);
                None
            }
        };
        raft.runtime_config().elect(!hold && !self.is_draining());
        if let Some(token) = token {
            let weak = Arc::downgrade(self);
            tokio::spawn(async move {
                tokio::time::sleep(HOLD_LIMIT).await;
                let Some(runtime) = weak.upgrade() else { return };
                let expired = {
                    let mut holds = runtime.election_holds.lock().unwrap_or_else(|p| p.into_inner());
                    let expired = holds.get(&group) == Some(&token);
                    if expired {
                        holds.remove(&group);
                    }
                    expired
                };
                if expired {
                    if let Ok(raft) = runtime.raft(group) {
                        raft.runtime_config().elect(!runtime.is_draining());
                    }
                }
            });
        }
        Ok(())
    }

    /// Asks the other nodes who leads `group` (for a group this node hosts no replica of).
    pub(crate) async fn discover_leader(&self, group: GroupId) -> Option<NodeId> {
        let me = self.node_id();
        let asks = self.peers.addresses().into_keys().filter(|n| *n != me).map(|node| async move {
            self.peers.call::<_, PlacementAnswer>(node, group, PeerMethod::Placement, &PlacementRequest::Leader, ASK_TIMEOUT).await
        });
        futures::future::join_all(asks).await.into_iter().find_map(|answer| match answer {
            Ok(PlacementAnswer::Leader(leader)) => leader,
            _ => None,
        })
    }

    /// Carries out `step` on the group this node leads: the added node becomes a learner and
    /// catches up, then one membership change makes it a voter and drops the removed one.
    /// Idempotent: a step already (partly) done is finished.
    async fn execute_move(&self, step: Move, address: Option<String>) -> Result<(), BrokerError> {
        let group = step.group;
        let raft = self.raft(group)?;
        let not_leader = || BrokerError::NotLeader { group, leader: raft.metrics().borrow().current_leader };
        if self.replica_set(group).is_none() {
            return Err(not_leader());
        }
        let write_error = |e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>| match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => BrokerError::NotLeader { group, leader: f.leader_id },
            other => BrokerError::Unavailable(format!("group {group}: membership change failed: {other}")),
        };
        if let Some(add) = step.add {
            let known = hosts_per(&raft.metrics().borrow(), add);
            if !known {
                let addr = address.or_else(|| self.peers.address(add)).ok_or_else(|| {
                    BrokerError::FailedPrecondition(format!("node {add} has no known address (is it registered?)"))
                })?;
                tracing::info!(group, node = add, "adding a replica as a learner");
                raft.add_learner(add, BasicNode { addr }, false).await.map_err(write_error)?;
            }
            let caught_up = |matched: u64, last: u64| matched + CATCH_UP_SLACK_ENTRIES >= last;
            if !self.wait_matched(group, add, CATCH_UP_TIMEOUT, caught_up).await? {
                return Err(BrokerError::Unavailable(format!("group {group}: node {add} did not catch up within {CATCH_UP_TIMEOUT:?}")));
            }
        }
        let Some(set) = self.replica_set(group) else { return Err(not_leader()) };
        let mut voters = set.voters.clone();
        if let (Some(add), true) = (step.add, step.voter) {
            voters.insert(add);
        }
        if let Some(remove) = step.remove {
            voters.remove(&remove);
        }
        if voters.is_empty() {
            return Err(BrokerError::FailedPrecondition(format!("group {group}: a move may not remove the last voter")));
        }
        if voters != set.voters {
            tracing::info!(group, ?voters, "changing the group's voters");
            // The voter leaving stays a learner until it has the configuration saying so: a
            // replica dropped at once may never learn it was removed, and would then campaign
            // (at ever higher terms) and unseat the group's leader again and again.
            let changed = raft.change_membership(ChangeMembers::ReplaceAllVoters(voters), true).await.map_err(write_error)?;
            if let Some(remove) = step.remove.filter(|r| set.voters.contains(r)) {
                let index = changed.log_id.index;
                if !self.wait_matched(group, remove, RETIRE_WAIT, |matched, _| matched >= index).await? {
                    // It may be down for good: go on.
                    tracing::warn!(group, node = remove, "the removed replica did not confirm its removal; dropping it anyway");
                }
            }
        }
        if let Some(remove) = step.remove {
            let is_learner = hosts_per(&raft.metrics().borrow(), remove);
            if is_learner {
                tracing::info!(group, node = remove, "dropping the replica");
                raft.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([remove])), false).await.map_err(write_error)?;
            }
        }
        Ok(())
    }

    /// Waits until `reached(matched, last)` holds for `node`'s matched index of `group`'s log
    /// and this leader's last index; `false` after `limit`, `NotLeader` once this node stops
    /// leading.
    async fn wait_matched(&self, group: GroupId, node: NodeId, limit: Duration, reached: impl Fn(u64, u64) -> bool) -> Result<bool, BrokerError> {
        let raft = self.raft(group)?;
        let deadline = Instant::now() + limit;
        loop {
            {
                let metrics = raft.metrics();
                let m = metrics.borrow();
                if !leads_per(&m, self.node_id()) {
                    return Err(BrokerError::NotLeader { group, leader: m.current_leader });
                }
                if matched_per(&m, node).is_some_and(|matched| reached(matched, m.last_log_index.unwrap_or(0))) {
                    return Ok(true);
                }
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The registry and every group's replicas, asked of every registered node at once.
    pub async fn cluster_map(&self) -> ClusterMap {
        let nodes = self.meta_view().nodes();
        let me = self.node_id();
        let mut ask: BTreeSet<NodeId> = nodes.values().filter(|n| n.state != NodeState::Removed).map(|n| n.id).collect();
        // Configured peers not registered (yet): a cluster still starting.
        ask.extend(self.peers.addresses().into_keys().filter(|n| !nodes.contains_key(n)));
        let asks = ask.into_iter().map(|node| async move {
            let answer = if node == me {
                Ok(PlacementAnswer::Replicas(self.led_replica_sets()))
            } else {
                self.peers.call(node, METADATA_GROUP, PeerMethod::Placement, &PlacementRequest::Replicas, ASK_TIMEOUT).await
            };
            (node, answer)
        });
        let mut map = ClusterMap { nodes, ..Default::default() };
        let mut seen = BTreeSet::new();
        for (node, answer) in futures::future::join_all(asks).await {
            if let Ok(PlacementAnswer::Replicas(sets)) = answer {
                map.reachable.insert(node);
                // Two nodes may both think they lead a group for a moment: keep the first.
                map.groups.extend(sets.into_iter().filter(|s| seen.insert(s.group)));
            }
        }
        map.groups.sort_by_key(|s| s.group);
        map.moves = self.moves_in_flight();
        map
    }

    /// Moves this node coordinates right now.
    pub fn moves_in_flight(&self) -> Vec<Move> {
        self.moves.lock().unwrap_or_else(|p| p.into_inner()).values().copied().collect()
    }

    /// Registers a node (an operator's join, or a node announcing itself).
    pub async fn register_node(&self, id: NodeId, address: String, zone: Option<String>, admit: bool) -> Result<(), BrokerError> {
        if id == 0 || address.trim().is_empty() {
            return Err(BrokerError::InvalidArgument("a node needs an id above 0 and a peer address".into()));
        }
        self.registry_write(ClusterCommand::Register { id, address, zone, admit }).await
    }

    /// Marks a node as draining: the coordinator moves every replica it holds away.
    pub async fn drain_node(&self, id: NodeId) -> Result<(), BrokerError> {
        self.registry_write(ClusterCommand::SetState { id, state: NodeState::Draining }).await
    }

    /// Removes a drained node from the registry; refused while it still holds replicas.
    pub async fn remove_node(&self, id: NodeId) -> Result<(), BrokerError> {
        let map = self.cluster_map().await;
        match map.nodes.get(&id).map(|n| n.state) {
            None => return Err(BrokerError::NotFound(format!("node {id} is not registered"))),
            Some(NodeState::Removed) => return Ok(()),
            Some(NodeState::Active) => {
                return Err(BrokerError::FailedPrecondition(format!("node {id} is active: drain it first (kerwen node drain {id})")))
            }
            Some(NodeState::Draining) => {}
        }
        let held = map.replica_counts().get(&id).copied().unwrap_or(0);
        let unanswered = map.groups.len() < self.all_rafts().count();
        if held > 0 || unanswered {
            return Err(BrokerError::FailedPrecondition(format!(
                "node {id} still holds {held} replicas{}; wait until the drain has moved them (kerwen status)",
                if unanswered { " (and some groups did not answer)" } else { "" }
            )));
        }
        self.registry_write(ClusterCommand::SetState { id, state: NodeState::Removed }).await
    }

    async fn registry_write(&self, cmd: ClusterCommand) -> Result<(), BrokerError> {
        match self.write(METADATA_GROUP, Command::Cluster(cmd)).await?.1 {
            CommandResult::Rejected(e) => Err(e),
            _ => Ok(()),
        }
    }
}

/// Starts the node's membership tasks: registering itself, learning peers' addresses, and
/// coordinating moves while it leads the metadata group.
pub fn spawn(runtime: &Arc<NodeRuntime>) {
    let weak = Arc::downgrade(runtime);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_registration: Option<Instant> = None;
        loop {
            tick.tick().await;
            let Some(runtime) = weak.upgrade() else { return };
            runtime.learn_peers();
            if last_registration.is_none_or(|at| at.elapsed() >= REGISTRATION_INTERVAL) {
                last_registration = Some(Instant::now());
                runtime.register_self().await;
            }
            // Every tick until it is in the registry: clients route by it.
            runtime.advertise_self().await;
        }
    });
    let weak = Arc::downgrade(runtime);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(COORDINATOR_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(runtime) = weak.upgrade() else { return };
            if runtime.is_draining() || !leads_per(&runtime.meta.raft.metrics().borrow(), runtime.node_id()) {
                continue;
            }
            runtime.coordinate().await;
        }
    });
}

impl NodeRuntime {
    /// Hands one group's leadership from the busiest node to an idle voter, if leaders are
    /// unbalanced (one handover per round: each costs the group a moment without a leader).
    async fn balance_leaders(self: &Arc<Self>, map: &ClusterMap) {
        let Some((group, from, to)) = plan_leader_transfer(&map.nodes, &map.groups, &map.reachable) else { return };
        tracing::info!(group, from, to, "balancing leaders");
        let request = PlacementRequest::HandOver { to };
        let result = self.ask(from, group, request, HANDOVER_TIMEOUT + ASK_TIMEOUT * 2).await;
        let outcome = match result {
            Ok(PlacementAnswer::HandedOver(Some(leader))) if leader == to => "done",
            Ok(answer) => {
                tracing::debug!(group, ?answer, "the handover ended elsewhere");
                "elsewhere"
            }
            Err(e) => {
                tracing::debug!(group, error = %e, "the handover failed");
                "failed"
            }
        };
        metrics::counter!("kerwen_leader_handovers_total", "outcome" => outcome).increment(1);
    }

    /// Adds the registry's addresses to the peer table (a node that joined after this one
    /// started is not in its `--peers`).
    fn learn_peers(&self) {
        for node in self.meta_view().nodes().into_values() {
            if node.id != self.node_id() && node.state != NodeState::Removed {
                self.peers.set_address(node.id, &node.address);
            }
        }
    }

    /// Registers this node if the registry lacks it or has another address for it.
    async fn register_self(&self) {
        let me = self.node_id();
        let Some(address) = self.config.peers.get(&me).cloned() else { return };
        let current = self.meta_view().node(me);
        if current.as_ref().is_some_and(|n| n.address == address && n.zone == self.config.zone) {
            return;
        }
        if current.as_ref().is_some_and(|n| n.state == NodeState::Removed) {
            return;
        }
        match self.register_node(me, address.clone(), self.config.zone.clone(), false).await {
            Ok(()) => tracing::info!(node = me, address, "registered in the cluster's node registry"),
            Err(e) => tracing::debug!(error = %e, "registering this node failed; retrying"),
        }
    }

    /// Publishes where clients reach this node, once it is registered and whenever it changed.
    async fn advertise_self(&self) {
        let me = self.node_id();
        let Some(client_address) = self.config.advertise_client.clone() else { return };
        match self.meta_view().node(me) {
            Some(n) if n.state != NodeState::Removed && n.client_address.as_ref() != Some(&client_address) => {}
            _ => return,
        }
        match self.registry_write(ClusterCommand::Advertise { id: me, client_address: client_address.clone() }).await {
            Ok(()) => tracing::info!(node = me, client_address, "advertised the client address"),
            Err(e) => tracing::debug!(error = %e, "advertising the client address failed; retrying"),
        }
    }

    /// One round of the coordinator: plan and start moves.
    async fn coordinate(self: &Arc<Self>) {
        let map = self.cluster_map().await;
        if map.nodes.is_empty() {
            return;
        }
        let busy: BTreeSet<GroupId> = self.moves.lock().unwrap_or_else(|p| p.into_inner()).keys().copied().collect();
        let input = PlanInput {
            nodes: &map.nodes,
            groups: &map.groups,
            replication_factor: self.config.replication_factor,
            reachable: &map.reachable,
            busy: &busy,
            max_moves: MAX_CONCURRENT_MOVES.saturating_sub(busy.len()),
        };
        let steps = plan_moves(&input);
        if steps.is_empty() && busy.is_empty() {
            self.balance_leaders(&map).await;
            return;
        }
        for step in steps {
            let Some(leader) = map.groups.iter().find(|s| s.group == step.group).map(|s| s.leader) else { continue };
            let address = step.add.and_then(|n| map.nodes.get(&n).map(|r| r.address.clone()));
            self.moves.lock().unwrap_or_else(|p| p.into_inner()).insert(step.group, step);
            metrics::gauge!("kerwen_shard_moves_in_progress").increment(1.0);
            tracing::info!(%step, leader, "starting a move");
            let runtime = self.clone();
            tokio::spawn(async move {
                let request = PlacementRequest::Move { step, address };
                let started = Instant::now();
                let result = runtime.ask(leader, step.group, request, CATCH_UP_TIMEOUT + runtime.config.request_timeout).await;
                let outcome = match &result {
                    Ok(_) => {
                        tracing::info!(%step, took_ms = started.elapsed().as_millis() as u64, "move done");
                        "done"
                    }
                    Err(e) => {
                        tracing::warn!(%step, error = %e, "move failed; the next round plans again");
                        "failed"
                    }
                };
                metrics::counter!("kerwen_shard_moves_total", "outcome" => outcome).increment(1);
                metrics::gauge!("kerwen_shard_moves_in_progress").decrement(1.0);
                runtime.moves.lock().unwrap_or_else(|p| p.into_inner()).remove(&step.group);
            });
        }
    }
}
