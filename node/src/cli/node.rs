//! `kerwen node`: add nodes to the cluster, drain them and remove them. Replicas move on
//! their own (the metadata leader's coordinator, `crate::placement`); these commands change
//! the node registry and, with `--wait`, follow the moves in `kerwen status`.
//!
//! `shrink N` is the scale-down step of an orchestrator (the Helm chart's pre-upgrade hook):
//! it removes every node above N, so it needs no memory of how many nodes there were, and a
//! second run finds nothing to do. It must talk to a node that stays: a drained node leaves
//! the metadata group too, so its view of the registry stops there (it would report nodes
//! drained after it as active, and itself as draining after it was removed).

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use kerwen_proto::v1 as pb;
use tokio::time::Instant;
use tonic::Code;

use super::{connect, status_error, ClientOpts};
use crate::client::Client;

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Register a node (started with `kerwen serve --join`, which does this itself) or
    /// re-admit a removed one. The cluster then moves replicas onto it.
    Join {
        id: u64,
        /// The node's peer address, host:port.
        address: String,
        /// Its failure domain (zone or rack).
        #[arg(long)]
        zone: Option<String>,
        /// Wait until replicas are balanced again.
        #[arg(long)]
        wait: bool,
    },
    /// Move every replica off a node; it takes no new ones.
    Drain {
        id: u64,
        /// Wait until the node holds no replica.
        #[arg(long)]
        wait: bool,
    },
    /// Remove a node from the cluster: drains it first, waits until it holds no replica,
    /// then removes it from the registry. The node can be stopped afterwards.
    Remove { id: u64 },
    /// Remove every node whose id is above N, highest id first, each as `remove` does, so
    /// that nodes 1..N stay: what scaling down to N nodes needs before the others stop.
    /// Nodes already removed are skipped; with none above N it changes nothing. Refused when
    /// fewer active nodes than the replication factor would stay, and when the node answering
    /// is one of those to remove: give endpoints of nodes that stay.
    Shrink {
        /// The nodes to keep: ids 1..N.
        #[arg(value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        keep: u64,
        /// Fail if the removals are not done after this many seconds.
        #[arg(long, default_value_t = 1800, value_parser = clap::value_parser!(u64).range(1..))]
        timeout_secs: u64,
    },
    /// The nodes, their state and their replica and leader counts.
    List,
}

/// How long `--wait` and `remove` follow the moves.
const WAIT_LIMIT: Duration = Duration::from_secs(30 * 60);
/// Pause between two looks at the cluster while waiting.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

pub async fn node(opts: &ClientOpts, cmd: NodeCommand) -> anyhow::Result<()> {
    let mut client = connect(opts).await?;
    match cmd {
        NodeCommand::Join { id, address, zone, wait } => {
            client.join_node(id, address, zone).await.map_err(status_error)?;
            println!("node {id} joined; replicas move onto it");
            if wait {
                wait_for(&mut client, "replicas balanced", Instant::now() + WAIT_LIMIT, |s| balanced(s).then_some(())).await?;
            }
        }
        NodeCommand::Drain { id, wait } => {
            client.drain_node(id).await.map_err(status_error)?;
            println!("node {id} is draining");
            if wait {
                wait_for(&mut client, &format!("node {id} holds no replica"), Instant::now() + WAIT_LIMIT, |s| empty(s, id)).await?;
            }
        }
        NodeCommand::Remove { id } => remove(&mut client, id, Instant::now() + WAIT_LIMIT).await?,
        NodeCommand::Shrink { keep, timeout_secs } => {
            shrink(&mut client, keep, Duration::from_secs(timeout_secs)).await?;
        }
        NodeCommand::List => {
            let s = client.cluster_status().await.map_err(status_error)?;
            print_nodes(&s);
        }
    }
    Ok(())
}

/// Whether every active node holds within one replica of every other, and no move is left.
pub fn balanced(s: &pb::ClusterStatusResponse) -> bool {
    let counts: Vec<u32> = s.nodes.iter().filter(|n| n.state == "active").map(|n| n.replicas).collect();
    let spread = counts.iter().max().zip(counts.iter().min()).map(|(max, min)| max - min);
    spread.is_some_and(|d| d <= 1) && s.moves.is_empty() && s.replicas.iter().all(|g| g.group == 0 || g.learners.is_empty())
}

fn empty(s: &pb::ClusterStatusResponse, id: u64) -> Option<()> {
    let node = s.nodes.iter().find(|n| n.id == id)?;
    (node.replicas == 0 && s.replicas.len() == s.groups.len()).then_some(())
}

/// What `shrink` does, decided from one status before anything changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShrinkPlan {
    /// Active or draining nodes above N, highest id first: the ones to remove.
    pub remove: Vec<u64>,
    /// Nodes above N that are removed already (an earlier run, or by hand).
    pub removed: Vec<u64>,
}

/// The replication factor the answering node places groups with. A node predating the
/// field reports 0: then the most voters any group has (each group has the factor's worth
/// once placement has settled, or every staying node when there are fewer).
pub fn replication_factor(s: &pb::ClusterStatusResponse) -> usize {
    match s.replication_factor {
        0 => s.replicas.iter().map(|g| g.voters.len()).max().unwrap_or(0),
        rf => rf as usize,
    }
}

/// Plans `shrink keep` from `s`: every registered node above `keep` that is not removed yet
/// goes, highest first. Refused when fewer than the replication factor active nodes would
/// stay: the planner never takes a group below its factor (`plan_moves`), so the last drain
/// would wait forever instead of failing. Refused too when `s` comes from a node to remove
/// (see the module docs).
pub fn plan_shrink(s: &pb::ClusterStatusResponse, keep: u64) -> anyhow::Result<ShrinkPlan> {
    if keep == 0 {
        bail!("a cluster keeps at least one node: N must be 1 or more");
    }
    let above = |states: &[&str]| {
        let mut ids: Vec<u64> = s.nodes.iter().filter(|n| n.id > keep && states.contains(&n.state.as_str())).map(|n| n.id).collect();
        ids.sort_unstable_by(|a, b| b.cmp(a));
        ids
    };
    let plan = ShrinkPlan { remove: above(&["active", "draining"]), removed: above(&["removed"]) };
    if plan.remove.is_empty() {
        return Ok(plan);
    }
    if s.node_id > keep {
        bail!(
            "node {} answered, and it is one of the nodes to remove {:?}: its view of the registry stops once it is \
             drained. Give --endpoint nodes that stay (ids 1..={keep}).",
            s.node_id,
            plan.remove
        );
    }
    let staying = s.nodes.iter().filter(|n| n.id <= keep && n.state == "active").count();
    let rf = replication_factor(s);
    if staying < rf {
        bail!(
            "refusing to remove nodes {:?}: {staying} active node(s) would stay, fewer than the replication factor {rf}, \
             and a drain never takes a group below its replication factor (it would wait forever). Keep at least {rf} nodes.",
            plan.remove
        );
    }
    Ok(plan)
}

/// `kerwen node shrink N`: removes every node above `keep`, highest id first, within `limit`.
pub async fn shrink(client: &mut Client, keep: u64, limit: Duration) -> anyhow::Result<ShrinkPlan> {
    let deadline = Instant::now() + limit;
    let status = client.cluster_status().await.map_err(status_error)?;
    let plan = plan_shrink(&status, keep)?;
    if !plan.removed.is_empty() {
        println!("already removed: nodes {:?}", plan.removed);
    }
    if plan.remove.is_empty() {
        println!("no node above {keep} to remove; nothing changed");
        return Ok(plan);
    }
    println!("removing nodes {:?}, highest first; nodes 1..={keep} stay", plan.remove);
    for id in &plan.remove {
        remove(client, *id, deadline).await.with_context(|| format!("shrinking to {keep} nodes (limit {limit:?})"))?;
    }
    println!("nodes {:?} removed; nodes 1..={keep} stay", plan.remove);
    Ok(plan)
}

/// Whether the registry, as the answering node sees it, has node `id` removed.
async fn is_removed(client: &mut Client, id: u64) -> bool {
    client.cluster_status().await.is_ok_and(|s| s.nodes.iter().any(|n| n.id == id && n.state == "removed"))
}

/// Drains node `id`, waits until it holds no replica, then removes it from the registry.
async fn remove(client: &mut Client, id: u64, deadline: Instant) -> anyhow::Result<()> {
    loop {
        match client.drain_node(id).await {
            Ok(()) => break,
            // No metadata leader for a moment (an election, a handover): ask again.
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                println!("draining node {id}: {}; retrying", s.message());
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            // A removed node cannot be drained again: removing it twice is done already.
            Err(s) if s.code() == Code::FailedPrecondition && is_removed(client, id).await => {
                println!("node {id} is already removed");
                return Ok(());
            }
            Err(s) => return Err(status_error(s).context(format!("draining node {id}"))),
        }
    }
    println!("node {id} is draining");
    let mut last = String::new();
    loop {
        wait_for(client, &format!("node {id} holds no replica"), deadline, |s| empty(s, id)).await?;
        match client.remove_node(id).await {
            Ok(()) => break,
            // The metadata group between leaders, or the node asked saw a group this status
            // did not (a move just started, a group that did not answer): look again. A
            // refusal that persists ends at the deadline, with the server's words.
            Err(s) if matches!(s.code(), Code::Unavailable | Code::FailedPrecondition) && Instant::now() < deadline => {
                let now = format!("{:?}: {}", s.code(), s.message());
                if now != last {
                    println!("node {id} not removed yet ({now}); waiting");
                    last = now;
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            Err(s) => return Err(status_error(s).context(format!("removing node {id}"))),
        }
    }
    println!("node {id} removed; it can be stopped");
    Ok(())
}

/// Polls the cluster status until `done` holds or `deadline` passes. A status call failing
/// with UNAVAILABLE (the answering node restarting) is retried: a wait may span minutes.
async fn wait_for(
    client: &mut Client,
    what: &str,
    deadline: Instant,
    done: impl Fn(&pb::ClusterStatusResponse) -> Option<()>,
) -> anyhow::Result<()> {
    let mut last = String::new();
    loop {
        let now = match client.cluster_status().await {
            Ok(s) if done(&s).is_some() => {
                println!("{what}");
                return Ok(());
            }
            Ok(s) => format!("moves: {}", if s.moves.is_empty() { "none".to_owned() } else { s.moves.join("; ") }),
            Err(e) if e.code() == Code::Unavailable => format!("no status ({})", e.message()),
            Err(e) => return Err(status_error(e)),
        };
        if Instant::now() >= deadline {
            bail!("timed out waiting until {what} (last seen: {now})");
        }
        if now != last {
            println!("waiting until {what}: {now}");
            last = now;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The node table of `kerwen status` and `kerwen node list`.
pub fn print_nodes(s: &pb::ClusterStatusResponse) {
    println!("{:>4}  {:<22} {:<22} {:<12} {:<8} {:>8} {:>7}  ANSWERED", "NODE", "ADDRESS", "CLIENTS AT", "STATE", "ZONE", "REPLICAS", "LEADS");
    for n in &s.nodes {
        println!(
            "{:>4}  {:<22} {:<22} {:<12} {:<8} {:>8} {:>7}  {}",
            n.id,
            n.address,
            n.client_address.as_deref().unwrap_or("-"),
            n.state,
            n.zone.as_deref().unwrap_or("-"),
            n.replicas,
            n.leaders,
            if n.reachable { "yes" } else { "no" }
        );
    }
    if !s.moves.is_empty() {
        println!("moves in progress:");
        for m in &s.moves {
            println!("  {m}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(nodes: &[(u64, &str)], rf: u32, voters: &[&[u64]]) -> pb::ClusterStatusResponse {
        pb::ClusterStatusResponse {
            node_id: 1,
            nodes: nodes.iter().map(|(id, state)| pb::NodeInfo { id: *id, state: (*state).to_owned(), ..Default::default() }).collect(),
            replicas: voters
                .iter()
                .enumerate()
                .map(|(g, v)| pb::GroupReplicas { group: g as u32, voters: v.to_vec(), ..Default::default() })
                .collect(),
            replication_factor: rf,
            ..Default::default()
        }
    }

    #[test]
    fn shrink_removes_every_node_above_n_highest_first() {
        let s = status(&[(1, "active"), (2, "active"), (3, "active"), (4, "draining"), (5, "active"), (6, "removed")], 3, &[]);
        let plan = plan_shrink(&s, 3).unwrap();
        assert_eq!(plan, ShrinkPlan { remove: vec![5, 4], removed: vec![6] });
        // Run again after it worked: nothing to do.
        let s = status(&[(1, "active"), (2, "active"), (3, "active"), (4, "removed"), (5, "removed")], 3, &[]);
        assert_eq!(plan_shrink(&s, 3).unwrap(), ShrinkPlan { remove: vec![], removed: vec![5, 4] });
        // Growing (N above every node) or unchanged: nothing either; unregistered peers are left alone.
        let s = status(&[(1, "active"), (2, "active"), (3, "active"), (4, "unregistered")], 3, &[]);
        assert!(plan_shrink(&s, 5).unwrap().remove.is_empty());
        assert!(plan_shrink(&s, 3).unwrap().remove.is_empty());
    }

    #[test]
    fn shrink_refuses_to_ask_a_node_it_removes() {
        let mut s = status(&[(1, "active"), (2, "active"), (3, "active"), (4, "active"), (5, "active")], 3, &[]);
        s.node_id = 4;
        let refused = plan_shrink(&s, 3).unwrap_err().to_string();
        assert!(refused.contains("node 4 answered"), "{refused}");
        s.node_id = 3;
        assert_eq!(plan_shrink(&s, 3).unwrap().remove, vec![5, 4]);
        // Nothing to remove: any node may answer.
        s.node_id = 5;
        assert!(plan_shrink(&s, 5).unwrap().remove.is_empty());
    }

    #[test]
    fn shrink_below_the_replication_factor_is_refused() {
        let s = status(&[(1, "active"), (2, "active"), (3, "active"), (4, "active")], 3, &[]);
        assert!(plan_shrink(&s, 0).is_err());
        let refused = plan_shrink(&s, 2).unwrap_err().to_string();
        assert!(refused.contains("replication factor 3") && refused.contains("[4, 3]"), "{refused}");
        // A draining node below N does not count as staying.
        let s = status(&[(1, "active"), (2, "active"), (3, "draining"), (4, "active")], 3, &[]);
        assert!(plan_shrink(&s, 3).is_err());
        // A node that does not report its factor: the groups' voters tell it.
        let s = status(&[(1, "active"), (2, "active"), (3, "active"), (4, "active")], 0, &[&[1, 2, 4], &[2, 3, 4]]);
        assert_eq!(replication_factor(&s), 3);
        assert!(plan_shrink(&s, 2).is_err());
        assert_eq!(plan_shrink(&s, 3).unwrap().remove, vec![4]);
    }
}
