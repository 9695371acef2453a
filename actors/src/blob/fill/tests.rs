//! The fill writer and the wait helper, without an upstream or an HTTP server: events are
//! fed by hand, time is tokio's paused clock, and every wait is on the fill's own state,
//! so nothing here sleeps on a real clock.

use super::*;
use crate::digest::Algorithm;

/// Collects the one [`FillFinished`] a fill sends.
struct Collect(Option<tokio::sync::oneshot::Sender<FillFinished>>);

impl Actor for Collect {
    type Context = Context<Self>;
}

impl Handler<FillFinished> for Collect {
    type Result = ();
    fn handle(&mut self, m: FillFinished, _: &mut Self::Context) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(m);
        }
    }
}

struct Rig {
    _dir: tempfile::TempDir,
    store: BlobStore,
    events: Option<mpsc::Sender<DownloadEvent>>,
    state: watch::Receiver<FillState>,
    finished: tokio::sync::oneshot::Receiver<FillFinished>,
}

impl Rig {
    /// A fill of `digest`, started; nothing sent yet.
    fn start(digest: &Digest) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let (tx, finished) = tokio::sync::oneshot::channel();
        let report = Collect(Some(tx)).start().recipient();
        let (events_tx, events) = mpsc::channel(FILL_CHANNEL);
        let (state_tx, state) = watch::channel(FillState::Connecting);
        FillWriter {
            key: (UpstreamId::new(0), digest.clone()),
            id: 1,
            upstream_name: "docker.io".into(),
            store: store.clone(),
            clock: Clock::manual(),
            disk: Arc::new(DiskState::default()),
            report,
            mismatches: prometheus::IntCounter::new("m", "m").unwrap(),
            trace: crate::trace::Context::new(),
        }
        .spawn(events, state_tx)
        .unwrap();
        Rig {
            _dir: dir,
            store,
            events: Some(events_tx),
            state,
            finished,
        }
    }

    async fn send(&self, e: DownloadEvent) {
        self.events.as_ref().unwrap().send(e).await.unwrap();
    }

    /// Waits for the writer to publish a state `f` accepts.
    async fn until<T>(&mut self, f: impl FnMut(&FillState) -> Option<T>) -> Result<T, EngineError> {
        wait_fill(&mut self.state, Duration::from_secs(30), "test", f).await
    }

    /// How the fill ended (reported after the guard has cleaned up).
    async fn outcome(&mut self) -> FillOutcome {
        (&mut self.finished).await.unwrap().outcome
    }

    fn temp_files(&self) -> usize {
        self.store.clean_temp().unwrap()
    }

    /// Waits for the fill to fail: its error and outcome, once it has cleaned up (no
    /// temporary file may be left).
    async fn failure(&mut self) -> (EngineError, FillOutcome) {
        let e = self.until(|_| None::<()>).await.unwrap_err();
        let outcome = self.outcome().await;
        assert_eq!(self.temp_files(), 0, "no temporary file is left");
        (e, outcome)
    }
}

fn digest(b: &[u8]) -> Digest {
    Digest::of_bytes(Algorithm::Sha256, b)
}

fn blob() -> Vec<u8> {
    (0..300_000u32).map(|i| (i % 251) as u8).collect()
}

#[actix_rt::test]
async fn the_last_byte_waits_for_the_digest_then_the_blob_is_stored() {
    let b = blob();
    let d = digest(&b);
    let mut rig = Rig::start(&d);
    rig.send(DownloadEvent::Headers {
        total: Some(b.len() as u64),
    })
    .await;
    // Everything but the end: readers may take all but the last byte.
    rig.send(DownloadEvent::Chunk(vec![
        Bytes::copy_from_slice(&b[..100_000]),
        Bytes::new(),
        Bytes::copy_from_slice(&b[100_000..]),
    ]))
    .await;
    let (readable, complete) = rig
        .until(|s| match s {
            FillState::Streaming { written, .. } if *written == b.len() as u64 => {
                Some(s.readable())
            }
            _ => None,
        })
        .await
        .unwrap();
    assert_eq!((readable, complete), (b.len() as u64 - 1, false));
    rig.send(DownloadEvent::End).await;
    let (size, file) = rig
        .until(|s| match s {
            FillState::Verified { size, file } => Some((*size, file.clone())),
            _ => None,
        })
        .await
        .unwrap();
    assert_eq!(size, b.len() as u64);
    assert_eq!(store::read_at(&file, 0, b.len()).unwrap(), b);
    assert_eq!(
        rig.outcome().await,
        FillOutcome::Stored {
            size: b.len() as u64
        }
    );
    // Renamed into the store (the outcome is reported after the commit).
    assert_eq!(std::fs::read(rig.store.blob_path(&d)).unwrap(), b);
    assert_eq!(rig.temp_files(), 0);
}

#[actix_rt::test]
async fn a_digest_mismatch_fails_and_keeps_nothing() {
    let b = blob();
    let d = digest(b"something else");
    let mut rig = Rig::start(&d);
    rig.send(DownloadEvent::Headers { total: None }).await;
    rig.send(DownloadEvent::Chunk(vec![Bytes::from(b)])).await;
    rig.send(DownloadEvent::End).await;
    let (e, outcome) = rig.failure().await;
    assert!(matches!(e, EngineError::DigestMismatch { .. }), "{e:?}");
    assert_eq!(outcome, FillOutcome::Failed);
    assert!(!rig.store.blob_path(&d).exists());
}

#[actix_rt::test]
async fn more_or_fewer_bytes_than_announced_fail() {
    for (sent, announced) in [(10usize, 5u64), (5, 10)] {
        let b = vec![7u8; sent];
        let mut rig = Rig::start(&digest(&b));
        rig.send(DownloadEvent::Headers {
            total: Some(announced),
        })
        .await;
        rig.send(DownloadEvent::Chunk(vec![Bytes::from(b)])).await;
        // The writer stops reading after a body longer than announced: ignore a refusal.
        let _ = rig.events.as_ref().unwrap().send(DownloadEvent::End).await;
        let (e, outcome) = rig.failure().await;
        assert!(
            matches!(e, EngineError::Upstream(UpstreamError::Protocol { .. })),
            "{sent} of {announced}: {e:?}"
        );
        assert_eq!(outcome, FillOutcome::Failed);
    }
}

#[actix_rt::test]
async fn an_upstream_gone_mid_way_abandons_the_fill() {
    let b = blob();
    let mut rig = Rig::start(&digest(&b));
    rig.send(DownloadEvent::Headers { total: None }).await;
    rig.send(DownloadEvent::Chunk(vec![Bytes::copy_from_slice(
        &b[..1000],
    )]))
    .await;
    rig.until(|s| matches!(s, FillState::Streaming { written: 1000, .. }).then_some(()))
        .await
        .unwrap();
    rig.events.take(); // the upstream side went away without End or Failed
    let (e, outcome) = rig.failure().await;
    assert!(matches!(e, EngineError::Abandoned), "{e:?}");
    assert_eq!(outcome, FillOutcome::Abandoned);
}

#[actix_rt::test]
async fn an_upstream_refusal_becomes_the_objects_error() {
    let b = blob();
    let mut rig = Rig::start(&digest(&b));
    rig.send(DownloadEvent::Failed(UpstreamError::Status {
        upstream: "docker.io".into(),
        status: 404,
        message: None,
        retry_after: None,
    }))
    .await;
    let (e, outcome) = rig.failure().await;
    assert!(matches!(e, EngineError::BlobUnknown(_)), "{e:?}");
    assert_eq!(outcome, FillOutcome::Failed);
}

// -- wait_fill

fn streaming(written: u64) -> FillState {
    let f = tempfile::tempfile().unwrap();
    FillState::Streaming {
        file: Arc::new(f),
        total: None,
        written,
    }
}

#[tokio::test(start_paused = true)]
async fn wait_fill_returns_when_ready_and_each_progress_restarts_the_timeout() {
    let wait = Duration::from_secs(10);
    let (tx, mut rx) = watch::channel(FillState::Connecting);
    tokio::spawn(async move {
        // Progress every 6 s: never 10 s without, though 18 s pass in all.
        for w in [1u64, 2, 3] {
            tokio::time::sleep(Duration::from_secs(6)).await;
            tx.send_replace(streaming(w));
        }
        std::future::pending::<()>().await;
    });
    let start = tokio::time::Instant::now();
    let got = wait_fill(&mut rx, wait, "test", |s| match s {
        FillState::Streaming { written: 3, .. } => Some(3),
        _ => None,
    })
    .await
    .unwrap();
    assert_eq!(got, 3);
    assert_eq!(start.elapsed(), Duration::from_secs(18));
}

#[tokio::test(start_paused = true)]
async fn wait_fill_times_out_without_progress() {
    let (_tx, mut rx) = watch::channel(FillState::Connecting);
    let start = tokio::time::Instant::now();
    let e = wait_fill(&mut rx, Duration::from_secs(10), "stage x", |_| None::<()>)
        .await
        .unwrap_err();
    assert!(
        matches!(e, EngineError::WaitTimedOut { stage: "stage x", after } if after == Duration::from_secs(10)),
        "{e:?}"
    );
    assert_eq!(start.elapsed(), Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn wait_fill_ends_with_the_fills_failure_or_abandonment() {
    // `ready` would accept anything: the fill's end comes first.
    let (tx, mut rx) = watch::channel(FillState::Abandoned);
    let e = wait_fill(&mut rx, Duration::from_secs(1), "t", |_| Some(()))
        .await
        .unwrap_err();
    assert!(matches!(e, EngineError::Abandoned), "{e:?}");
    tx.send_replace(FillState::Failed(EngineError::DiskFull("full".into())));
    let e = wait_fill(&mut rx, Duration::from_secs(1), "t", |_| Some(()))
        .await
        .unwrap_err();
    assert!(matches!(e, EngineError::DiskFull(_)), "{e:?}");
}

#[tokio::test(start_paused = true)]
async fn a_writer_gone_leaves_its_last_state_final() {
    // Gone after verifying: what it published still counts.
    let (tx, mut rx) = watch::channel(streaming(5));
    let f = tempfile::tempfile().unwrap();
    tx.send_replace(FillState::Verified {
        file: Arc::new(f),
        size: 9,
    });
    drop(tx);
    let size = wait_fill(&mut rx, Duration::from_secs(1), "t", |s| match s {
        FillState::Verified { size, .. } => Some(*size),
        _ => None,
    })
    .await
    .unwrap();
    assert_eq!(size, 9);
    // Gone before anything was ready: abandoned, at once (no timeout to wait out).
    let (tx, mut rx) = watch::channel(FillState::Connecting);
    drop(tx);
    let start = tokio::time::Instant::now();
    let e = wait_fill(&mut rx, Duration::from_secs(60), "t", |_| None::<()>)
        .await
        .unwrap_err();
    assert!(matches!(e, EngineError::Abandoned));
    assert_eq!(start.elapsed(), Duration::ZERO);
}
