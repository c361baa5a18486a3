//! The README's 5-minute tour and its national-exchange walk-through, run exactly as written:
//! `kerwen dev` is started as a user would start it (on free ports, with its own data dir; with
//! `--scenario smev` for the second), then the shell lines between `<!-- tour:begin -->` and
//! `<!-- tour:end -->` (or `smev:begin`/`smev:end`) run in bash with the freshly built `kerwen`
//! on the PATH. The only substitution is the dev data dir path (`/tmp/kerwen-dev`); the client
//! profile goes to the test's temporary directory (`KERWEN_PROFILE`), not the user's home.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const README_DEV_DIR: &str = "/tmp/kerwen-dev";

/// A base port with the two following ports free too, and the same three plus the peer-port
/// offset (100).
fn free_port_triple() -> u16 {
    for _ in 0..200 {
        let first = match TcpListener::bind("127.0.0.1:0") {
            Ok(l) => l,
            Err(_) => continue,
        };
        let base = first.local_addr().expect("local addr").port();
        if base > 65_000 {
            continue;
        }
        if base > 65_000 - 103 {
            continue;
        }
        let rest: Vec<_> =
            [1, 2, 100, 101, 102].into_iter().filter_map(|i| TcpListener::bind(("127.0.0.1", base + i)).ok()).collect();
        if rest.len() == 5 {
            return base;
        }
    }
    panic!("no three consecutive free ports found");
}

/// Stops `kerwen dev` (and with it its nodes) however the test ends.
struct DevCluster {
    child: Child,
    dir: PathBuf,
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = exited_within(&mut self.child, Duration::from_secs(20));
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Belt and braces: no node may outlive the test.
        for id in 1..=3 {
            if let Ok(pid) = std::fs::read_to_string(self.dir.join(format!("node-{id}.pid"))) {
                if let Ok(pid) = pid.trim().parse::<libc::pid_t>() {
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
        }
    }
}

/// How `child` ended, if it did within `limit`.
fn exited_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The shell lines between `<!-- NAME:begin -->` and `<!-- NAME:end -->`, without the fences.
fn readme_script(readme: &str, name: &str) -> String {
    let begin = readme.find(&format!("<!-- {name}:begin -->")).unwrap_or_else(|| panic!("README has a {name}:begin marker"));
    let end = readme.find(&format!("<!-- {name}:end -->")).unwrap_or_else(|| panic!("README has a {name}:end marker"));
    readme[begin..end].lines().skip(1).filter(|l| !l.trim_start().starts_with("```")).collect::<Vec<_>>().join("\n")
}

/// What a README block printed.
struct Ran {
    stdout: String,
    stderr: String,
}

/// Starts `kerwen dev` (with `dev_args`) as a user would, on free ports, waits for its ready
/// banner, then runs the README block `name` with the built `kerwen` on the PATH.
fn run_readme_block(name: &str, dev_args: &[&str]) -> Ran {
    let kerwen = PathBuf::from(env!("CARGO_BIN_EXE_kerwen"));
    let bin_dir = kerwen.parent().expect("binary dir").to_path_buf();
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).expect("README.md");
    let work = tempfile::tempdir().expect("temp dir");
    let dev_dir = work.path().join("kerwen-dev");
    let base = free_port_triple();
    let endpoints = (0..3).map(|i| format!("127.0.0.1:{}", base + i)).collect::<Vec<_>>().join(",");

    let profile = work.path().join("profile.toml");
    let mut child = Command::new(&kerwen)
        .args(["dev", "--base-port", &base.to_string(), "--data-dir"])
        .arg(&dev_dir)
        .args(dev_args)
        .env("KERWEN_PROFILE", &profile)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start kerwen dev");
    let stdout = child.stdout.take().expect("dev stdout");
    let cluster = DevCluster { child, dir: dev_dir.clone() };

    // Wait for the banner that tells the user the cluster is ready.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("[kerwen dev] {line}");
            if line.contains("Press Ctrl-C") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(90)).expect("kerwen dev printed its ready banner");

    let script = readme_script(&readme, name).replace(README_DEV_DIR, &dev_dir.display().to_string());
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let output = Command::new("bash")
        .args(["-e", "-x", "-c", &script])
        .current_dir(work.path())
        .env("PATH", path)
        .env("KERWEN_ENDPOINT", &endpoints)
        .env("KERWEN_PROFILE", &profile)
        .output()
        .expect("run the README block");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    println!("--- {name} stdout ---\n{stdout}\n--- {name} stderr ---\n{stderr}");
    assert!(output.status.success(), "the README block {name} failed: {}", output.status);
    drop(cluster);
    Ran { stdout, stderr }
}

#[test]
fn readme_tour_works_as_written() {
    let Ran { stdout, stderr } = run_readme_block("tour", &[]);

    // Every published declaration was consumed exactly once, the first one first.
    for d in ["declaration 2026-001", "declaration 2026-002", "declaration 2026-003"] {
        assert_eq!(stdout.matches(d).count(), 1, "{d} consumed exactly once");
    }
    let first = stdout.find("declaration 2026-001").unwrap_or(usize::MAX);
    let second = stdout.find("declaration 2026-002").unwrap_or(0);
    assert!(first < second, "same ordering key: 001 is delivered before 002");
    assert!(stdout.contains("created mailbox TM/GOV/MINFIN/tax-registry/declarations"));
    assert!(stdout.contains("kerwen-admin:admin"), "whoami shows the dev admin");
    assert!(stdout.contains("refused, as it should be"), "publishing without a grant is refused");
    assert!(stderr.contains("PermissionDenied"), "the refusal says why");
    assert!(!stdout.contains("too early"), "the refused message was never stored or delivered");
    assert!(stdout.contains("from TM/GOV/MINCOM/registry: declaration 2026-001"), "deliveries show the authenticated sender");
    assert!(stdout.contains("pending     2 messages"), "describe shows the two pending messages");
    let retried: Vec<&str> = stdout.lines().filter(|l| l.starts_with("published decl-2026-001 ")).collect();
    assert_eq!(retried.len(), 2, "decl-2026-001 is published twice");
    assert_eq!(retried[0], retried[1], "the retry is answered with the first position");
}

/// "A national data exchange in five minutes": `kerwen dev --scenario smev`, then the block.
#[test]
fn readme_national_exchange_works_as_written() {
    let Ran { stdout, stderr } = run_readme_block("smev", &["--scenario", "smev"]);
    assert!(stdout.contains("TM/GOV/MINJUST/civil-registry/birth-certificates"), "the registry's services are listed");
    assert!(stdout.contains("TM/GOV/MINLABOUR/social-benefits"), "the grants are listed");
    assert!(stdout.contains("refused, as it should be") && stderr.contains("PermissionDenied"), "an ungranted send is refused");
    assert!(!stdout.contains("curious"), "the refused message was never delivered");
    assert!(stdout.contains("certificate 2026/BC/000123: born 1980-01-01, Ashgabat"), "the requester opened the sealed reply");
    assert!(stdout.contains("from TM/GOV/MINJUST/civil-registry"), "the reply shows its authenticated sender");
}

/// `kerwen dev` stopped with SIGTERM while its nodes are still starting (as `timeout` or a
/// supervisor stops it) stops them too, and exits cleanly: no node outlives it. Before, the
/// signal handler was installed only once the cluster was up, so an early SIGTERM killed
/// `kerwen dev` outright and left its nodes running.
#[test]
fn kerwen_dev_stopped_while_starting_leaves_no_node_running() {
    let kerwen = PathBuf::from(env!("CARGO_BIN_EXE_kerwen"));
    let work = tempfile::tempdir().expect("temp dir");
    let dev_dir = work.path().join("kerwen-dev");
    let base = free_port_triple();
    let child = Command::new(&kerwen)
        .args(["dev", "--base-port", &base.to_string(), "--data-dir"])
        .arg(&dev_dir)
        .env("KERWEN_PROFILE", work.path().join("profile.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start kerwen dev");
    let mut cluster = DevCluster { child, dir: dev_dir.clone() };

    // Every node has been started once its pid file exists.
    let deadline = Instant::now() + Duration::from_secs(60);
    let pids: Vec<libc::pid_t> = loop {
        let read: Vec<_> = (1..=3)
            .filter_map(|id| std::fs::read_to_string(dev_dir.join(format!("node-{id}.pid"))).ok()?.trim().parse().ok())
            .collect();
        if read.len() == 3 {
            break read;
        }
        assert!(Instant::now() < deadline, "kerwen dev did not start its nodes within 60 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    unsafe {
        libc::kill(cluster.child.id() as libc::pid_t, libc::SIGTERM);
    }
    let status = exited_within(&mut cluster.child, Duration::from_secs(30)).expect("kerwen dev stopped within 30 s of SIGTERM");
    assert!(status.success(), "kerwen dev ended with {status} instead of stopping its nodes");
    // kerwen dev reaps its nodes before it exits; an orphan would still have a /proc entry.
    let running: Vec<_> = pids.iter().filter(|pid| Path::new(&format!("/proc/{pid}")).exists()).collect();
    assert!(running.is_empty(), "nodes still running after kerwen dev stopped: {running:?}");
}
