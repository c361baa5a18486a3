//! `kerwen scenario`: put an exchange topology (the `[topology]` of a scenario file, or a
//! built-in scenario such as `smev`) on a running cluster: systems, mailboxes, grants, and an
//! encryption key for every system marked `sealed` (see [`crate::scenario`]).

use clap::Subcommand;
use serde_json::json;

use super::{connect, print_json_or, ClientOpts};
use crate::scenario::{self, Applied, Topology};

#[derive(Debug, Subcommand)]
pub enum ScenarioCommand {
    /// Register a scenario's systems, create their mailboxes, add its grants and give every
    /// sealed system an encryption key (private halves in the key store). Idempotent. Needs
    /// an administrator's profile whose PKI directory issues the systems' certificates.
    Apply {
        /// A scenario file, or the name of a built-in scenario (`smev`).
        scenario: String,
    },
    /// Print a built-in scenario file.
    Show { name: String },
}

/// What applying a topology did, keys included.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub applied: Applied,
    /// Sealed systems that got a new encryption key.
    pub keys_generated: usize,
}

/// Applies `topology` with the administrator `opts` resolve to, then makes sure every sealed
/// system has an encryption key, acting as that system (its certificate from the profile's
/// PKI directory).
pub async fn apply(opts: &ClientOpts, topology: &Topology) -> anyhow::Result<Outcome> {
    let mut admin = connect(opts).await?;
    let applied = scenario::apply(&mut admin, topology).await?;
    let mut store = opts.key_store()?;
    let mut keys_generated = 0;
    for system in topology.systems.iter().filter(|s| s.sealed) {
        let mut client = connect(&ClientOpts { as_subsystem: Some(system.id.clone()), ..opts.clone() }).await?;
        let (_, new) = scenario::ensure_sealing_key(&mut client, &mut store, &system.id).await?;
        keys_generated += usize::from(new);
    }
    Ok(Outcome { applied, keys_generated })
}

/// One line saying what a topology holds and what applying it changed.
pub fn describe(topology: &Topology, outcome: &Outcome) -> String {
    let services = topology.services().count();
    let grants: usize = topology.services().map(|e| e.spec.senders.len()).sum();
    format!(
        "{} members, {} systems, {services} mailboxes, {grants} grants, {} sealed systems (new: {} systems, {} mailboxes, {} grants, {} keys)",
        topology.members.len(),
        topology.systems.len(),
        topology.systems.iter().filter(|s| s.sealed).count(),
        outcome.applied.systems_registered,
        outcome.applied.mailboxes_created,
        outcome.applied.grants_added,
        outcome.keys_generated,
    )
}

pub async fn scenario(opts: &ClientOpts, command: ScenarioCommand) -> anyhow::Result<()> {
    match command {
        ScenarioCommand::Apply { scenario } => {
            let topology = Topology::load(&scenario)?;
            let outcome = apply(opts, &topology).await?;
            let a = outcome.applied;
            print_json_or(
                opts,
                json!({
                    "members": topology.members.len(),
                    "systems": topology.systems.len(),
                    "mailboxes": topology.services().count(),
                    "new": {"systems": a.systems_registered, "mailboxes": a.mailboxes_created, "grants": a.grants_added, "keys": outcome.keys_generated},
                }),
                || println!("applied {scenario}: {}", describe(&topology, &outcome)),
            );
            Ok(())
        }
        ScenarioCommand::Show { name } => match scenario::BUILT_IN.iter().find(|(n, _)| *n == name) {
            Some((_, text)) => {
                print!("{text}");
                Ok(())
            }
            None => anyhow::bail!("no built-in scenario {name:?} (built in: {})", scenario::BUILT_IN.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")),
        },
    }
}
