//! Wall-clock time for everything that is persisted (tag fetch times, blob access times).
//!
//! Production uses the system clock. Tests use a *manual* clock that stands still until the
//! test advances it, so TTL and staleness logic is checked deterministically without sleeps.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Clone, Debug)]
pub struct Clock {
    /// `None` = system time; `Some` = manual time in milliseconds since the epoch.
    manual: Option<Arc<AtomicU64>>,
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl Clock {
    pub fn system() -> Clock {
        Clock { manual: None }
    }

    /// A clock frozen at the current system time until [`Clock::advance`] moves it.
    pub fn manual() -> Clock {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Clock {
            manual: Some(Arc::new(AtomicU64::new(now.as_millis() as u64))),
        }
    }

    /// Moves a manual clock forward. Panics on the system clock (a test bug).
    pub fn advance(&self, by: Duration) {
        let m = self
            .manual
            .as_ref()
            .expect("advance() needs a manual clock");
        m.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        match &self.manual {
            Some(m) => m.load(Ordering::SeqCst),
            None => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }
    }
}
