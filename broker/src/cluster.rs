//! The cluster's nodes and where the replicas of each Raft group go.
//!
//! - [`NodeRecord`] / [`ClusterCommand`]: the node registry kept by the metadata group (each
//!   node registers its peer address itself; an operator drains and removes nodes).
//! - [`ReplicaSet`]: one group's members as its leader reports them.
//! - [`plan_moves`]: the placement planner. It is a pure function of the registry and the
//!   replica sets, so whichever node leads the metadata group computes the same plan: a move
//!   interrupted by the death of the node that coordinated it is either finished or rolled
//!   back by the next coordinator, never forgotten.
//!
//! A move adds a replica as a learner, lets it catch up (snapshot and log), then replaces the
//! old voter in one joint-consensus membership change; the replica removed is dropped from the
//! group entirely.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::model::{GroupId, NodeId, METADATA_GROUP};

/// What a node is doing in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Takes replicas.
    Active,
    /// Takes no new replicas; the ones it holds are moved away.
    Draining,
    /// Left the cluster (drained first). It is not re-admitted by registering again, only by
    /// an operator's `kerwen node join`.
    Removed,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Active => "active",
            NodeState::Draining => "draining",
            NodeState::Removed => "removed",
        }
    }
}

/// A node of the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    /// `host:port` of the node's peer (internal) port.
    pub address: String,
    /// Failure domain (a Kubernetes zone, a rack): replicas of one group go to distinct zones
    /// when the nodes carry one.
    pub zone: Option<String>,
    pub state: NodeState,
    /// `host:port` of the node's client API as the node advertises it: clients that cache
    /// the shard map send there directly. `None` until the node has advertised it.
    pub client_address: Option<String>,
}

/// [`NodeRecord`] as written before nodes advertised a client address: registry records are
/// bincode, which has no optional trailing fields, so older records are read with this.
#[derive(Debug, Clone, Deserialize)]
pub struct NodeRecordV1 {
    pub id: NodeId,
    pub address: String,
    pub zone: Option<String>,
    pub state: NodeState,
}

impl From<NodeRecordV1> for NodeRecord {
    fn from(v1: NodeRecordV1) -> Self {
        Self { id: v1.id, address: v1.address, zone: v1.zone, state: v1.state, client_address: None }
    }
}

/// A change to the node registry (metadata group).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterCommand {
    /// A node announces its address (on every start). `admit` (an operator's join) also
    /// re-admits a removed node; without it a removed node stays removed. A draining node
    /// stays draining.
    Register { id: NodeId, address: String, zone: Option<String>, admit: bool },
    /// An operator drains a node, or re-activates a draining one.
    SetState { id: NodeId, state: NodeState },
    /// A registered node announces where clients reach it (on start, when it changed).
    Advertise { id: NodeId, client_address: String },
}

/// One Raft group's members, as its leader reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaSet {
    pub group: GroupId,
    pub leader: NodeId,
    pub voters: BTreeSet<NodeId>,
    /// Members that receive the log but do not vote: replicas being added.
    pub learners: BTreeSet<NodeId>,
    /// Log entries each member (the leader excepted) is behind the leader; a member the
    /// leader has not heard from is missing.
    pub lag: BTreeMap<NodeId, u64>,
}

impl ReplicaSet {
    pub fn members(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.voters.iter().chain(self.learners.iter()).copied()
    }

    fn contains(&self, node: NodeId) -> bool {
        self.voters.contains(&node) || self.learners.contains(&node)
    }
}

/// One membership change of one group, carried out by the group's leader: `add` joins as a
/// learner, catches up and (with `voter`) becomes a voter while `remove` leaves, in one joint
/// change. Either may be absent (a replica added to an under-replicated group; a stray learner
/// dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub group: GroupId,
    pub add: Option<NodeId>,
    pub remove: Option<NodeId>,
    /// `add` becomes a voter; `false` only for the metadata group's learners.
    pub voter: bool,
}

impl Move {
    pub fn replace(group: GroupId, add: NodeId, remove: NodeId) -> Self {
        Self { group, add: Some(add), remove: Some(remove), voter: true }
    }

    pub fn add(group: GroupId, add: NodeId) -> Self {
        Self { group, add: Some(add), remove: None, voter: true }
    }

    pub fn remove(group: GroupId, remove: NodeId) -> Self {
        Self { group, add: None, remove: Some(remove), voter: true }
    }
}

impl std::fmt::Display for Move {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "group {}:", self.group)?;
        match self.add {
            Some(add) if self.voter => write!(f, " add node {add}")?,
            Some(add) => write!(f, " add node {add} as a learner")?,
            None => {}
        }
        if let Some(remove) = self.remove {
            write!(f, " remove node {remove}")?;
        }
        Ok(())
    }
}

/// What the planner needs to know.
pub struct PlanInput<'a> {
    pub nodes: &'a BTreeMap<NodeId, NodeRecord>,
    pub groups: &'a [ReplicaSet],
    /// Replicas per group wanted (fewer when fewer nodes are active).
    pub replication_factor: usize,
    /// Nodes that answered the coordinator this round: only they receive new replicas.
    pub reachable: &'a BTreeSet<NodeId>,
    /// Groups with a move in flight: left alone.
    pub busy: &'a BTreeSet<GroupId>,
    /// Most moves to return.
    pub max_moves: usize,
}

/// The next moves towards a placement where every group has `replication_factor` voters on
/// distinct active nodes (distinct zones where possible), no replica on a draining or removed
/// node, and replica counts per active node differing by at most one. At most one move per
/// group; deterministic for the same input.
pub fn plan_moves(input: &PlanInput<'_>) -> Vec<Move> {
    let active: Vec<NodeId> = input.nodes.values().filter(|n| n.state == NodeState::Active).map(|n| n.id).collect();
    let leaving = |node: NodeId| input.nodes.get(&node).is_some_and(|n| n.state != NodeState::Active);
    let usable = |node: NodeId| {
        input.nodes.get(&node).is_some_and(|n| n.state == NodeState::Active) && input.reachable.contains(&node)
    };
    // Draining nodes count: a drain never takes a group below its replication factor, it
    // waits for a node to move the replicas to.
    let staying = input.nodes.values().filter(|n| n.state != NodeState::Removed).count();
    let wanted = input.replication_factor.min(staying).max(1);
    // Replicas per active node, counting learners being added (where they will end up).
    let mut load: BTreeMap<NodeId, usize> = active.iter().map(|n| (*n, 0)).collect();
    for set in input.groups {
        for node in set.members() {
            if let Some(count) = load.get_mut(&node) {
                *count += 1;
            }
        }
    }
    let zone = |node: NodeId| input.nodes.get(&node).and_then(|n| n.zone.clone());
    // The best node to receive a replica of `set`: usable, not yet a member, in a zone the
    // group does not use if there is one, then the least loaded, then the lowest id.
    let destination = |set: &ReplicaSet, load: &BTreeMap<NodeId, usize>, excluding: Option<NodeId>| -> Option<NodeId> {
        let zones: BTreeSet<Option<String>> =
            set.members().filter(|m| Some(*m) != excluding).filter_map(|m| zone(m).map(Some)).collect();
        load.iter()
            .filter(|(node, _)| usable(**node) && !set.contains(**node))
            .min_by_key(|(node, count)| (zone(**node).is_some() && zones.contains(&zone(**node)), **count, **node))
            .map(|(node, _)| *node)
    };

    let mut moves = Vec::new();
    let mut planned: BTreeSet<GroupId> = input.busy.clone();
    // The metadata group is planned on its own (below); the data steps leave it alone.
    planned.insert(METADATA_GROUP);
    let plan = |m: Move, load: &mut BTreeMap<NodeId, usize>, moves: &mut Vec<Move>, planned: &mut BTreeSet<GroupId>| {
        if let Some(add) = m.add {
            *load.entry(add).or_default() += 1;
        }
        if let Some(remove) = m.remove {
            if let Some(count) = load.get_mut(&remove) {
                *count = count.saturating_sub(1);
            }
        }
        planned.insert(m.group);
        moves.push(m);
    };

    // 1. Learners left by an interrupted move: finish the move if it is still wanted, else
    //    drop the learner (roll back).
    for set in input.groups {
        if moves.len() >= input.max_moves {
            return moves;
        }
        let Some(&learner) = set.learners.iter().next() else { continue };
        if planned.contains(&set.group) {
            continue;
        }
        let replaced = set.voters.iter().copied().find(|v| leaving(*v)).or_else(|| {
            // A balancing move: the voter on the most loaded node, if that is worth it.
            let heaviest = set.voters.iter().copied().filter(|v| load.contains_key(v)).max_by_key(|v| (load[v], *v))?;
            (load[&heaviest] > load.get(&learner).copied().unwrap_or(0)).then_some(heaviest)
        });
        let m = if !usable(learner) {
            Move::remove(set.group, learner)
        } else if set.voters.len() < wanted {
            Move::add(set.group, learner)
        } else if let Some(replaced) = replaced {
            Move::replace(set.group, learner, replaced)
        } else {
            Move::remove(set.group, learner)
        };
        // The learner is already counted where it is.
        if let Some(count) = load.get_mut(&learner) {
            *count = count.saturating_sub(1);
        }
        plan(m, &mut load, &mut moves, &mut planned);
    }

    // 2. Replicas on draining or removed nodes move to a usable node.
    for set in input.groups {
        if moves.len() >= input.max_moves {
            return moves;
        }
        if planned.contains(&set.group) {
            continue;
        }
        let Some(from) = set.voters.iter().copied().find(|v| leaving(*v)) else { continue };
        if let Some(to) = destination(set, &load, Some(from)) {
            plan(Move::replace(set.group, to, from), &mut load, &mut moves, &mut planned);
        } else if set.voters.len() > wanted {
            plan(Move::remove(set.group, from), &mut load, &mut moves, &mut planned);
        } else {
            // Nowhere to go: mark the group so no balancing move touches it meanwhile.
            planned.insert(set.group);
        }
    }

    // 3. Too few or too many voters.
    for set in input.groups {
        if moves.len() >= input.max_moves {
            return moves;
        }
        if planned.contains(&set.group) {
            continue;
        }
        if set.voters.len() < wanted {
            if let Some(to) = destination(set, &load, None) {
                plan(Move::add(set.group, to), &mut load, &mut moves, &mut planned);
            }
        } else if set.voters.len() > wanted {
            let heaviest = set.voters.iter().copied().max_by_key(|v| (load.get(v).copied().unwrap_or(usize::MAX), *v));
            if let Some(from) = heaviest {
                plan(Move::remove(set.group, from), &mut load, &mut moves, &mut planned);
            }
        }
    }

    // 4. The metadata group: `wanted` voters, and every other active node a learner, so every
    //    node reads the registry, mailboxes and access rights locally.
    if moves.len() < input.max_moves && !input.busy.contains(&METADATA_GROUP) {
        if let Some(set) = input.groups.iter().find(|s| s.group == METADATA_GROUP) {
            if let Some(m) = plan_metadata(set, wanted, &active, &usable, &leaving) {
                moves.push(m);
            }
        }
    }

    // 5. Balance: move a replica from the most to the least loaded node while they differ by
    //    more than one. Groups the heavy node does not lead go first (no leader change).
    while moves.len() < input.max_moves {
        let Some((&heavy, &high)) = load.iter().max_by_key(|(node, count)| (**count, std::cmp::Reverse(**node))) else { break };
        let light = load.iter().filter(|(node, _)| usable(**node)).min_by_key(|(node, count)| (**count, **node));
        let Some((&light, &low)) = light else { break };
        if high <= low + 1 {
            break;
        }
        let candidates = input.groups.iter().filter(|s| {
            !planned.contains(&s.group) && s.voters.contains(&heavy) && !s.contains(light) && {
                // Keep zones distinct if the move would otherwise break that.
                let others: BTreeSet<Option<String>> = s.members().filter(|m| *m != heavy).map(zone).collect();
                zone(light).is_none() || !others.contains(&zone(light))
            }
        });
        let Some(set) = candidates.min_by_key(|s| (s.leader == heavy, s.group)) else { break };
        plan(Move::replace(set.group, light, heavy), &mut load, &mut moves, &mut planned);
    }
    moves
}

/// The next change of the metadata group: a voter on a leaving node replaced by a learner
/// (caught up already), a missing voter promoted, a learner added on every usable node that
/// lacks one, learners on leaving nodes dropped.
fn plan_metadata(
    set: &ReplicaSet,
    wanted: usize,
    active: &[NodeId],
    usable: &dyn Fn(NodeId) -> bool,
    leaving: &dyn Fn(NodeId) -> bool,
) -> Option<Move> {
    let group = set.group;
    let promotable = set.learners.iter().copied().find(|l| usable(*l));
    if let Some(from) = set.voters.iter().copied().find(|v| leaving(*v)) {
        if let Some(to) = promotable {
            return Some(Move::replace(group, to, from));
        }
    }
    if set.voters.len() < wanted {
        if let Some(to) = promotable {
            return Some(Move::add(group, to));
        }
    }
    if let Some(stale) = set.learners.iter().copied().find(|l| leaving(*l)) {
        return Some(Move::remove(group, stale));
    }
    let missing = active.iter().copied().find(|n| usable(*n) && !set.contains(*n))?;
    Some(Move { group, add: Some(missing), remove: None, voter: set.voters.len() < wanted })
}

/// A leadership handover that evens out leaders: from the node leading the most groups to
/// the voter of one of them leading the fewest, when the two differ by more than one. Only
/// active, reachable nodes receive leadership; `None` when leaders are balanced.
pub fn plan_leader_transfer(
    nodes: &BTreeMap<NodeId, NodeRecord>,
    groups: &[ReplicaSet],
    reachable: &BTreeSet<NodeId>,
) -> Option<(GroupId, NodeId, NodeId)> {
    let eligible = |n: NodeId| nodes.get(&n).is_some_and(|r| r.state == NodeState::Active) && reachable.contains(&n);
    let mut leads: BTreeMap<NodeId, usize> = nodes.keys().copied().filter(|n| eligible(*n)).map(|n| (n, 0)).collect();
    for set in groups {
        *leads.entry(set.leader).or_default() += 1;
    }
    // Of every (group, voter) pair, the one whose leader leads the most more than the voter.
    groups
        .iter()
        .flat_map(|s| s.voters.iter().map(move |v| (s, *v)))
        .filter(|(s, v)| *v != s.leader && eligible(*v))
        .filter_map(|(s, v)| {
            let (from, to) = (leads.get(&s.leader).copied().unwrap_or(0), leads[&v]);
            (from >= to + 2).then_some((from - to, std::cmp::Reverse(to), std::cmp::Reverse(s.group), s.group, s.leader, v))
        })
        .max()
        .map(|(_, _, _, group, from, to)| (group, from, to))
}

/// Replicas per node over `groups` (voters and learners), every node of `nodes` included.
pub fn replica_counts(nodes: impl IntoIterator<Item = NodeId>, groups: &[ReplicaSet]) -> BTreeMap<NodeId, usize> {
    let mut counts: BTreeMap<NodeId, usize> = nodes.into_iter().map(|n| (n, 0)).collect();
    for set in groups {
        for node in set.members() {
            *counts.entry(node).or_default() += 1;
        }
    }
    counts
}

/// The voters a new cluster gives `group`: `replication_factor` consecutive nodes (in id
/// order) starting at the group's first leader, so replicas and leaders start spread.
pub fn initial_voters(group: GroupId, nodes: &[NodeId], replication_factor: usize) -> Vec<NodeId> {
    if nodes.is_empty() {
        return Vec::new();
    }
    let start = group as usize % nodes.len();
    (0..replication_factor.clamp(1, nodes.len())).map(|i| nodes[(start + i) % nodes.len()]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(ids: &[NodeId]) -> BTreeMap<NodeId, NodeRecord> {
        ids.iter()
            .map(|id| (*id, NodeRecord { id: *id, address: format!("n{id}:1"), zone: None, state: NodeState::Active, client_address: None }))
            .collect()
    }

    fn cluster(groups: u32, voters: &[NodeId]) -> Vec<ReplicaSet> {
        (0..groups)
            .map(|g| ReplicaSet {
                group: g,
                leader: voters[0],
                voters: voters.iter().copied().collect(),
                learners: BTreeSet::new(),
                lag: BTreeMap::new(),
            })
            .collect()
    }

    /// Applies moves as the group leaders would.
    fn apply(groups: &mut [ReplicaSet], moves: &[Move]) {
        for m in moves {
            let set = groups.iter_mut().find(|s| s.group == m.group).expect("group");
            if let Some(add) = m.add {
                set.learners.remove(&add);
                if m.voter {
                    set.voters.insert(add);
                } else {
                    set.learners.insert(add);
                }
            }
            if let Some(remove) = m.remove {
                set.voters.remove(&remove);
                set.learners.remove(&remove);
                if set.leader == remove {
                    set.leader = *set.voters.iter().next().expect("a voter");
                }
            }
        }
    }

    /// Plans and applies until nothing is left to do; returns the rounds taken.
    fn converge(registry: &BTreeMap<NodeId, NodeRecord>, groups: &mut [ReplicaSet]) -> usize {
        let reachable: BTreeSet<NodeId> = registry.keys().copied().collect();
        for round in 0..1_000 {
            let input = PlanInput { nodes: registry, groups, replication_factor: 3, reachable: &reachable, busy: &BTreeSet::new(), max_moves: 2 };
            let moves = plan_moves(&input);
            if moves.is_empty() {
                return round;
            }
            apply(groups, &moves);
        }
        panic!("no convergence: {groups:?}");
    }

    fn assert_balanced(registry: &BTreeMap<NodeId, NodeRecord>, groups: &[ReplicaSet]) {
        let active = registry.values().filter(|n| n.state == NodeState::Active).map(|n| n.id);
        let counts = replica_counts(active, groups);
        let counts: BTreeMap<_, _> = counts.into_iter().filter(|(n, _)| registry[n].state == NodeState::Active).collect();
        let (min, max) = (counts.values().min().unwrap(), counts.values().max().unwrap());
        assert!(max - min <= 1, "unbalanced: {counts:?}");
        for set in groups {
            assert_eq!(set.voters.len(), 3.min(counts.len()), "{set:?}");
            if set.group == METADATA_GROUP {
                // Every other active node follows the metadata group as a learner.
                assert_eq!(set.voters.len() + set.learners.len(), counts.len(), "{set:?}");
            } else {
                assert!(set.learners.is_empty(), "{set:?}");
            }
            assert!(set.voters.iter().all(|v| registry[v].state == NodeState::Active), "{set:?}");
        }
    }

    #[test]
    fn growing_from_three_to_five_nodes_balances_replicas() {
        let registry = nodes(&[1, 2, 3, 4, 5]);
        let mut groups = cluster(9, &[1, 2, 3]);
        converge(&registry, &mut groups);
        assert_balanced(&registry, &groups);
    }

    #[test]
    fn draining_moves_every_replica_off_the_node() {
        let mut registry = nodes(&[1, 2, 3, 4]);
        let mut groups = cluster(8, &[1, 2, 3]);
        converge(&registry, &mut groups);
        registry.get_mut(&2).unwrap().state = NodeState::Draining;
        converge(&registry, &mut groups);
        assert_balanced(&registry, &groups);
        assert!(groups.iter().all(|s| !s.voters.contains(&2)));
    }

    #[test]
    fn a_drain_without_a_destination_waits() {
        let mut registry = nodes(&[1, 2, 3]);
        registry.get_mut(&3).unwrap().state = NodeState::Draining;
        let groups = cluster(2, &[1, 2, 3]);
        let reachable = registry.keys().copied().collect();
        let input = PlanInput { nodes: &registry, groups: &groups, replication_factor: 3, reachable: &reachable, busy: &BTreeSet::new(), max_moves: 4 };
        assert_eq!(plan_moves(&input), vec![], "no replica is dropped below the replication factor");
    }

    #[test]
    fn an_interrupted_move_is_finished_or_rolled_back() {
        let registry = nodes(&[1, 2, 3, 4]);
        let mut groups = cluster(4, &[1, 2, 3]);
        groups[1].learners.insert(4);
        let reachable: BTreeSet<NodeId> = registry.keys().copied().collect();
        let input = PlanInput { nodes: &registry, groups: &groups, replication_factor: 3, reachable: &reachable, busy: &BTreeSet::new(), max_moves: 1 };
        let moves = plan_moves(&input);
        assert_eq!(moves, vec![Move::replace(1, 4, 3)], "the learner is promoted");
        // An unreachable learner is dropped instead.
        let reachable: BTreeSet<NodeId> = [1, 2, 3].into();
        let input = PlanInput { reachable: &reachable, ..input };
        assert_eq!(plan_moves(&input), vec![Move::remove(1, 4)]);
    }

    #[test]
    fn zones_stay_distinct_and_busy_groups_are_left_alone() {
        let mut registry = nodes(&[1, 2, 3, 4]);
        for (id, zone) in [(1, "a"), (2, "b"), (3, "c"), (4, "a")] {
            registry.get_mut(&id).unwrap().zone = Some(zone.into());
        }
        let mut groups = cluster(6, &[1, 2, 3]);
        converge(&registry, &mut groups);
        for set in &groups {
            let zones: BTreeSet<_> = set.voters.iter().map(|v| registry[v].zone.clone()).collect();
            assert_eq!(zones.len(), 3, "{set:?}");
        }
        let reachable: BTreeSet<NodeId> = registry.keys().copied().collect();
        let busy: BTreeSet<GroupId> = groups.iter().map(|s| s.group).collect();
        registry.get_mut(&2).unwrap().state = NodeState::Draining;
        let input = PlanInput { nodes: &registry, groups: &groups, replication_factor: 3, reachable: &reachable, busy: &busy, max_moves: 4 };
        assert!(plan_moves(&input).is_empty());
    }

    #[test]
    fn leaders_move_from_the_busiest_node_to_the_idlest_voter() {
        let registry = nodes(&[1, 2, 3]);
        let reachable: BTreeSet<NodeId> = registry.keys().copied().collect();
        let mut groups = cluster(6, &[1, 2, 3]);
        let mut handovers = 0;
        while let Some((group, from, to)) = plan_leader_transfer(&registry, &groups, &reachable) {
            let set = groups.iter_mut().find(|s| s.group == group).unwrap();
            assert_eq!(set.leader, from);
            set.leader = to;
            handovers += 1;
            assert!(handovers < 10, "no convergence");
        }
        let mut leads = BTreeMap::new();
        for set in &groups {
            *leads.entry(set.leader).or_insert(0) += 1;
        }
        assert_eq!(leads, BTreeMap::from([(1, 2), (2, 2), (3, 2)]));
        // An unreachable voter gets nothing.
        let groups = cluster(6, &[1, 2, 3]);
        let reachable: BTreeSet<NodeId> = [1, 2].into();
        let (_, from, to) = plan_leader_transfer(&registry, &groups, &reachable).expect("a handover");
        assert_eq!((from, to), (1, 2));
    }

    #[test]
    fn initial_voters_rotate_over_the_nodes() {
        assert_eq!(initial_voters(0, &[1, 2, 3], 3), vec![1, 2, 3]);
        assert_eq!(initial_voters(4, &[1, 2, 3, 4, 5], 3), vec![5, 1, 2]);
        assert_eq!(initial_voters(1, &[7], 3), vec![7]);
    }
}
