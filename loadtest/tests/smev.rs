//! The SMEV scenario end to end (issue 9, criterion 3): the real `kerwen-loadtest` binary runs
//! `scenarios/smev.toml` for 60 s at half its rates against an embedded 3-node cluster with
//! TLS and evidence on. It registers 10 ministries' 12 systems, their mailboxes, grants and
//! sealing keys, probes every send the topology does not grant, and drives every flow: bulk
//! exports, event streams, sealed requests with replies, and a burst.
//!
//! The binary judges its own run (and exits non-zero on any problem), but this test reads the
//! JSON report and checks the numbers itself, so that a report that says "ok" about nothing
//! cannot pass.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_smev_scenario_runs_a_minute_with_every_grant_honoured_and_every_receipt_verified() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let report_path = dir.path().join("smev.json");
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/smev.toml");
    let mut load = tokio::process::Command::new(env!("CARGO_BIN_EXE_kerwen-loadtest"))
        .arg("--scenario")
        .arg(&scenario)
        .args(["--embedded", "--duration", "60s", "--rate-scale", "0.5", "--quiet", "--json"])
        .arg(&report_path)
        .kill_on_drop(true)
        .spawn()
        .context("starting kerwen-loadtest")?;
    let status = tokio::time::timeout(Duration::from_secs(300), load.wait()).await.context("the scenario did not finish within 300 s")??;
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report_path).context("the JSON report")?)?;
    println!("problems: {}", report["problems"]);
    ensure!(status.success(), "kerwen-loadtest reported a failed run: {status}");

    let flows = report["flows"].as_array().context("flows")?;
    ensure!(flows.len() >= 10, "the scenario's flows: {}", flows.len());
    for f in flows {
        let (name, n) = (&f["name"], |k: &str| f[k].as_u64().unwrap_or(0));
        ensure!(n("published") > 0, "{name} published nothing");
        ensure!(n("unauthorised") == 0 && n("failed") == 0, "{name}: {} unauthorised, {} failed", n("unauthorised"), n("failed"));
        ensure!(n("completed") == n("published") && n("outstanding") == 0, "{name}: {} of {} delivered or answered", n("completed"), n("published"));
        let receipts = &f["receipts"];
        ensure!(receipts["failed"].as_u64() == Some(0), "{name}: receipts failed: {receipts}");
        // Every message's publish receipt, and (once its ack is confirmed) its delivery receipt.
        let expected_publish = n("published") + n("replies_sent");
        ensure!(receipts["publish_verified"].as_u64() == Some(expected_publish), "{name}: publish receipts {receipts}, expected {expected_publish}");
        ensure!(receipts["delivery_verified"].as_u64().unwrap_or(0) >= n("completed"), "{name}: delivery receipts {receipts}");
        if f["kind"] == "request" {
            ensure!(n("replies_sent") >= n("published"), "{name}: {} replies for {} requests", n("replies_sent"), n("published"));
        }
        if f["sealed"] == true {
            ensure!(n("sealed_opened") >= n("completed") && n("sealed_open_failures") == 0, "{name}: sealed payloads opened {}", n("sealed_opened"));
        }
    }
    ensure!(flows.iter().any(|f| f["kind"] == "request") && flows.iter().any(|f| f["kind"] == "send"), "both kinds of flow");

    let probes = &report["ungranted_probes"];
    let tried = probes["tried"].as_u64().unwrap_or(0);
    ensure!(tried >= 100, "every ungranted send is tried: {probes}");
    ensure!(probes["refused"].as_u64() == Some(tried), "every ungranted send refused: {probes}");
    ensure!(report["ok"] == true, "the report's verdict: {}", report["problems"]);
    Ok(())
}
