//! OpenTelemetry traces: the tracer provider with its OTLP/HTTP exporter, the W3C
//! `traceparent` propagator, and the trace id of the request being handled (for the access
//! log). The server spans come from `opentelemetry-instrumentation-actix-web`
//! (`RequestTracing`, put in front of the app only when traces are exported); the engine's
//! spans are in `pullcache_actors::trace`.
//!
//! Which setting wins, so that the standard `OTEL_*` variables beat the file:
//! - endpoint: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (as is), then
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` (+ `/v1/traces`), then `telemetry.otlp_endpoint`
//!   (+ `/v1/traces`); none of them: no export;
//! - `service.name`: `OTEL_SERVICE_NAME`, then `service.name` in `OTEL_RESOURCE_ATTRIBUTES`,
//!   then `telemetry.service_name`;
//! - sampler: `OTEL_TRACES_SAMPLER` (+ `_ARG`), then
//!   `ParentBased(TraceIdRatioBased(telemetry.sample_ratio))`;
//! - `OTEL_SDK_DISABLED=true`: nothing is exported.
//!
//! The batch processor runs on its own thread ("OpenTelemetry.Traces.BatchProcessor") and
//! calls the exporter there with a blocking `block_on`: the exporter's HTTP client is ureq,
//! a blocking client, on that thread only (never on an HTTP worker or an actor's thread).

use std::io::Read;
use std::time::Duration;

use opentelemetry::global;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchSpanProcessor, Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;

use crate::config::TelemetrySettings;

/// The current span's trace id as 32 hex digits; empty when there is no trace (tracing
/// off, or not sampled).
pub fn current_trace_id() -> String {
    pullcache_actors::trace::trace_id(&opentelemetry::Context::current())
}

fn env_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty())
}

/// Where traces go, if anywhere: `None` when neither the configuration nor the
/// environment names an endpoint, or `OTEL_SDK_DISABLED=true`.
pub fn export_wanted(t: &TelemetrySettings) -> bool {
    let disabled =
        std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"));
    !disabled
        && (!t.otlp_endpoint.is_empty()
            || env_set("OTEL_EXPORTER_OTLP_ENDPOINT")
            || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The running exporter. Dropping it does not flush: call [`Traces::shutdown`] at exit.
pub struct Traces {
    provider: SdkTracerProvider,
}

impl Traces {
    /// Exports what is queued and stops the exporter's thread.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "flushing traces at shutdown failed");
        }
        pullcache_actors::trace::set_exporting(false);
    }
}

/// Installs the propagator and the exporting tracer provider, globally. `Ok(None)`: traces
/// are not exported (see [`export_wanted`]); `traceparent` is then neither read nor sent.
pub fn init(t: &TelemetrySettings) -> Result<Option<Traces>, String> {
    if !export_wanted(t) {
        return Ok(None);
    }
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(Ureq::new());
    // `with_endpoint` would beat both variables and is used as is: only when they are unset.
    if !env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        && !env_set("OTEL_EXPORTER_OTLP_ENDPOINT")
        && !t.otlp_endpoint.is_empty()
    {
        // The base URL, as OTEL_EXPORTER_OTLP_ENDPOINT; a URL already ending in the
        // traces path is taken as is.
        let base = t.otlp_endpoint.trim_end_matches('/');
        exporter = exporter.with_endpoint(if base.ends_with("/v1/traces") {
            base.to_string()
        } else {
            format!("{base}/v1/traces")
        });
    }
    let exporter = exporter
        .build()
        .map_err(|e| format!("telemetry.otlp_endpoint: cannot build the OTLP exporter: {e}"))?;
    // The builder reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; a service name set
    // here would override them.
    let mut resource = Resource::builder();
    let attrs_name = std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|s| {
        s.split(',')
            .any(|kv| kv.split('=').next().map(str::trim) == Some("service.name"))
    });
    if !env_set("OTEL_SERVICE_NAME") && !attrs_name {
        resource = resource.with_service_name(t.service_name.clone());
    }
    let mut builder = SdkTracerProvider::builder()
        .with_span_processor(BatchSpanProcessor::builder(exporter).build())
        .with_resource(resource.build());
    if !env_set("OTEL_TRACES_SAMPLER") {
        // The SDK reads OTEL_TRACES_SAMPLER_ARG only with OTEL_TRACES_SAMPLER; alone, it is
        // taken as the ratio here (as `sample_ratio` would be).
        let ratio = match std::env::var("OTEL_TRACES_SAMPLER_ARG") {
            Ok(v) if !v.trim().is_empty() => match v.trim().parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => r,
                _ => {
                    return Err(format!(
                        "OTEL_TRACES_SAMPLER_ARG: {v:?} is not a ratio between 0.0 and 1.0"
                    ))
                }
            },
            _ => t.sample_ratio,
        };
        builder = builder.with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))));
    }
    let provider = builder.build();
    global::set_text_map_propagator(TraceContextPropagator::new());
    global::set_tracer_provider(provider.clone());
    pullcache_actors::trace::set_exporting(true);
    Ok(Some(Traces { provider }))
}

/// The exporter's HTTP client: ureq (blocking, rustls), called on the batch processor's
/// own thread.
#[derive(Debug)]
struct Ureq(ureq::Agent);

impl Ureq {
    fn new() -> Ureq {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .into();
        Ureq(agent)
    }
}

#[async_trait::async_trait]
impl HttpClient for Ureq {
    async fn send_bytes(&self, req: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = req.into_parts();
        let res = self.0.run(Request::from_parts(parts, body.to_vec()))?;
        let (parts, body) = res.into_parts();
        let mut buf = Vec::new();
        // A collector's answer is a few bytes; never read more than 1 MiB of it.
        body.into_reader().take(1 << 20).read_to_end(&mut buf)?;
        Ok(Response::from_parts(parts, Bytes::from(buf)))
    }
}
