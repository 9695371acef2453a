//! Minimal OTLP/HTTP (protobuf) trace receiver for integration tests.
//!
//! Plain std::net listener on its own thread (never on the actix test runtime: the SDK's
//! `force_flush()`/`shutdown()` block the calling thread until the export finished, so a
//! receiver living on that same thread would dead-lock). HTTP/1.1 with keep-alive,
//! Content-Length and chunked bodies. gzip is not supported (415): the exporter only
//! compresses with the `gzip-http` feature + OTEL_EXPORTER_OTLP_COMPRESSION, neither on.
//!
//! It decodes the protobuf with `opentelemetry-proto`'s message types (no tonic).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, KeyValue};
use prost::Message;

#[derive(Debug, Clone)]
pub struct CollectedSpan {
    pub name: String,
    pub trace_id: String,       // 32 lowercase hex
    pub span_id: String,        // 16 lowercase hex
    pub parent_span_id: String, // 16 hex, "" for a root span
    pub kind: &'static str, // "server" | "client" | "internal" | "producer" | "consumer" | "unspecified"
    pub attributes: BTreeMap<String, String>,
    pub service_name: String, // resource attribute service.name
    pub resource: BTreeMap<String, String>,
    pub scope: String, // instrumentation scope name
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
}

/// Headers of each export request (lowercase names), for assertions on the exporter itself.
pub type RequestHeaders = BTreeMap<String, String>;

#[derive(Default)]
struct Shared {
    spans: Mutex<Vec<CollectedSpan>>,
    requests: Mutex<Vec<RequestHeaders>>,
    stop: AtomicBool,
}

/// Dropping the handle stops the listener thread.
pub struct ReceiverHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

/// Listen on 127.0.0.1:0. Point the exporter at `format!("http://{addr}")`
/// (init_tracing appends /v1/traces) or set OTEL_EXPORTER_OTLP_ENDPOINT to that.
pub fn start_receiver() -> (SocketAddr, ReceiverHandle) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind otlp receiver");
    let addr = listener.local_addr().unwrap();
    let shared = Arc::new(Shared::default());
    let sh = shared.clone();
    std::thread::Builder::new()
        .name("otlp-receiver".into())
        .spawn(move || {
            for conn in listener.incoming() {
                if sh.stop.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let sh = sh.clone();
                    std::thread::spawn(move || {
                        let _ = serve_conn(conn, &sh);
                    });
                }
            }
        })
        .unwrap();
    (addr, ReceiverHandle { addr, shared })
}

impl ReceiverHandle {
    pub fn spans(&self) -> Vec<CollectedSpan> {
        self.shared.spans.lock().unwrap().clone()
    }

    pub fn requests(&self) -> Vec<RequestHeaders> {
        self.shared.requests.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.shared.spans.lock().unwrap().clear();
    }

    /// Poll (async, for `#[actix_rt::test]`) until `done(&spans)` or `timeout`; returns the
    /// spans seen either way. Call `provider.force_flush()` first, or set
    /// OTEL_BSP_SCHEDULE_DELAY low, or this waits for the 5 s batch delay.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&[CollectedSpan]) -> bool,
    ) -> Vec<CollectedSpan> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if done(&spans) || Instant::now() >= deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ReceiverHandle {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wake the accept() loop
    }
}

fn serve_conn(conn: TcpStream, sh: &Shared) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut out = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    loop {
        // request line
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(()); // client closed (keep-alive end)
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_owned(),
            parts.next().unwrap_or("").to_owned(),
        );
        let http10 = parts.next() == Some("HTTP/1.0");
        // headers
        let mut headers = RequestHeaders::new();
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        if headers
            .get("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
        {
            out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        // body
        let mut body = Vec::new();
        if headers
            .get("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            loop {
                line.clear();
                r.read_line(&mut line)?;
                let n = usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                if n == 0 {
                    // trailers until empty line
                    loop {
                        line.clear();
                        if r.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                let start = body.len();
                body.resize(start + n, 0);
                r.read_exact(&mut body[start..])?;
                line.clear();
                r.read_line(&mut line)?;
            }
        } else if let Some(n) = headers
            .get("content-length")
            .and_then(|v| v.parse::<usize>().ok())
        {
            body.resize(n, 0);
            r.read_exact(&mut body)?;
        }
        let close = http10
            || headers
                .get("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close"));

        let (status, resp_body): (&str, Vec<u8>) = if method != "POST" || path != "/v1/traces" {
            ("404 Not Found", Vec::new())
        } else if !headers
            .get("content-type")
            .is_some_and(|ct| ct.starts_with("application/x-protobuf"))
            || headers
                .get("content-encoding")
                .is_some_and(|e| !e.eq_ignore_ascii_case("identity"))
        {
            ("415 Unsupported Media Type", Vec::new())
        } else {
            match ExportTraceServiceRequest::decode(body.as_slice()) {
                Ok(req) => {
                    sh.requests.lock().unwrap().push(headers.clone());
                    collect(req, sh);
                    (
                        "200 OK",
                        ExportTraceServiceResponse::default().encode_to_vec(),
                    )
                }
                Err(_) => ("400 Bad Request", Vec::new()),
            }
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\n{}\r\n",
            resp_body.len(),
            if close { "Connection: close\r\n" } else { "" },
        );
        out.write_all(head.as_bytes())?;
        out.write_all(&resp_body)?;
        out.flush()?;
        if close {
            return Ok(());
        }
    }
}

fn collect(req: ExportTraceServiceRequest, sh: &Shared) {
    let mut out = Vec::new();
    for rs in req.resource_spans {
        let resource_attrs = rs
            .resource
            .map(|r| attrs(&r.attributes))
            .unwrap_or_default();
        let service_name = resource_attrs
            .get("service.name")
            .cloned()
            .unwrap_or_default();
        for ss in rs.scope_spans {
            let scope = ss.scope.map(|s| s.name).unwrap_or_default();
            for s in ss.spans {
                out.push(CollectedSpan {
                    name: s.name,
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    kind: match s.kind {
                        1 => "internal",
                        2 => "server",
                        3 => "client",
                        4 => "producer",
                        5 => "consumer",
                        _ => "unspecified",
                    },
                    attributes: attrs(&s.attributes),
                    service_name: service_name.clone(),
                    resource: resource_attrs.clone(),
                    scope: scope.clone(),
                    start_unix_nano: s.start_time_unix_nano,
                    end_unix_nano: s.end_time_unix_nano,
                });
            }
        }
    }
    sh.spans.lock().unwrap().extend(out);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value_str(kv.value.as_ref())))
        .collect()
}

fn value_str(v: Option<&AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BytesValue(b)) => hex(b),
        Some(Value::ArrayValue(a)) => {
            let items: Vec<String> = a.values.iter().map(|v| value_str(Some(v))).collect();
            format!("[{}]", items.join(","))
        }
        Some(Value::KvlistValue(l)) => format!("{:?}", attrs(&l.values)),
        _ => String::new(),
    }
}
