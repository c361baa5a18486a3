//! Every node serves the standard `grpc.health.v1.Health` service for the whole server and
//! for each client-facing service, and answers NOT_FOUND for services it does not have.

mod harness;

use anyhow::Result;
use harness::{Cluster, ProcessCluster};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_reports_serving_over_grpc_health() -> Result<()> {
    let cluster = ProcessCluster::builder().start().await?;
    for node in cluster.node_ids() {
        let mut health = HealthClient::new(cluster.client(node).await?.channel());
        for service in ["", "kerwen.v1.Exchange", "kerwen.v1.Admin", "kerwen.v1.Access"] {
            let status = health.check(HealthCheckRequest { service: service.into() }).await?.into_inner().status;
            assert_eq!(status, ServingStatus::Serving as i32, "node {node}, service {service:?}");
        }
        let unknown = health.check(HealthCheckRequest { service: "no.such.Service".into() }).await;
        assert_eq!(unknown.map_err(|s| s.code()).err(), Some(tonic::Code::NotFound));
    }
    Ok(())
}
