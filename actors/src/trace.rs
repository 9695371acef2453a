//! Spans of what the cache did for a request, as OpenTelemetry children of the request's
//! server span. The request's [`Context`] travels in the messages (actors run on other
//! threads, so nothing relies on a thread-local current context), and each step opens a
//! [`Step`] under it: route choice, manifest resolution, blob lookup, a fill and its
//! upstream download, digest verification and the commit to the store, token fetches.
//! Upstream HTTP requests get client spans from the awc instrumentation, which also sends
//! the `traceparent` on to the upstream.
//!
//! Cost when traces are off: a parent that is not being recorded (no tracer provider, or
//! a trace that was not sampled) gives back a [`Step`] that records nothing and builds no
//! attributes.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{global, KeyValue};

pub use opentelemetry::Context;

/// The instrumentation scope of pullcache's own spans.
pub const SCOPE: &str = "pullcache";

/// Set once a tracer provider that exports is installed (root spans are only made then).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Root spans ([`Step::root`]) are recorded from now on: a tracer provider that exports
/// has been installed.
pub fn set_exporting(on: bool) {
    EXPORTING.store(on, Ordering::Relaxed);
}

/// Whether an exporting tracer provider is installed.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// One step's span. Ended when dropped (or by [`Step::end`]); a step that records
/// nothing is free.
pub struct Step {
    cx: Context,
    own: bool,
}

impl Step {
    /// A child of `parent` named `name`, with `attrs` (built only if it records).
    pub fn child(
        parent: &Context,
        name: &'static str,
        attrs: impl FnOnce() -> Vec<KeyValue>,
    ) -> Step {
        if !parent.span().is_recording() {
            return Step {
                cx: parent.clone(),
                own: false,
            };
        }
        let tracer = global::tracer(SCOPE);
        let span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .with_attributes(attrs())
            .start_with_context(&tracer, parent);
        Step {
            cx: parent.with_span(span),
            own: true,
        }
    }

    /// A span that starts a trace of its own (background work: eviction sweeps).
    pub fn root(name: &'static str, attrs: impl FnOnce() -> Vec<KeyValue>) -> Step {
        if !EXPORTING.load(Ordering::Relaxed) {
            return Step {
                cx: Context::new(),
                own: false,
            };
        }
        let tracer = global::tracer(SCOPE);
        let span = tracer
            .span_builder(name)
            .with_attributes(attrs())
            .start_with_context(&tracer, &Context::new());
        Step {
            cx: Context::new().with_span(span),
            own: true,
        }
    }

    /// The context for this step's children.
    pub fn cx(&self) -> &Context {
        &self.cx
    }

    /// Whether this step is recorded.
    pub fn recording(&self) -> bool {
        self.own && self.cx.span().is_recording()
    }

    /// Adds attributes (built only if recorded).
    pub fn set(&self, attrs: impl FnOnce() -> Vec<KeyValue>) {
        if self.recording() {
            self.cx.span().set_attributes(attrs());
        }
    }

    /// Marks the step failed with `error`.
    pub fn fail(&self, error: &dyn std::fmt::Display) {
        if self.recording() {
            let span = self.cx.span();
            span.set_attribute(KeyValue::new("error.type", error.to_string()));
            span.set_status(Status::error(error.to_string()));
        }
    }

    /// Ends the span now.
    pub fn end(self) {}
}

impl Drop for Step {
    fn drop(&mut self) {
        if self.own {
            self.cx.span().end();
        }
    }
}

/// The trace id of `cx`'s span as 32 hex digits; empty if none, or if the trace is not
/// sampled (it cannot be found in the trace backend).
pub fn trace_id(cx: &Context) -> String {
    let span = cx.span();
    let sc = span.span_context();
    if sc.is_valid() && sc.is_sampled() {
        sc.trace_id().to_string()
    } else {
        String::new()
    }
}

/// An attribute (shorter than `KeyValue::new` in the many `vec![...]` of attributes).
pub fn kv(key: &'static str, value: impl Into<opentelemetry::Value>) -> KeyValue {
    KeyValue::new(key, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_recorded_parent_nothing_is_built() {
        let parent = Context::new();
        let s = Step::child(&parent, "x", || panic!("attributes built for nothing"));
        assert!(!s.recording());
        s.set(|| panic!("attributes built for nothing"));
        let r = Step::root("y", || panic!("attributes built for nothing"));
        assert!(!r.recording());
    }
}
