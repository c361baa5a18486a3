//! Logs and traces. Logs go to stderr (`RUST_LOG` filters them). Traces are exported over
//! OTLP/gRPC when the standard OpenTelemetry variables ask for it
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_BSP_*` are honoured by the
//! SDK); otherwise no span is sent anywhere and the per-message trace work is skipped.
//!
//! Trace context travels as W3C `traceparent` / `tracestate`: in gRPC metadata between a
//! client and a node, and with each stored message (its *creation context*), so a delivery
//! continues the trace its publish began, whenever and wherever it happens.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The W3C trace-context header (and message header) names.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// `messaging.system` of Kerwen's spans (the semantic conventions allow custom values).
pub const MESSAGING_SYSTEM: &str = "kerwen";

/// What spans are exported when tracing is on: the request paths of Kerwen's own crates.
const TRACE_FILTER: &str = "kerwen_node=info,kerwen_broker=info";

static TRACING: AtomicBool = AtomicBool::new(false);

/// Whether spans are being exported (skip per-message trace work when not).
pub fn enabled() -> bool {
    TRACING.load(Ordering::Relaxed)
}

/// Keeps the exporter alive; [`Telemetry::shutdown`] flushes the spans still buffered.
#[must_use = "dropping it without shutdown loses the last spans"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is buffered and stops the exporter (a no-op when tracing is off).
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            // Shutting down blocks until the export finished: off the async workers.
            let result = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(e)) = result {
                eprintln!("warning: flushing traces failed: {e}");
            }
        }
    }
}

/// Whether the environment asks for OTLP trace export.
fn otlp_requested() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let exporter_off = std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim() == "none");
    !exporter_off && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Sets up logging (`RUST_LOG`, else `default_filter`) and, when the environment asks for
/// it, OTLP trace export. Call once, inside the Tokio runtime.
pub fn init(default_filter: &str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi).with_filter(filter);
    let (provider, problem) = if otlp_requested() {
        match tracer_provider() {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e)),
        }
    } else {
        (None, None)
    };
    let traces = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer().with_tracer(p.tracer("kerwen")).with_filter(EnvFilter::new(TRACE_FILTER))
    });
    tracing_subscriber::registry().with(logs).with(traces).init();
    if let Some(e) = problem {
        tracing::warn!(error = %e, "OTLP trace export is configured but could not start; continuing without traces");
    }
    if provider.is_some() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        TRACING.store(true, Ordering::Relaxed);
        tracing::info!("exporting traces over OTLP/gRPC");
    }
    Telemetry { provider }
}

fn tracer_provider() -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig as _;
    if let Ok(p) = std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL") {
        if p.trim() != "grpc" {
            anyhow::bail!("OTEL_EXPORTER_OTLP_PROTOCOL={p} is not supported: Kerwen exports over grpc");
        }
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().with_protocol(opentelemetry_otlp::Protocol::Grpc).build()?;
    let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
        exporter,
        opentelemetry_sdk::runtime::Tokio,
    )
    .build();
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name("kerwen");
    }
    Ok(SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource.build()).build())
}

/// The one destination all these recipients share, or `""` for several (or none).
pub fn single_destination<'a>(mut recipients: impl Iterator<Item = &'a str>) -> &'a str {
    let first = recipients.next().unwrap_or("");
    if recipients.all(|r| r == first) {
        first
    } else {
        ""
    }
}

/// A messaging span name: `{operation} {destination}`, or the operation alone.
pub fn operation_name(operation: &'static str, destination: &str) -> std::borrow::Cow<'static, str> {
    if destination.is_empty() {
        operation.into()
    } else {
        format!("{operation} {destination}").into()
    }
}

/// Reads W3C trace context from gRPC metadata.
struct MetadataCarrier<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Writes W3C trace context into gRPC metadata.
struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        let (Ok(key), Ok(value)) =
            (tonic::metadata::MetadataKey::from_bytes(key.as_bytes()), tonic::metadata::MetadataValue::try_from(value))
        else {
            return;
        };
        self.0.insert(key, value);
    }
}

/// A trace context given as `traceparent` (and optionally `tracestate`) strings.
struct TextCarrier<'a> {
    traceparent: &'a str,
    tracestate: Option<&'a str>,
}

impl Extractor for TextCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => Some(self.traceparent),
            TRACESTATE => self.tracestate,
            _ => None,
        }
    }
    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

/// The remote context a request's metadata carries, if any valid one.
pub fn from_metadata(metadata: &tonic::metadata::MetadataMap) -> Option<Context> {
    let cx = TraceContextPropagator::new().extract(&MetadataCarrier(metadata));
    cx.span().span_context().is_valid().then_some(cx)
}

/// The context a `traceparent` string names, if it is well formed.
pub fn from_traceparent(traceparent: &str, tracestate: Option<&str>) -> Option<Context> {
    let cx = TraceContextPropagator::new().extract(&TextCarrier { traceparent, tracestate });
    cx.span().span_context().is_valid().then_some(cx)
}

/// The `traceparent` of `span` as exported (`None` when tracing is off).
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if !enabled() {
        return None;
    }
    let mut fields = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut fields);
    fields.remove(TRACEPARENT)
}

/// Makes `span` a child of the context `parent` finds; when tracing is off, `parent` is not
/// even called (no parsing on the hot path for nothing).
pub fn set_parent(span: &tracing::Span, parent: impl FnOnce() -> Option<Context>) {
    if !enabled() {
        return;
    }
    if let Some(cx) = parent() {
        // Fails only when the span is disabled or already started a trace of its own.
        let _ = span.set_parent(cx);
    }
}

/// Adds the current span's context to outgoing request metadata (no-op when tracing is off).
pub fn inject_current(metadata: &mut tonic::metadata::MetadataMap) {
    if enabled() {
        TraceContextPropagator::new().inject_context(&tracing::Span::current().context(), &mut MetadataInjector(metadata));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_round_trips_and_garbage_is_refused() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = from_traceparent(tp, None).expect("valid");
        assert_eq!(cx.span().span_context().trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(from_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None).is_none());
        assert!(from_traceparent("not a traceparent", None).is_none());
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert(TRACEPARENT, tp.parse().expect("ascii"));
        assert_eq!(from_metadata(&md).map(|c| c.span().span_context().span_id().to_string()), Some("00f067aa0ba902b7".into()));
    }
}
