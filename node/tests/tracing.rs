//! Distributed tracing through real `kerwen serve` processes: with the standard OpenTelemetry
//! variables pointing at a stand-in OTLP/gRPC collector, one trace holds a message's publish
//! span and its delivery span, whichever way the publisher passed its context (gRPC metadata
//! or the message's own `traceparent` header), or none (the node's publish span starts it).

mod harness;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use harness::{consume_all_of, create_mailbox, delivered_id, eventually, message, publish_retry, Cluster, Consumer, ProcessCluster, TEST_SUBSYSTEM};
use kerwen_proto::v1::exchange_client::ExchangeClient;
use kerwen_proto::v1::PublishRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

const MAILBOX: &str = "TM/GOV/MINCOM/registry/traced";
/// The publisher's own span contexts (as its tracer would make them).
const PUBLISHER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PUBLISHER_SPAN: &str = "00f067aa0ba902b7";
const HEADER_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const HEADER_SPAN: &str = "b7ad6b7169203331";

/// One exported span, as the collector received it.
#[derive(Debug, Clone)]
struct ReceivedSpan {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    message_id: Option<String>,
}

/// A stand-in OpenTelemetry collector: keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for span in request.into_inner().resource_spans.into_iter().flat_map(|r| r.scope_spans).flat_map(|s| s.spans) {
            let message_id = span.attributes.iter().find(|kv| kv.key == "messaging.message.id").and_then(|kv| {
                match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                }
            });
            spans.push(ReceivedSpan {
                trace_id: hex::encode(&span.trace_id),
                span_id: hex::encode(&span.span_id),
                parent_span_id: hex::encode(&span.parent_span_id),
                name: span.name,
                message_id,
            });
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Collector {
    /// Listens on an OS-assigned loopback port; returns its `http://` endpoint.
    async fn start(&self) -> Result<(String, tokio::task::JoinHandle<()>)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let service = TraceServiceServer::new(self.clone());
        let server = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await;
        });
        Ok((endpoint, server))
    }

    fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_holds_the_publish_and_the_delivery_of_a_message() {
    let collector = Collector::default();
    let (endpoint, server) = collector.start().await.expect("collector");
    let cluster = ProcessCluster::builder()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .start()
        .await
        .expect("cluster start");
    let outcome = scenario(&cluster, &collector).await;
    server.abort();
    outcome.expect("scenario failed");
}

async fn scenario(cluster: &ProcessCluster, collector: &Collector) -> Result<()> {
    create_mailbox(cluster, 1, MAILBOX, 2).await?;
    // 1. The publisher's context in gRPC metadata, as an instrumented client sends it.
    let tls = cluster.subsystem_tls(TEST_SUBSYSTEM)?;
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", cluster.endpoint(1)))?
        .tls_config(tls.tonic_config())?
        .connect()
        .await?;
    let mut request = tonic::Request::new(PublishRequest {
        messages: vec![message("by-metadata", MAILBOX, None, b"one".to_vec())],
    });
    request.metadata_mut().insert("traceparent", format!("00-{PUBLISHER_TRACE}-{PUBLISHER_SPAN}-01").parse()?);
    let published = eventually("publish with a traceparent", Duration::from_secs(30), || {
        let mut exchange = ExchangeClient::new(channel.clone());
        let request = clone_request(&request);
        async move { Ok(exchange.publish(request).await.ok()) }
    })
    .await?;
    ensure!(published.get_ref().results.len() == 1);
    // 2. The message's own header; 3. no context at all.
    let mut client = cluster.client(2).await?;
    let mut by_header = message("by-header", MAILBOX, None, b"two".to_vec());
    by_header.headers.insert("traceparent".into(), format!("00-{HEADER_TRACE}-{HEADER_SPAN}-01"));
    let untraced = message("untraced", MAILBOX, None, b"three".to_vec());
    publish_retry(&mut client, &[by_header, untraced], Duration::from_secs(10), Duration::from_secs(30)).await?;

    let mut consumer = Consumer::open(&mut cluster.client(3).await?, MAILBOX, 16).await?;
    let ids: HashSet<String> = ["by-metadata", "by-header", "untraced"].map(String::from).into();
    let deliveries = consume_all_of(&mut consumer, &ids, Duration::from_secs(30), Duration::from_millis(300)).await?;
    let mut delivered_trace = std::collections::BTreeMap::new();
    for d in &deliveries {
        let tp = d.traceparent.clone().with_context(|| format!("delivery of {} without traceparent", delivered_id(d).unwrap_or_default()))?;
        delivered_trace.insert(delivered_id(d)?, tp.split('-').nth(1).unwrap_or_default().to_owned());
    }
    ensure!(delivered_trace["by-metadata"] == PUBLISHER_TRACE, "consumer got {delivered_trace:?}");
    ensure!(delivered_trace["by-header"] == HEADER_TRACE, "consumer got {delivered_trace:?}");
    let untraced_trace = delivered_trace["untraced"].clone();

    let send_name = format!("send {MAILBOX}");
    let receive_name = format!("receive {MAILBOX}");
    eventually("publish and delivery spans in one trace per message", Duration::from_secs(30), || {
        let spans = collector.spans();
        let send_in = |trace: &str| spans.iter().find(|s| s.trace_id == trace && s.name == send_name).cloned();
        let receive_of = |trace: &str, id: &str| {
            spans.iter().find(|s| s.trace_id == trace && s.name == receive_name && s.message_id.as_deref() == Some(id)).cloned()
        };
        let found = (|| {
            // The node's publish span continues the publisher's span; the delivery joins it.
            let send = send_in(PUBLISHER_TRACE)?;
            let receive = receive_of(PUBLISHER_TRACE, "by-metadata")?;
            let header_receive = receive_of(HEADER_TRACE, "by-header")?;
            // Without a context, the node's publish span starts the trace its delivery joins.
            let untraced_send = send_in(&untraced_trace)?;
            let untraced_receive = receive_of(&untraced_trace, "untraced")?;
            Some((send, receive, header_receive, untraced_send, untraced_receive))
        })();
        let snapshot = spans.iter().map(|s| format!("{} {} {:?}", s.trace_id, s.name, s.message_id)).collect::<Vec<_>>();
        async move {
            match found {
                Some((send, receive, header_receive, untraced_send, untraced_receive)) => {
                    ensure!(send.parent_span_id == PUBLISHER_SPAN, "publish span's parent is {}", send.parent_span_id);
                    ensure!(receive.parent_span_id == PUBLISHER_SPAN, "delivery span's parent is {}", receive.parent_span_id);
                    ensure!(header_receive.parent_span_id == HEADER_SPAN, "delivery span's parent is {}", header_receive.parent_span_id);
                    ensure!(
                        untraced_receive.parent_span_id == untraced_send.span_id,
                        "delivery of the untraced message is not a child of its publish span"
                    );
                    Ok(Some(()))
                }
                None => {
                    harness::trace(format!("spans so far: {snapshot:?}"));
                    Ok(None)
                }
            }
        }
    })
    .await?;
    cluster.check_no_crash()
}

/// A publish request with the same body and metadata (a tonic request is not `Clone`).
fn clone_request(request: &tonic::Request<PublishRequest>) -> tonic::Request<PublishRequest> {
    let mut copy = tonic::Request::new(request.get_ref().clone());
    *copy.metadata_mut() = request.metadata().clone();
    copy
}
