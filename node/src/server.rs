//! `kerwen serve`: runs one node until a shutdown signal.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use kerwen_proto::v1::access_server::AccessServer;
use kerwen_proto::v1::admin_server::AdminServer;
use kerwen_proto::v1::exchange_server::ExchangeServer;
use kerwen_proto::v1::peer_server::PeerServer;
use kerwen_proto::v1::raft_server::RaftServer;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;

use crate::client::MAX_GRPC_MESSAGE_BYTES;
use crate::config::{NodeConfig, Security};
use crate::tls::{tls_incoming, NodeTls, Port};
use crate::runtime::NodeRuntime;
use crate::services::access::AccessService;
use crate::services::admin::AdminService;
use crate::services::exchange::ExchangeService;
use crate::services::internal::InternalService;
use crate::transport::MAX_INTERNAL_MESSAGE_BYTES;

/// Runs a node until `shutdown` resolves, then stops serving, stops its Raft groups and
/// closes the store.
pub async fn serve(config: NodeConfig, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let client_listener = bind(config.listen).await?;
    let peer_listener = bind(config.peer_listen).await?;
    let ops_listener = match config.http_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let tls = match &config.security {
        Security::Tls(files) => Some(NodeTls::load(files.clone())?),
        Security::Insecure => {
            warn_insecure(&config, stop_rx.clone());
            None
        }
    };
    let runtime = NodeRuntime::start(config, tls.clone()).await?;
    if let Some(listener) = ops_listener {
        let (runtime, stop) = (runtime.clone(), stop_rx.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::ops::serve(listener, runtime, stop).await {
                tracing::error!(error = %e, "the operations port stopped");
            }
        });
    }

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<ExchangeServer<ExchangeService>>().await;
    health_reporter.set_serving::<AdminServer<AdminService>>().await;
    health_reporter.set_serving::<AccessServer<AccessService>>().await;

    let exchange = ExchangeServer::new(ExchangeService::new(runtime.clone()))
        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES);
    let admin = AdminServer::new(AdminService::new(runtime.clone()));
    let access = AccessServer::new(AccessService::new(runtime.clone()));
    let internal = Arc::new(InternalService::new(runtime.clone()));
    let raft = RaftServer::from_arc(internal.clone())
        .max_decoding_message_size(MAX_INTERNAL_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_INTERNAL_MESSAGE_BYTES);
    let peer = PeerServer::from_arc(internal)
        .max_decoding_message_size(MAX_INTERNAL_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_INTERNAL_MESSAGE_BYTES);

    let client_api = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(health_service.clone())
        .add_service(exchange)
        .add_service(admin)
        .add_service(access);
    let peer_api = tonic::transport::Server::builder().tcp_nodelay(true).add_service(health_service).add_service(raft).add_service(peer);

    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let (client_server, peer_server) = match &tls {
        Some(tls) => {
            tls.spawn_watcher(stop_rx.clone());
            (
                tokio::spawn(client_api.serve_with_incoming_shutdown(tls_incoming(client_listener, tls.clone(), Port::Client), stopped(stop_rx.clone()))),
                tokio::spawn(peer_api.serve_with_incoming_shutdown(tls_incoming(peer_listener, tls.clone(), Port::Peer), stopped(stop_rx.clone()))),
            )
        }
        None => (
            tokio::spawn(client_api.serve_with_incoming_shutdown(TcpListenerStream::new(client_listener), stopped(stop_rx.clone()))),
            tokio::spawn(peer_api.serve_with_incoming_shutdown(TcpListenerStream::new(peer_listener), stopped(stop_rx.clone()))),
        ),
    };
    let servers = futures::future::try_join(flatten(client_server, "client API"), flatten(peer_server, "peer API"));
    tokio::pin!(servers);
    let result = tokio::select! {
        // The servers only end by themselves on a fatal error.
        r = &mut servers => r.map(|_| ()),
        (group, fatal) = runtime.stopped_group() => {
            tracing::error!(group, error = %fatal, "a Raft group stopped on a fatal error (a full or failing disk?); exiting so the node restarts and recovers from its log");
            Err(anyhow::anyhow!("group {group} stopped: {fatal}"))
        }
        _ = shutdown => {
            tracing::info!("shutting down");
            // Still serving: requests reaching this node are forwarded to the successors.
            hand_over_leadership(&runtime).await;
            runtime.end_subscriptions();
            let _ = stop_tx.send(true);
            // Open subscriptions would hold a graceful shutdown forever: bound it.
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut servers).await {
                Ok(r) => r.map(|_| ()),
                Err(_) => {
                    tracing::info!("closing streams still open after {SHUTDOWN_GRACE:?}");
                    Ok(())
                }
            }
        }
    };
    let _ = stop_tx.send(true);
    // Ended subscriptions release their (replicated) leases while the groups still run.
    runtime.wait_subscriptions_released(SHUTDOWN_GRACE).await;
    runtime.shutdown().await;
    result
}

/// Hands the leadership of the groups this node leads to the other nodes, within the
/// configured bound, so that clients see a leader change rather than an election timeout.
async fn hand_over_leadership(runtime: &NodeRuntime) {
    let bound = runtime.config.shutdown_drain;
    if bound.is_zero() || runtime.config.peers.len() < 2 || runtime.led_groups().is_empty() {
        return;
    }
    let started = std::time::Instant::now();
    let still_led = runtime.drain_leadership(bound).await;
    if still_led.is_empty() {
        tracing::info!(took = ?started.elapsed(), "leadership handed over");
    } else {
        tracing::warn!(groups = ?still_led, "still leading after {bound:?}; stopping anyway (the others elect by timeout)");
    }
}

async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))
}

async fn flatten(task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>, what: &'static str) -> anyhow::Result<()> {
    // Aborting on drop: a server still running after a bounded shutdown must not outlive us.
    let mut task = AbortOnDrop(task);
    (&mut task.0).await.with_context(|| format!("{what} server task"))?.with_context(|| format!("{what} server"))
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `--insecure` is for experiments: say so where nobody can miss it, and keep saying it.
fn warn_insecure(config: &NodeConfig, mut stop: watch::Receiver<bool>) {
    const WARNING: &str = "INSECURE MODE: plaintext, no client authentication, no access control. \
        For local experiments only; never carry real data.";
    tracing::warn!(listen = %config.listen, peer_listen = %config.peer_listen, "{WARNING}");
    eprintln!("kerwen: {WARNING}");
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(300));
        every.tick().await;
        loop {
            tokio::select! {
                _ = every.tick() => tracing::warn!("{WARNING}"),
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    });
}

/// How long in-flight requests may take to finish after a shutdown signal.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
