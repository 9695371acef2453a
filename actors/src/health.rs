//! The health actor owns each upstream's up/down state. Every `health.interval` it probes
//! each upstream (`GET /v2/`, 200 or 401 = up, with `health.timeout`); a change between up
//! and down needs `health.threshold` consecutive results and is logged. The state is
//! published on a `watch` channel, so the request path reads it without a message: while an
//! upstream is down, cached answers are served at once and uncached requests fail fast with
//! 503, instead of waiting for upstream timeouts.

use std::sync::Arc;

use actix::prelude::*;
use serde::Serialize;
use tokio::sync::watch;

use crate::clock::Clock;
use crate::settings::{HealthSettings, UpstreamId, UpstreamNames};
use crate::upstream::{Quota, UpstreamHandle};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    /// Not probed yet: treated as up.
    Unknown,
    Up,
    Down,
}

/// One upstream's health, as `/readyz` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamHealth {
    pub name: String,
    pub state: HealthState,
    /// Unix ms of the last probe.
    pub last_probe_ms: Option<u64>,
    pub latency_ms: Option<f64>,
    pub last_error: Option<String>,
    /// Remaining pull quota, from the upstream's rate-limit headers.
    pub quota: Option<Quota>,
}

pub struct Health {
    upstreams: UpstreamHandle,
    settings: HealthSettings,
    clock: Clock,
    tx: watch::Sender<Vec<UpstreamHealth>>,
    /// Per upstream: the last probe's outcome and how many times in a row it happened.
    streak: Vec<(bool, u32)>,
    probing: Vec<bool>,
}

impl Health {
    pub fn start(
        upstreams: UpstreamHandle,
        names: &UpstreamNames,
        settings: HealthSettings,
        clock: Clock,
    ) -> HealthHandle {
        let initial: Vec<UpstreamHealth> = names
            .ids()
            .map(|id| UpstreamHealth {
                name: names.name(id).to_string(),
                state: HealthState::Unknown,
                last_probe_ms: None,
                latency_ms: None,
                last_error: None,
                quota: None,
            })
            .collect();
        let n = initial.len();
        let (tx, rx) = watch::channel(initial);
        let addr = Health {
            upstreams,
            settings,
            clock,
            tx,
            streak: vec![(true, 0); n],
            probing: vec![false; n],
        }
        .start();
        HealthHandle {
            rx,
            _addr: Arc::new(addr),
        }
    }

    fn probe_all(&mut self, ctx: &mut Context<Self>) {
        for i in 0..self.probing.len() {
            if self.probing[i] {
                continue;
            }
            self.probing[i] = true;
            let (up, timeout) = (self.upstreams.clone(), self.settings.timeout);
            let id = UpstreamId::new(i);
            let fut = async move { (up.probe(id, timeout).await, up.quota(id).await) };
            ctx.spawn(fut.into_actor(self).map(move |(res, quota), act, _| {
                act.probing[i] = false;
                act.record(i, res, quota);
            }));
        }
    }

    fn record(&mut self, i: usize, res: Result<std::time::Duration, String>, quota: Option<Quota>) {
        let ok = res.is_ok();
        let (last, n) = self.streak[i];
        self.streak[i] = if last == ok {
            (ok, n.saturating_add(1))
        } else {
            (ok, 1)
        };
        let count = self.streak[i].1;
        let threshold = self.settings.threshold;
        let now = self.clock.now_ms();
        self.tx.send_modify(|all| {
            let h = &mut all[i];
            h.last_probe_ms = Some(now);
            h.quota = quota;
            match &res {
                Ok(lat) => {
                    h.latency_ms = Some(lat.as_secs_f64() * 1000.0);
                    h.last_error = None;
                }
                Err(e) => {
                    h.latency_ms = None;
                    h.last_error = Some(e.clone());
                }
            }
            let next = match (h.state, ok) {
                (HealthState::Unknown, true) => HealthState::Up,
                (HealthState::Unknown | HealthState::Up, false) if count >= threshold => HealthState::Down,
                (HealthState::Down, true) if count >= threshold => HealthState::Up,
                (s, _) => s,
            };
            if next != h.state {
                match next {
                    HealthState::Down => tracing::warn!(upstream = %h.name, error = h.last_error.as_deref().unwrap_or(""), failures = count, "upstream is DOWN: serving from cache, failing uncached requests fast"),
                    _ => tracing::info!(upstream = %h.name, latency_ms = h.latency_ms.unwrap_or_default(), "upstream is up"),
                }
                h.state = next;
            }
        });
    }
}

impl Actor for Health {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.probe_all(ctx);
        ctx.run_interval(self.settings.interval, |act, ctx| act.probe_all(ctx));
    }
}

/// Read access to the published health; keeps the actor alive.
#[derive(Clone)]
pub struct HealthHandle {
    rx: watch::Receiver<Vec<UpstreamHealth>>,
    _addr: Arc<Addr<Health>>,
}

impl HealthHandle {
    /// True only when probes have established that the upstream is down.
    pub fn is_down(&self, upstream: UpstreamId) -> bool {
        self.rx
            .borrow()
            .get(upstream.index())
            .is_some_and(|h| h.state == HealthState::Down)
    }

    pub fn snapshot(&self) -> Vec<UpstreamHealth> {
        self.rx.borrow().clone()
    }
}
