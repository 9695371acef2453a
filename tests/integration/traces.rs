//! Traces and access logs of the real binary: its spans are exported over OTLP/HTTP to a
//! receiver in this test that decodes the protobuf (`common::otlp`), and its JSON log
//! lines are read back. The tracer provider is process-global, so pullcache runs as its own
//! process here.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use actix_web::http::StatusCode;

use crate::common::otlp::{start_receiver, CollectedSpan};
use crate::common::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
const WARM_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

fn traceparent(trace: &str, span: &str) -> String {
    format!("00-{trace}-{span}-01")
}

/// The one span of `trace` named `name`.
fn span<'a>(spans: &'a [CollectedSpan], trace: &str, name: &str) -> &'a CollectedSpan {
    let found: Vec<_> = spans
        .iter()
        .filter(|s| s.trace_id == trace && s.name == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {name} span in trace {trace}; spans: {:#?}",
        names(spans, trace)
    );
    found[0]
}

fn names(spans: &[CollectedSpan], trace: &str) -> Vec<String> {
    spans
        .iter()
        .filter(|s| s.trace_id == trace)
        .map(|s| s.name.clone())
        .collect()
}

fn attr<'a>(s: &'a CollectedSpan, key: &str) -> &'a str {
    s.attributes
        .get(key)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("{} has no {key}: {:?}", s.name, s.attributes))
}

#[actix_rt::test]
async fn a_cold_pull_is_one_trace_under_the_callers_and_a_warm_pull_is_short() {
    let up = FakeUpstream::start();
    up.knobs.require_token.store(true, Ordering::SeqCst);
    let layer = data(950, 200_000);
    let (_, digests) = up.add_image("library/traced", "v1", std::slice::from_ref(&layer));
    let d = &digests[0];
    let t = Traced::start(&up).await;
    let (receiver, dir, log, base) = (&t.receiver, &t.dir, &t.log, &t.base);
    let blob = format!("{base}/v2/traced/blobs/{d}");

    // Cold, inside the caller's trace.
    let tp = traceparent(TRACE, CALLER_SPAN);
    let (st, _, body) = get(&blob, &[("traceparent", &tp)]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(&sha256(&body.unwrap()), d);
    // Warm, in another trace.
    for _ in 0..100 {
        if std::fs::read_dir(dir.path().join("data/blobs/sha256"))
            .map(|r| r.count() > 0)
            .unwrap_or(false)
        {
            break;
        }
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    actix_rt::time::sleep(Duration::from_millis(200)).await;
    let tp2 = traceparent(WARM_TRACE, CALLER_SPAN);
    let (st, _, _) = get(&blob, &[("traceparent", &tp2)]).await;
    assert_eq!(st, StatusCode::OK);

    let want = [
        "blob.lookup",
        "blob.fill",
        "upstream.download",
        "upstream.token",
        "blob.verify",
        "blob.commit",
    ];
    let spans = receiver
        .wait_for(Duration::from_secs(20), |s| {
            want.iter()
                .all(|w| s.iter().any(|x| x.trace_id == TRACE && x.name == *w))
                && s.iter()
                    .any(|x| x.trace_id == WARM_TRACE && x.kind == "server")
        })
        .await;

    // The caller's trace is kept: the server span's parent is the caller's span.
    let server: Vec<_> = spans
        .iter()
        .filter(|s| s.trace_id == TRACE && s.kind == "server")
        .collect();
    assert_eq!(server.len(), 1, "{:#?}", names(&spans, TRACE));
    let server = server[0];
    assert_eq!(server.parent_span_id, CALLER_SPAN);
    assert_eq!(server.service_name, "pullcache-test");
    assert_eq!(attr(server, "http.response.status_code"), "200");

    let route = span(&spans, TRACE, "route");
    assert_eq!(route.parent_span_id, server.span_id);
    assert_eq!(attr(route, "pullcache.upstream"), "docker.io");
    assert_eq!(attr(route, "pullcache.route.via"), "default");
    assert_eq!(attr(route, "oci.repository"), "library/traced");

    let lookup = span(&spans, TRACE, "blob.lookup");
    assert_eq!(lookup.parent_span_id, server.span_id);
    assert_eq!(attr(lookup, "cache.outcome"), "miss");
    assert_eq!(attr(lookup, "oci.digest"), d);

    let fill = span(&spans, TRACE, "blob.fill");
    assert_eq!(fill.parent_span_id, lookup.span_id);
    assert_eq!(attr(fill, "pullcache.fill.outcome"), "done");

    let download = span(&spans, TRACE, "upstream.download");
    assert_eq!(download.parent_span_id, fill.span_id);
    assert_eq!(attr(download, "pullcache.bytes"), layer.len().to_string());
    assert_eq!(attr(download, "http.response.status_code"), "200");

    // Its upstream requests are client spans under it: the challenged GET, the token, the
    // GET with the token.
    let token = span(&spans, TRACE, "upstream.token");
    assert_eq!(token.parent_span_id, download.span_id);
    let clients: Vec<_> = spans
        .iter()
        .filter(|s| s.trace_id == TRACE && s.kind == "client")
        .collect();
    assert!(
        clients.iter().any(|c| c.parent_span_id == download.span_id
            && c.attributes
                .get("http.response.status_code")
                .map(String::as_str)
                == Some("200")),
        "a client GET under the download: {clients:#?}"
    );
    assert!(
        clients.iter().any(|c| c.parent_span_id == token.span_id),
        "the token request is a client span under upstream.token"
    );

    let verify = span(&spans, TRACE, "blob.verify");
    assert_eq!(verify.parent_span_id, fill.span_id);
    assert_eq!(attr(verify, "pullcache.digest.match"), "true");
    let commit = span(&spans, TRACE, "blob.commit");
    assert_eq!(commit.parent_span_id, fill.span_id);

    // The trace went on to the upstream in `traceparent`.
    let sent = up.counts.traceparents.lock().unwrap().clone();
    assert!(
        sent.iter().any(|t| t.contains(TRACE)),
        "the upstream saw the caller's trace id: {sent:?}"
    );

    // Warm: server, route and a lookup that hit; nothing else.
    let warm: BTreeMap<_, _> = spans
        .iter()
        .filter(|s| s.trace_id == WARM_TRACE)
        .map(|s| (s.name.clone(), s))
        .collect();
    let lookup = span(&spans, WARM_TRACE, "blob.lookup");
    assert_eq!(attr(lookup, "cache.outcome"), "hit");
    for cold_only in [
        "blob.fill",
        "upstream.download",
        "blob.verify",
        "blob.commit",
    ] {
        assert!(!warm.contains_key(cold_only), "warm trace has {cold_only}");
    }
    assert!(!spans
        .iter()
        .any(|s| s.trace_id == WARM_TRACE && s.kind == "client"));

    // The access log: one JSON line per request with plain values and the trace id; no
    // credential anywhere.
    drop(t.daemon);
    let text = std::fs::read_to_string(log).unwrap();
    let access: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "pullcache::access")
        .collect();
    let cold = access
        .iter()
        .find(|v| v["trace_id"] == TRACE)
        .unwrap_or_else(|| panic!("no access line with the trace id: {text}"));
    assert_eq!(cold["method"], "GET");
    assert_eq!(cold["path"], format!("/v2/traced/blobs/{d}"));
    assert_eq!(cold["status"], 200);
    assert_eq!(cold["bytes"], layer.len() as u64);
    assert_eq!(cold["complete"], true);
    assert_eq!(cold["upstream"], "docker.io");
    assert_eq!(cold["type"], "blob");
    assert_eq!(cold["outcome"], "miss");
    assert!(cold["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(cold["ms"].as_f64().unwrap() > 0.0);
    let warm = access.iter().find(|v| v["trace_id"] == WARM_TRACE).unwrap();
    assert_eq!(warm["outcome"], "hit");
    let some: Vec<_> = text.lines().filter(|l| l.contains("Some(")).collect();
    assert!(some.is_empty(), "plain values only: {some:#?}");
    assert!(!text.contains("pa55-not-in-logs"), "password in the log");
    assert!(!text.contains("tok-"), "token in the log");
    assert!(!text.contains("Bearer"), "Authorization in the log");
}

/// The real binary exporting traces to a receiver in this test, logging JSON to a file.
struct Traced {
    daemon: Daemon,
    receiver: crate::common::otlp::ReceiverHandle,
    dir: tempfile::TempDir,
    log: std::path::PathBuf,
    base: String,
}

impl Traced {
    async fn start(up: &FakeUpstream) -> Traced {
        Self::start_with(up, true, &[], "").await
    }

    /// `in_config`: the endpoint in `[telemetry]` (else only `env` can name one);
    /// `storage`: more keys of `[storage]`.
    async fn start_with(
        up: &FakeUpstream,
        in_config: bool,
        env: &[(&str, &str)],
        storage: &str,
    ) -> Traced {
        let (receiver_addr, receiver) = start_receiver();
        let endpoint = if in_config {
            format!("http://{receiver_addr}")
        } else {
            String::new()
        };
        let receiver_url = format!("http://{receiver_addr}");
        let mut env: Vec<(&str, &str)> = env
            .iter()
            .map(|(k, v)| {
                (
                    *k,
                    if *v == "$RECEIVER" {
                        receiver_url.as_str()
                    } else {
                        *v
                    },
                )
            })
            .collect();
        env.push(("OTEL_BSP_SCHEDULE_DELAY", "100"));
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let cfg = dir.path().join("pullcache.toml");
        std::fs::write(
            &cfg,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n\
                 [storage]\nroot = \"{}\"\n{storage}\n[log]\nformat = \"json\"\n\
                 [telemetry]\notlp_endpoint = \"{endpoint}\"\nservice_name = \"pullcache-test\"\n\
                 [[upstreams]]\nname = \"docker.io\"\nurl = \"{}\"\ndefault = true\n\
                 username = \"alice\"\npassword = \"pa55-not-in-logs\"\n",
                dir.path().join("data").display(),
                up.url()
            ),
        )
        .unwrap();
        let log = dir.path().join("stderr.log");
        let daemon = Daemon::start(&cfg, port, &env, Some(&log)).await;
        Traced {
            daemon,
            receiver,
            dir,
            log,
            base: format!("http://127.0.0.1:{port}"),
        }
    }
}

#[actix_rt::test]
async fn a_joined_download_names_the_trace_that_started_it_and_manifests_resolve_in_a_span() {
    let up = FakeUpstream::start();
    let layer = data(960, 300_000);
    let (_, digests) = up.add_image("library/joined", "v2", std::slice::from_ref(&layer));
    let d = &digests[0];
    up.knobs.use_gate.store(true, Ordering::SeqCst);
    let t = Traced::start(&up).await;
    let blob = format!("{}/v2/joined/blobs/{d}", t.base);
    const LEADER: &str = "11111111111111111111111111111111";
    const JOINER: &str = "22222222222222222222222222222222";
    const MANIFEST: &str = "33333333333333333333333333333333";
    let first = client()
        .get(&blob)
        .insert_header(("traceparent", traceparent(LEADER, CALLER_SPAN)))
        .send()
        .await
        .expect("headers");
    let second = client()
        .get(&blob)
        .insert_header(("traceparent", traceparent(JOINER, CALLER_SPAN)))
        .send()
        .await
        .expect("headers");
    up.open_gate();
    for mut r in [first, second] {
        assert_eq!(&sha256(&r.body().limit(1 << 20).await.unwrap()), d);
    }
    let tp = traceparent(MANIFEST, CALLER_SPAN);
    let (st, _, _) = get(
        &format!("{}/v2/joined/manifests/v2", t.base),
        &[("accept", OCI_MANIFEST), ("traceparent", &tp)],
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let spans = t
        .receiver
        .wait_for(Duration::from_secs(20), |s| {
            s.iter()
                .any(|x| x.trace_id == JOINER && x.name == "blob.coalesce")
                && s.iter()
                    .any(|x| x.trace_id == LEADER && x.name == "blob.commit")
                && s.iter()
                    .any(|x| x.trace_id == MANIFEST && x.name == "manifest.resolve")
        })
        .await;
    let join = span(&spans, JOINER, "blob.coalesce");
    assert_eq!(attr(join, "pullcache.coalesce.leader_trace_id"), LEADER);
    let lookup = span(&spans, JOINER, "blob.lookup");
    assert_eq!(attr(lookup, "cache.outcome"), "coalesced");
    assert_eq!(join.parent_span_id, lookup.span_id);
    assert!(!names(&spans, JOINER).contains(&"blob.fill".to_string()));
    assert_eq!(
        attr(span(&spans, LEADER, "blob.lookup"), "cache.outcome"),
        "miss"
    );

    let resolve = span(&spans, MANIFEST, "manifest.resolve");
    assert_eq!(attr(resolve, "cache.outcome"), "miss");
    assert_eq!(attr(resolve, "oci.reference"), "v2");
    assert!(
        spans.iter().any(|s| s.trace_id == MANIFEST
            && s.kind == "client"
            && s.parent_span_id == resolve.span_id),
        "the upstream GET of the manifest is a client span under manifest.resolve"
    );
}

#[actix_rt::test]
async fn the_standard_otel_variables_name_the_endpoint_and_the_service() {
    let up = FakeUpstream::start();
    let t = Traced::start_with(
        &up,
        false,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "$RECEIVER"),
            ("OTEL_SERVICE_NAME", "mirror-from-env"),
        ],
        "",
    )
    .await;
    const T: &str = "44444444444444444444444444444444";
    let (st, _, _) = get(
        &format!("{}/v2/", t.base),
        &[("traceparent", &traceparent(T, CALLER_SPAN))],
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let spans = t
        .receiver
        .wait_for(Duration::from_secs(20), |s| {
            s.iter().any(|x| x.trace_id == T)
        })
        .await;
    let server = spans
        .iter()
        .find(|s| s.trace_id == T && s.kind == "server")
        .expect("the server span, exported to the endpoint from the environment");
    assert_eq!(server.service_name, "mirror-from-env");
    assert_eq!(server.parent_span_id, CALLER_SPAN);
}

/// A redirect target's URL carries a signature: it never reaches the trace backend.
#[actix_rt::test]
async fn a_signed_redirect_url_stays_out_of_the_traces() {
    let up = FakeUpstream::start();
    up.knobs.redirect_blobs.store(true, Ordering::SeqCst);
    let d = up.add_blob(&data(980, 50_000));
    let t = Traced::start(&up).await;
    const R: &str = "55555555555555555555555555555555";
    let tp = traceparent(R, CALLER_SPAN);
    let (st, _, b) = get(
        &format!("{}/v2/library/x/blobs/{d}", t.base),
        &[("traceparent", &tp)],
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(sha256(&b.unwrap()), d);
    let spans = t
        .receiver
        .wait_for(Duration::from_secs(20), |s| {
            s.iter().any(|x| x.trace_id == R && x.name == "blob.commit")
                && s.iter()
                    .any(|x| x.trace_id == R && x.name == "upstream.redirect")
        })
        .await;
    let download = span(&spans, R, "upstream.download");
    let hop = span(&spans, R, "upstream.redirect");
    assert_eq!(hop.parent_span_id, download.span_id);
    assert_eq!(attr(hop, "server.address"), "127.0.0.1");
    assert_eq!(attr(hop, "http.response.status_code"), "200");
    for s in &spans {
        for (k, v) in &s.attributes {
            assert!(!v.contains("sig="), "{}: {k} = {v}", s.name);
        }
    }
}

/// An eviction sweep is background work: a trace of its own, saying what it evicted.
#[actix_rt::test]
async fn an_eviction_sweep_is_a_trace_of_its_own() {
    let up = FakeUpstream::start();
    let blobs: Vec<_> = (0..3)
        .map(|i| up.add_blob(&data(970 + i, 400_000)))
        .collect();
    let t = Traced::start_with(
        &up,
        true,
        &[],
        "max_size = \"1MB\"\nsweep_interval = \"200ms\"",
    )
    .await;
    for d in &blobs {
        let (st, _, b) = get(&format!("{}/v2/library/x/blobs/{d}", t.base), &[]).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(&sha256(&b.unwrap()), d);
    }
    // A sweep that evicted something (the one at start evicts nothing).
    let evicted = |x: &CollectedSpan| {
        x.name == "eviction.sweep"
            && x.attributes
                .get("pullcache.evicted.blobs")
                .is_some_and(|n| n != "0")
    };
    let spans = t
        .receiver
        .wait_for(Duration::from_secs(20), |s| s.iter().any(evicted))
        .await;
    let sweep = spans
        .iter()
        .find(|x| evicted(x))
        .unwrap_or_else(|| panic!("no sweep that evicted: {spans:#?}"));
    assert_eq!(sweep.parent_span_id, "", "a root span");
    assert_eq!(attr(sweep, "pullcache.evict.reason"), "high_watermark");
    assert!(
        attr(sweep, "pullcache.evicted.bytes")
            .parse::<u64>()
            .unwrap()
            >= 400_000
    );
    assert!(
        !spans.iter().any(|s| s.trace_id == sweep.trace_id
            && s.span_id != sweep.span_id
            && s.kind == "server"),
        "no request in the sweep's trace"
    );
}

#[actix_rt::test]
async fn a_level_that_is_not_a_level_stops_the_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("pullcache.toml");
    std::fs::write(&cfg, "[log]\nlevel = \"warning\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pullcache"))
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("log.level") && err.contains("warning"),
        "{err}"
    );
}
