//! `kerwen dev`: a local 3-node cluster on 127.0.0.1 in the foreground.
//!
//! Each node is a real `kerwen serve` child process (so a node can be killed and the
//! cluster watched as it recovers). Pid and log files live in the data dir. Ctrl-C stops
//! every node cleanly.
//!
//! Security is on as in production: `kerwen dev` makes a development CA, node certificates
//! and an admin certificate under `DATA_DIR/pki` (kept when the data dir is reused) and
//! writes a client profile pointing at them, so the CLI works without flags.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::client::{Client, ClientTls};
use crate::pki;
use crate::profile::Profile;

/// Subdirectory of the data dir holding the development PKI.
const PKI_DIR: &str = "pki";

/// Makes (or, in a reused data dir, keeps) the development PKI; returns the admin profile.
fn prepare_pki(dir: &Path, nodes: &[DevNode], endpoints: &str) -> anyhow::Result<Profile> {
    let pki_dir = dir.join(PKI_DIR);
    let admin = pki::IdentityFiles { cert: pki_dir.join("admin.pem"), key: pki_dir.join("admin.key") };
    let complete = admin.cert.exists()
        && nodes.iter().all(|n| pki_dir.join(format!("{}.pem", pki::node_file_stem(u64::from(n.id)))).exists());
    let admin = if complete {
        admin
    } else {
        let ids: Vec<u64> = nodes.iter().map(|n| u64::from(n.id)).collect();
        pki::create_dev_pki(&pki_dir, &ids, &pki::loopback_hosts())?
    };
    Ok(Profile {
        endpoints: endpoints.to_owned(),
        ca: pki_dir.join(pki::CA_CERT),
        cert: admin.cert,
        key: admin.key,
        pki_dir: Some(pki_dir),
    })
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Data directory. When given it is kept and reused (a restart finds its data);
    /// by default a fresh `kerwen-dev` directory under the system temp dir is used.
    #[arg(long, env = "KERWEN_DEV_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Port of node 1; node N listens on base-port + N - 1.
    #[arg(long, default_value_t = 7001)]
    pub base_port: u16,
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: u16,
    /// Number of data shards.
    #[arg(long, default_value_t = crate::config::DEFAULT_SHARDS)]
    pub shards: u32,
    /// Where to write the client profile [default: ~/.config/kerwen/profile.toml, or
    /// KERWEN_PROFILE].
    #[arg(long, env = "KERWEN_PROFILE")]
    pub profile: Option<PathBuf>,
    /// Once the cluster is up, apply this exchange scenario's topology (systems, mailboxes,
    /// grants, sealing keys): a built-in name (`smev`) or a scenario file.
    #[arg(long, value_name = "NAME|FILE")]
    pub scenario: Option<String>,
}

/// The dev nodes' operations ports: the client port plus this (7201-7203 by default).
const HTTP_PORT_OFFSET: u16 = 200;

struct DevNode {
    id: u16,
    address: String,
    peer_address: String,
    /// The operations port: probes and `/metrics`.
    http_address: String,
    log: PathBuf,
    child: Option<Child>,
}

fn terminate(child: &mut Child) {
    // SIGTERM lets the node close its store cleanly.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
}

fn stop_all(nodes: &mut [DevNode]) {
    for n in nodes.iter_mut() {
        if let Some(child) = n.child.as_mut() {
            terminate(child);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in nodes.iter_mut() {
        if let Some(mut child) = n.child.take() {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
    }
}

async fn wait_healthy(endpoints: &str, tls: &ClientTls, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(mut client) = Client::connect_list_with(endpoints, Some(tls.clone())).await {
            if let Ok(status) = client.cluster_status().await {
                if Client::leaderless_groups(&status).is_some_and(|l| l.is_empty()) {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            bail!("the cluster did not elect leaders within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn prepare_dir(args: &DevArgs) -> anyhow::Result<PathBuf> {
    match &args.data_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            Ok(dir.clone())
        }
        None => {
            let dir = std::env::temp_dir().join("kerwen-dev");
            if dir.exists() {
                std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
            }
            std::fs::create_dir_all(&dir)?;
            Ok(dir)
        }
    }
}

fn spawn_node(exe: &Path, dir: &Path, node: &DevNode, peers: &str, shards: u32) -> anyhow::Result<Child> {
    let log = std::fs::File::create(&node.log).with_context(|| format!("creating {}", node.log.display()))?;
    let pki = dir.join(PKI_DIR);
    let stem = pki::node_file_stem(u64::from(node.id));
    let child = Command::new(exe)
        .arg("serve")
        .args(["--node-id", &node.id.to_string()])
        .args(["--listen", &node.address])
        .args(["--peer-listen", &node.peer_address])
        .args(["--http-listen", &node.http_address])
        .args(["--peers", peers])
        .arg("--tls-ca")
        .arg(pki.join(pki::CA_CERT))
        .arg("--tls-cert")
        .arg(pki.join(format!("{stem}.pem")))
        .arg("--tls-key")
        .arg(pki.join(format!("{stem}.key")))
        .arg("--data-dir")
        .arg(dir.join(format!("node-{}", node.id)))
        .args(["--shards", &shards.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting a node process")?;
    std::fs::write(dir.join(format!("node-{}.pid", node.id)), child.id().to_string())?;
    Ok(child)
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    // A scenario that does not parse should fail before any node starts.
    let topology = args.scenario.as_deref().map(crate::scenario::Topology::load).transpose()?;
    let dir = prepare_dir(&args)?;
    let exe = std::env::current_exe().context("locating the kerwen binary")?;
    if args.base_port.checked_add(args.nodes + HTTP_PORT_OFFSET).is_none() {
        bail!("--base-port {} leaves no room for {} nodes and their peer and operations ports", args.base_port, args.nodes);
    }
    let mut nodes: Vec<DevNode> = (1..=args.nodes)
        .map(|id| DevNode {
            id,
            address: format!("127.0.0.1:{}", args.base_port + id - 1),
            peer_address: format!("127.0.0.1:{}", args.base_port + crate::config::PEER_PORT_OFFSET + id - 1),
            http_address: format!("127.0.0.1:{}", args.base_port + HTTP_PORT_OFFSET + id - 1),
            log: dir.join(format!("node-{id}.log")),
            child: None,
        })
        .collect();
    let peers = nodes.iter().map(|n| format!("{}={}", n.id, n.peer_address)).collect::<Vec<_>>().join(",");
    let endpoints = nodes.iter().map(|n| n.address.clone()).collect::<Vec<_>>().join(",");
    let profile = prepare_pki(&dir, &nodes, &endpoints)?;
    let profile_path = args.profile.clone().or_else(crate::profile::default_path).context("no home directory: give --profile")?;
    profile.save(&profile_path)?;
    let tls = ClientTls::from_files(&profile.tls_files())?;
    // Registered before any node starts (one poll installs the handlers): a SIGTERM or
    // Ctrl-C from then on stops the nodes too, instead of killing this process and leaving
    // them running.
    let shutdown = crate::server::shutdown_signal();
    tokio::pin!(shutdown);
    if futures::poll!(&mut shutdown).is_ready() {
        return Ok(());
    }
    for i in 0..nodes.len() {
        match spawn_node(&exe, &dir, &nodes[i], &peers, args.shards) {
            Ok(child) => nodes[i].child = Some(child),
            Err(e) => {
                stop_all(&mut nodes);
                return Err(e);
            }
        }
    }
    let healthy = tokio::select! {
        healthy = wait_healthy(&endpoints, &tls, Duration::from_secs(60)) => healthy,
        _ = &mut shutdown => {
            stop_on_request(&mut nodes);
            return Ok(());
        }
    };
    if let Err(e) = healthy {
        stop_all(&mut nodes);
        return Err(e.context(format!("see the node logs in {}", dir.display())));
    }
    if let (Some(topology), Some(name)) = (&topology, &args.scenario) {
        let opts = crate::cli::ClientOpts { profile: Some(profile_path.clone()), ..Default::default() };
        match crate::cli::scenario::apply(&opts, topology).await {
            Ok(outcome) => println!("Scenario {name}: {}", crate::cli::scenario::describe(topology, &outcome)),
            Err(e) => {
                stop_all(&mut nodes);
                return Err(e.context(format!("applying scenario {name}")));
            }
        }
    }

    println!("Kerwen dev cluster is up: {} nodes, {} data shards, data in {}", args.nodes, args.shards, dir.display());
    for n in &nodes {
        let pid = n.child.as_ref().map(|c| c.id()).unwrap_or(0);
        println!("  node {}  {}  pid {}  log {}  metrics http://{}/metrics", n.id, n.address, pid, n.log.display(), n.http_address);
    }
    println!("Client profile (admin certificate): {}", profile_path.display());
    if args.profile.is_some() && std::env::var_os("KERWEN_PROFILE").is_none() {
        println!("Point the CLI at it with:  export KERWEN_PROFILE={}", profile_path.display());
    }
    println!("Press Ctrl-C to stop the cluster.");

    let mut reported = vec![false; nodes.len()];
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                for (i, n) in nodes.iter_mut().enumerate() {
                    if let Some(child) = n.child.as_mut() {
                        if let Ok(Some(status)) = child.try_wait() {
                            if !reported[i] {
                                reported[i] = true;
                                println!("node {} exited ({status}); the others keep serving", n.id);
                            }
                        }
                    }
                }
            }
        }
    }
    stop_on_request(&mut nodes);
    Ok(())
}

/// Stops every node because the user asked (Ctrl-C or SIGTERM), saying so.
fn stop_on_request(nodes: &mut [DevNode]) {
    println!("stopping the cluster...");
    stop_all(nodes);
    println!("stopped");
}
