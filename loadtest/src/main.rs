//! kerwen-loadtest: Kerwen's load generator.
//!
//! Drives a running cluster (`--endpoint`) or a 3-node cluster it starts in-process
//! (`--embedded`) with producers and consumers, closed loop (as fast as acks allow) or open loop
//! at a fixed `--rate`, and measures publish→ack and end-to-end latency from the *intended* send
//! time (coordinated omission corrected) in HdrHistograms. It prints a line per second to
//! stderr, a summary table to stdout, and optionally a JSON report (`--json`) and an
//! HdrHistogram interval log (`--hdr-log`). Scenario files (`--scenario`, see `scenarios/`) make
//! runs repeatable; flags override them.
//!
//! Modules:
//! - [`config`]: flags, scenario files, size and duration parsing;
//! - [`cluster`]: the embedded cluster;
//! - [`workload`]: producers, consumers and the run's phases;
//! - [`flows`], [`exchange`]: exchange scenarios (a topology of systems and flows between
//!   them, such as `scenarios/smev.toml`) and running them;
//! - [`stats`]: histograms, counters, the open-loop schedule;
//! - [`report`]: summary table, JSON report, HdrHistogram log.

mod cluster;
mod config;
mod exchange;
mod flows;
mod report;
mod stats;
mod workload;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Parser;
use tokio::sync::watch;

/// The nodes' allocator (see the workspace `Cargo.toml`): the embedded cluster runs here.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use crate::cluster::EmbeddedCluster;
use crate::config::{Cli, Config, Target};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let config = match Config::from_cli(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(app(config));
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Set while the embedded cluster shuts down: its nodes' complaints about each other going
/// away are expected then and would bury the summary.
static SILENCE_LOGS: AtomicBool = AtomicBool::new(false);

/// Logs (mostly the embedded nodes') go to stderr; `RUST_LOG` overrides the default, which
/// shows warnings but only errors from openraft (elections log many harmless warnings) and
/// from the nodes' audit log (an exchange scenario's probes are refused on purpose).
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,openraft=error,kerwen::audit=error"));
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter)
        .with_filter(tracing_subscriber::filter::filter_fn(|_| !SILENCE_LOGS.load(Ordering::Relaxed)));
    tracing_subscriber::registry().with(layer).init();
}

async fn stop_embedded(cluster: Option<&mut EmbeddedCluster>) {
    if let Some(c) = cluster {
        eprintln!("stopping the embedded cluster...");
        SILENCE_LOGS.store(true, Ordering::Relaxed);
        c.shutdown().await;
        SILENCE_LOGS.store(false, Ordering::Relaxed);
    }
}

async fn app(config: Config) -> anyhow::Result<ExitCode> {
    let config = Arc::new(config);
    // Open the output files first: a bad path should fail before minutes of load.
    let json_file = config.json.as_deref().map(report::create_file).transpose()?;
    let hdr_log = config.hdr_log.as_deref().map(report::HdrLog::create).transpose()?;
    let environment = report::environment(&config);

    let (interrupt_tx, interrupt_rx) = watch::channel(false);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = interrupt_tx.send(true);
        }
    });

    let (mut cluster, connection) = match &config.target {
        Target::Embedded { shards, insecure, evidence } => {
            eprintln!("starting an embedded 3-node cluster ({shards} shards)...");
            let max_payload = usize::try_from(config.largest_payload()).unwrap_or(usize::MAX);
            let c = EmbeddedCluster::start(*shards, max_payload, *insecure, *evidence).await?;
            eprintln!("embedded cluster ready at {}", c.connection.endpoints);
            let connection = c.connection.clone();
            (Some(c), connection)
        }
        Target::Cluster { endpoints, profile, insecure } => (None, cluster::external(endpoints.clone(), profile.clone(), *insecure).await?),
    };
    let connection = cluster::Connection { forwarded: config.forwarded, ..connection };

    if let Some(exchange) = config.exchange.clone() {
        let result = exchange::run(config.clone(), &exchange, connection, interrupt_rx).await;
        stop_embedded(cluster.as_mut()).await;
        let outcome = result?;
        println!("{}", exchange::summary(&config, &outcome));
        if let (Some(file), Some(path)) = (json_file, config.json.as_deref()) {
            report::write_json(file, path, &exchange::json_report(&config, &exchange, environment, &outcome))?;
            eprintln!("wrote {}", path.display());
        }
        return Ok(if outcome.problems().is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE });
    }

    let result = workload::run(config.clone(), connection, cluster.as_ref(), interrupt_rx, hdr_log).await;
    stop_embedded(cluster.as_mut()).await;
    let outcome = result?;

    println!("{}", report::summary(&config, &outcome));
    if let (Some(file), Some(path)) = (json_file, config.json.as_deref()) {
        let report = report::json_report(&config, environment, &outcome)?;
        report::write_json(file, path, &report)?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = config.hdr_log.as_deref() {
        eprintln!("wrote {}", path.display());
    }
    Ok(if outcome.totals.published == 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
