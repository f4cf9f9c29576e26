//! The load scenarios and what they share: the device list, the target, the
//! rate limiter, the in-flight cap and the accepted-device log.

pub mod churn;
pub mod flood;
pub mod publish;
pub mod setup;
pub mod storm;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::bucket::SharedBucket;
use crate::device::{self, Attempt, Outcome, Session, SessionEnd, Target};
use crate::devices::Device;
use crate::progress::{Mode, Ticker};
use crate::report::Stats;

/// How long a clean DISCONNECT may take before the socket is dropped.
pub const DISCONNECT_GRACE: Duration = Duration::from_secs(5);

/// DeviceKeys that got CONNACK 0, one per line, written (unbuffered) as they
/// arrive so a harness can read the file while the run goes on or after a
/// crash.
#[derive(Debug)]
pub struct AcceptedLog {
    file: Mutex<File>,
}

impl AcceptedLog {
    /// Opens `path` for appending; `truncate` empties it first.
    pub fn open(path: &Path, truncate: bool) -> Result<Self> {
        if truncate {
            File::create(path).with_context(|| format!("creating {}", path.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(AcceptedLog {
            file: Mutex::new(file),
        })
    }

    pub fn record(&self, device_key: &str) {
        let line = format!("{device_key}\n");
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        // One write per line: appends from several worker processes never
        // interleave inside a line.
        let _ = f.write_all(line.as_bytes());
    }
}

/// Asks a run to stop early (Ctrl-C): no new connects, held connections
/// end with a clean DISCONNECT, and the report covers what happened.
#[derive(Debug, Default)]
pub struct Stop {
    flag: AtomicBool,
    notify: Notify,
}

impl Stop {
    pub fn new() -> Arc<Self> {
        Arc::new(Stop::default())
    }

    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub fn is_stopped(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Resolves once [`Stop::stop`] has been called.
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_stopped() {
                return;
            }
            notified.await;
        }
    }

    /// Sleeps for `d`; `false` if stopped first.
    pub async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => !self.is_stopped(),
            _ = self.wait() => false,
        }
    }
}

/// Everything a scenario needs.
pub struct Ctx {
    pub target: Target,
    pub devices: Arc<Vec<Device>>,
    pub source_ips: Vec<IpAddr>,
    pub bucket: SharedBucket,
    pub inflight: Arc<Semaphore>,
    pub accepted_log: Option<Arc<AcceptedLog>>,
    pub progress: Mode,
    pub stop: Arc<Stop>,
}

impl Ctx {
    /// Source address for device number `idx` (round-robin).
    pub fn source_for(&self, idx: usize) -> Option<IpAddr> {
        if self.source_ips.is_empty() {
            None
        } else {
            Some(self.source_ips[idx % self.source_ips.len()])
        }
    }

    /// Waits for an in-flight slot and, when `rate_limited`, for a token.
    /// `None` once the run is stopped.
    pub async fn admit(&self, rate_limited: bool) -> Option<OwnedSemaphorePermit> {
        let admitted = async {
            let permit = self.inflight.clone().acquire_owned().await.ok()?;
            if rate_limited {
                self.bucket.acquire().await;
            }
            Some(permit)
        };
        tokio::select! {
            p = admitted => p.filter(|_| !self.stop.is_stopped()),
            _ = self.stop.wait() => None,
        }
    }

    /// Holds an accepted session for `d` (nothing for zero) or until the run
    /// is stopped; the end if the connection ended meanwhile.
    pub async fn hold(&self, session: &mut Session, d: Duration) -> Option<SessionEnd> {
        if d.is_zero() || self.stop.is_stopped() {
            return session.check_ended().await;
        }
        tokio::select! {
            end = session.hold(d) => end,
            _ = self.stop.wait() => None,
        }
    }

    /// One counted connect of device `idx` (admission already done): the
    /// attempt is counted, timed, recorded, and accepted keys logged.
    pub async fn connect(&self, idx: usize, stats: &Arc<Stats>) -> Attempt {
        stats.attempt();
        let device = &self.devices[idx];
        let attempt = device::connect(device, &self.target, self.source_for(idx), stats).await;
        attempt.record(stats);
        if let (Outcome::Accepted(_), Some(log)) = (&attempt.outcome, &self.accepted_log) {
            log.record(&device.device_key);
        }
        attempt
    }

    /// A progress display over `stats`.
    pub fn ticker(&self, label: &str, total: Option<u64>, stats: &Arc<Stats>) -> Ticker {
        let s = stats.clone();
        Ticker::start(self.progress, label, total, Arc::new(move || s.progress()))
    }
}

/// Seconds as a duration, negative and NaN treated as zero.
pub fn secs(s: f64) -> Duration {
    if s.is_finite() && s > 0.0 {
        Duration::from_secs_f64(s.min(1e9))
    } else {
        Duration::ZERO
    }
}
