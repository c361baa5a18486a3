//! Open-loop latency is measured from each message's intended send time, so a cluster that
//! stalls shows up in the percentiles. Three real nodes run in this process (with the test
//! fault hook enabled); the real `kerwen-loadtest` binary publishes at a fixed rate against
//! them; halfway through, every node is cut off from the others for 500 ms (no commit is
//! possible), and the reported p99.9 must reflect that stall while the median stays low.
//!
//! The nodes run `--insecure` (plaintext on loopback): what is measured here is the loop's
//! accounting, and it keeps one test of the insecure mode in the suite.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kerwen_node::client::Client;
use kerwen_node::config::ServeArgs;
use kerwen_node::testing::set_blocked_peers;
use tokio::sync::watch;

const STALL: Duration = Duration::from_millis(500);

fn free_addresses(n: usize) -> Result<Vec<std::net::SocketAddr>> {
    let listeners = (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0")).collect::<std::io::Result<Vec<_>>>()?;
    Ok(listeners.iter().map(|l| l.local_addr()).collect::<std::io::Result<Vec<_>>>()?)
}

async fn wait_for_leaders(endpoints: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut client) = Client::connect_list(endpoints).await {
            if let Ok(status) = client.cluster_status().await {
                if !status.groups.is_empty() && status.groups.iter().all(|g| g.leader.is_some()) {
                    return Ok(());
                }
            }
        }
        ensure!(Instant::now() < deadline, "no leaders within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn quantile_us(report: &serde_json::Value, histogram: &str, quantile: f64) -> Result<u64> {
    let percentiles = report["histograms"][histogram]["percentiles"].as_array().context("percentiles in the report")?;
    for p in percentiles {
        if (p["quantile"].as_f64().unwrap_or(-1.0) - quantile).abs() < 1e-9 {
            return p["value_us"].as_u64().context("value_us");
        }
    }
    bail!("no quantile {quantile} in {histogram}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_shows_in_the_open_loop_percentiles() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let addresses = free_addresses(6)?;
    let (client_addresses, peer_addresses) = addresses.split_at(3);
    let peers: BTreeMap<u64, String> = (1..=3).zip(peer_addresses.iter().map(|a| a.to_string())).collect();
    let peer_list = peers.iter().map(|(id, a)| format!("{id}={a}")).collect::<Vec<_>>().join(",");
    let endpoints = client_addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");
    let (stop, stop_rx) = watch::channel(false);
    let mut nodes = Vec::new();
    for (id, (listen, peer_listen)) in (1..=3u64).zip(client_addresses.iter().zip(peer_addresses)) {
        let config = ServeArgs {
            node_id: Some(id),
            listen: Some(*listen),
            peer_listen: Some(*peer_listen),
            insecure: true,
            peers: Some(peer_list.clone()),
            data_dir: Some(dir.path().join(format!("node-{id}"))),
            enable_fault_injection: true,
            ..ServeArgs::default()
        }
        .resolve()?;
        let mut rx = stop_rx.clone();
        nodes.push(tokio::spawn(kerwen_node::server::serve(config, async move {
            let _ = rx.wait_for(|stop| *stop).await;
        })));
    }
    let result = async {
        wait_for_leaders(&endpoints).await?;
        let report_path = dir.path().join("report.json");
        let mut load = tokio::process::Command::new(env!("CARGO_BIN_EXE_kerwen-loadtest"))
            .args(["--endpoint", &endpoints, "--insecure", "--rate", "400", "--batch", "10", "--warmup", "1s", "--duration", "8s"])
            .arg("--json")
            .arg(&report_path)
            .kill_on_drop(true)
            .spawn()
            .context("starting kerwen-loadtest")?;

        // Well inside the measured window: cut every node off from every other one.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let ids: Vec<u64> = peers.keys().copied().collect();
        for (id, endpoint) in &peers {
            let others: Vec<u64> = ids.iter().copied().filter(|o| o != id).collect();
            set_blocked_peers(endpoint, &others, None).await?;
        }
        tokio::time::sleep(STALL).await;
        for endpoint in peers.values() {
            set_blocked_peers(endpoint, &[], None).await?;
        }

        let status = tokio::time::timeout(Duration::from_secs(90), load.wait()).await.context("kerwen-loadtest did not finish")??;
        ensure!(status.success(), "kerwen-loadtest failed: {status}");
        let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report_path)?)?;
        let p50 = quantile_us(&report, "publish_ack", 0.5)?;
        let p999 = quantile_us(&report, "publish_ack", 0.999)?;
        println!("publish->ack p50 {} ms, p99.9 {} ms", p50 / 1000, p999 / 1000);
        ensure!(p999 >= 400_000, "a {STALL:?} stall must reach p99.9, got {} ms", p999 / 1000);
        ensure!(p50 < p999 / 2, "the stall is the exception, not the median: p50 {} ms", p50 / 1000);
        Ok(())
    }
    .await;
    let _ = stop.send(true);
    for node in nodes {
        let _ = tokio::time::timeout(Duration::from_secs(15), node).await;
    }
    result
}
