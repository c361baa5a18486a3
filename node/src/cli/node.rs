//! `kerwen node`: add nodes to the cluster, drain them and remove them. Replicas move on
//! their own (the metadata leader's coordinator, `crate::placement`); these commands change
//! the node registry and, with `--wait`, follow the moves in `kerwen status`.

use std::time::Duration;

use anyhow::bail;
use clap::Subcommand;
use kerwen_proto::v1 as pb;

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
    /// The nodes, their state and their replica and leader counts.
    List,
}

/// How long `--wait` and `remove` follow the moves.
const WAIT_LIMIT: Duration = Duration::from_secs(30 * 60);

pub async fn node(opts: &ClientOpts, cmd: NodeCommand) -> anyhow::Result<()> {
    let mut client = connect(opts).await?;
    match cmd {
        NodeCommand::Join { id, address, zone, wait } => {
            client.join_node(id, address, zone).await.map_err(status_error)?;
            println!("node {id} joined; replicas move onto it");
            if wait {
                wait_for(&mut client, "replicas balanced", |s| balanced(s).then_some(())).await?;
            }
        }
        NodeCommand::Drain { id, wait } => {
            client.drain_node(id).await.map_err(status_error)?;
            println!("node {id} is draining");
            if wait {
                wait_for(&mut client, &format!("node {id} holds no replica"), |s| empty(s, id)).await?;
            }
        }
        NodeCommand::Remove { id } => {
            client.drain_node(id).await.map_err(status_error)?;
            wait_for(&mut client, &format!("node {id} holds no replica"), |s| empty(s, id)).await?;
            client.remove_node(id).await.map_err(status_error)?;
            println!("node {id} removed; it can be stopped");
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

async fn wait_for(client: &mut Client, what: &str, done: impl Fn(&pb::ClusterStatusResponse) -> Option<()>) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT_LIMIT;
    let mut last = String::new();
    loop {
        let s = client.cluster_status().await.map_err(status_error)?;
        if done(&s).is_some() {
            println!("{what}");
            return Ok(());
        }
        let now = format!("moves: {}", if s.moves.is_empty() { "none".to_owned() } else { s.moves.join("; ") });
        if now != last {
            println!("waiting until {what}: {now}");
            last = now;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("not done after {WAIT_LIMIT:?}: {what}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The node table of `kerwen status` and `kerwen node list`.
pub fn print_nodes(s: &pb::ClusterStatusResponse) {
    println!("{:>4}  {:<22} {:<12} {:<8} {:>8} {:>7}  ANSWERED", "NODE", "ADDRESS", "STATE", "ZONE", "REPLICAS", "LEADS");
    for n in &s.nodes {
        println!(
            "{:>4}  {:<22} {:<12} {:<8} {:>8} {:>7}  {}",
            n.id,
            n.address,
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
