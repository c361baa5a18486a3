//! `kerwen serve`: runs one node until a shutdown signal.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use kerwen_proto::v1::admin_server::AdminServer;
use kerwen_proto::v1::exchange_server::ExchangeServer;
use kerwen_proto::v1::peer_server::PeerServer;
use kerwen_proto::v1::raft_server::RaftServer;
use tokio_stream::wrappers::TcpListenerStream;

use crate::client::MAX_GRPC_MESSAGE_BYTES;
use crate::config::NodeConfig;
use crate::runtime::NodeRuntime;
use crate::services::admin::AdminService;
use crate::services::exchange::ExchangeService;
use crate::services::internal::InternalService;
use crate::transport::MAX_INTERNAL_MESSAGE_BYTES;

/// Runs a node until `shutdown` resolves, then stops serving, stops its Raft groups and
/// closes the store.
pub async fn serve(config: NodeConfig, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let runtime = NodeRuntime::start(config).await?;

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<ExchangeServer<ExchangeService>>().await;
    health_reporter.set_serving::<AdminServer<AdminService>>().await;

    let exchange = ExchangeServer::new(ExchangeService::new(runtime.clone()))
        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES);
    let admin = AdminServer::new(AdminService::new(runtime.clone()));
    let internal = Arc::new(InternalService::new(runtime.clone()));
    let raft = RaftServer::from_arc(internal.clone())
        .max_decoding_message_size(MAX_INTERNAL_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_INTERNAL_MESSAGE_BYTES);
    let peer = PeerServer::from_arc(internal)
        .max_decoding_message_size(MAX_INTERNAL_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_INTERNAL_MESSAGE_BYTES);

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(health_service)
            .add_service(exchange)
            .add_service(admin)
            .add_service(raft)
            .add_service(peer)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stop_rx.await;
            }),
    );
    let result = tokio::select! {
        // The server only ends by itself on a fatal error.
        r = &mut server => r.context("gRPC server task")?.context("gRPC server"),
        _ = shutdown => {
            tracing::info!("shutting down");
            let _ = stop_tx.send(());
            // Open subscriptions would hold a graceful shutdown forever: bound it.
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(r) => r.context("gRPC server task")?.context("gRPC server"),
                Err(_) => {
                    tracing::info!("closing streams still open after {SHUTDOWN_GRACE:?}");
                    server.abort();
                    Ok(())
                }
            }
        }
    };
    // Ended subscriptions release their (replicated) leases while the groups still run.
    runtime.wait_subscriptions_released(SHUTDOWN_GRACE).await;
    runtime.shutdown().await;
    result
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
