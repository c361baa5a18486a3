//! Exchange scenarios: a topology (`[topology]`, see `kerwen_node::scenario`) and the flows of
//! traffic between its systems (`[[flow]]`), as in `scenarios/smev.toml`.
//!
//! A flow is one kind of exchange between two systems, at a steady rate within a window of
//! the measured run:
//!
//! - `kind = "send"`: one-way messages (bulk exports, event streams);
//! - `kind = "request"`: requests answered asynchronously: the provider's reply goes to the
//!   requester's `reply_to` service and is bound to the request by its hash.
//!
//! Flows must be granted by the topology (a scenario that sends where it may not is a mistake
//! in the file, refused before the run); sealed flows need both ends to publish keys.

use std::time::Duration;

use anyhow::{bail, Context};
use kerwen_node::scenario::Topology;
use serde::Deserialize;

use crate::config::SizeDist;

/// Highest rate a flow may have, in messages per second.
const MAX_RATE: f64 = 100_000.0;

/// A `[[flow]]` as written in the scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowSpec {
    pub name: String,
    pub kind: FlowKind,
    /// The sending system (`INSTANCE/CLASS/MEMBER/SUBSYSTEM`).
    pub from: String,
    /// The service sent to.
    pub to: String,
    /// For requests: the requester's service replies go to.
    pub reply_to: Option<String>,
    /// Payload size, as `--size` [default: 1KiB].
    pub size: Option<String>,
    /// For requests: the reply's payload size [default: 1KiB].
    pub reply_size: Option<String>,
    /// Messages (or requests) per second, before `--rate-scale`.
    pub rate: f64,
    /// Payloads (and replies) sealed to the recipient's encryption key.
    #[serde(default)]
    pub sealed: bool,
    /// Distinct ordering keys; 0 = none.
    #[serde(default)]
    pub ordering_keys: u32,
    /// The part of the measured run the flow is active in [default: [0.0, 1.0]].
    pub window: Option<[f64; 2]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowKind {
    Send,
    Request,
}

impl FlowKind {
    pub fn name(self) -> &'static str {
        match self {
            FlowKind::Send => "send",
            FlowKind::Request => "request",
        }
    }
}

/// A validated flow, rate scaled.
#[derive(Debug, Clone)]
pub struct Flow {
    pub name: String,
    pub kind: FlowKind,
    pub from: String,
    pub to: String,
    /// Set for requests.
    pub reply_to: Option<String>,
    pub size: SizeDist,
    pub reply_size: SizeDist,
    /// Per second, after `--rate-scale`.
    pub rate: f64,
    pub sealed: bool,
    pub ordering_keys: u32,
    pub window: (f64, f64),
}

impl Flow {
    /// When, after the start of the measured run of length `duration`, the flow is active.
    pub fn active(&self, duration: Duration) -> (Duration, Duration) {
        (duration.mul_f64(self.window.0), duration.mul_f64(self.window.1))
    }

    /// Messages the flow is planned to send in a measured run of length `duration`.
    pub fn planned(&self, duration: Duration) -> f64 {
        let (start, end) = self.active(duration);
        (end - start).as_secs_f64() * self.rate
    }
}

/// An exchange scenario, resolved.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub topology: Topology,
    pub flows: Vec<Flow>,
    pub rate_scale: f64,
}

impl Exchange {
    pub fn resolve(topology: Topology, specs: Vec<FlowSpec>, rate_scale: f64) -> anyhow::Result<Exchange> {
        topology.validate()?;
        if !(rate_scale > 0.0 && rate_scale <= 1000.0) {
            bail!("--rate-scale must be greater than 0 and at most 1000");
        }
        let mut flows: Vec<Flow> = Vec::with_capacity(specs.len());
        for spec in specs {
            let flow = resolve_flow(&topology, spec, rate_scale)?;
            if flows.iter().any(|f| f.name == flow.name) {
                bail!("two flows are named {}", flow.name);
            }
            flows.push(flow);
        }
        Ok(Exchange { topology, flows, rate_scale })
    }
}

fn resolve_flow(topology: &Topology, spec: FlowSpec, rate_scale: f64) -> anyhow::Result<Flow> {
    let name = spec.name.clone();
    let check = || -> anyhow::Result<Flow> {
        let from = topology.system(&spec.from).with_context(|| format!("from {}: not a system of the topology", spec.from))?;
        let to = topology.service(&spec.to).with_context(|| format!("to {}: not a service of the topology", spec.to))?;
        if !topology.may_send(&spec.from, &spec.to) {
            bail!("the topology does not let {} send to {} (add it to the service's senders)", spec.from, spec.to);
        }
        if spec.sealed && !to.owner.sealed {
            bail!("sealed, but {} publishes no encryption key (sealed = true on the system)", to.owner.id);
        }
        let reply_to = match (spec.kind, &spec.reply_to) {
            (FlowKind::Request, Some(r)) => {
                let reply = topology.service(r).with_context(|| format!("reply_to {r}: not a service of the topology"))?;
                if reply.owner.id != from.id {
                    bail!("reply_to {r} is not a service of the requester {}", from.id);
                }
                if spec.sealed && !from.sealed {
                    bail!("sealed replies need the requester {} to publish an encryption key", from.id);
                }
                Some(r.clone())
            }
            (FlowKind::Request, None) => bail!("a request flow needs reply_to (one of the requester's services)"),
            (FlowKind::Send, Some(_)) => bail!("reply_to is for request flows"),
            (FlowKind::Send, None) => None,
        };
        if spec.kind == FlowKind::Send && spec.reply_size.is_some() {
            bail!("reply_size is for request flows");
        }
        let size: SizeDist = spec.size.as_deref().unwrap_or("1KiB").parse().context("size")?;
        let reply_size: SizeDist = spec.reply_size.as_deref().unwrap_or("1KiB").parse().context("reply_size")?;
        let rate = spec.rate * rate_scale;
        if !(spec.rate > 0.0 && rate <= MAX_RATE) {
            bail!("rate must be greater than 0 and at most {MAX_RATE} per second (after --rate-scale)");
        }
        let window = spec.window.unwrap_or([0.0, 1.0]);
        if !(0.0 <= window[0] && window[0] < window[1] && window[1] <= 1.0) {
            bail!("window must be [start, end] with 0 <= start < end <= 1, got {window:?}");
        }
        Ok(Flow {
            name: spec.name.clone(),
            kind: spec.kind,
            from: spec.from.clone(),
            to: spec.to.clone(),
            reply_to,
            size,
            reply_size,
            rate,
            sealed: spec.sealed,
            ordering_keys: spec.ordering_keys,
            window: (window[0], window[1]),
        })
    };
    check().with_context(|| format!("flow {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smev() -> (Topology, Vec<FlowSpec>) {
        let knobs = crate::config::parse_scenario(kerwen_node::scenario::SMEV).expect("smev.toml parses");
        (knobs.topology.expect("a topology"), knobs.flow)
    }

    #[test]
    fn the_smev_flows_are_granted_and_cover_both_kinds() {
        let (topology, flows) = smev();
        let exchange = Exchange::resolve(topology, flows, 0.5).expect("the smev flows resolve");
        assert!(exchange.flows.iter().any(|f| f.kind == FlowKind::Request && f.sealed));
        assert!(exchange.flows.iter().any(|f| f.kind == FlowKind::Send && f.size.max() >= 1 << 20), "bulk exports");
        assert!(exchange.flows.iter().any(|f| f.window.1 - f.window.0 <= 0.1), "a burst");
        assert!(exchange.flows.iter().all(|f| f.planned(Duration::from_secs(60)) >= 1.0), "every flow sends at half rate in a minute");
    }

    #[test]
    fn flows_the_topology_does_not_grant_are_refused_before_the_run() {
        let (topology, mut flows) = smev();
        flows[0].from = "TM/GOV/MINHEALTH/health-records".to_owned();
        let e = Exchange::resolve(topology.clone(), flows, 1.0).expect_err("an ungranted flow");
        assert!(format!("{e:#}").contains("does not let"), "{e:#}");
        let (_, mut flows) = smev();
        let request = flows.iter_mut().find(|f| f.kind == FlowKind::Request).expect("a request flow");
        request.reply_to = Some("TM/GOV/STATS/statistics/exports".to_owned());
        let e = Exchange::resolve(topology, flows, 1.0).expect_err("replies to another system's service");
        assert!(format!("{e:#}").contains("not a service of the requester"), "{e:#}");
    }
}
