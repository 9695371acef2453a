//! OpenTelemetry traces: the tracer provider with its OTLP/HTTP exporter, and the trace id
//! of the request being handled (for the access log).

use opentelemetry::trace::TraceContextExt;

/// The current span's trace id as 32 hex digits; empty when there is no trace (tracing
/// off, or not sampled).
pub fn current_trace_id() -> String {
    let cx = opentelemetry::Context::current();
    let span = cx.span();
    let sc = span.span_context();
    if sc.is_valid() {
        sc.trace_id().to_string()
    } else {
        String::new()
    }
}
