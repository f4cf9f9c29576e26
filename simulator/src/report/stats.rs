//! Counting while a run is going: [`Stats`] shared by every device task,
//! and a [`Progress`] snapshot of them.

use super::*;

/// Highest latency the histogram tracks: one hour, in microseconds.
pub(super) const MAX_LATENCY_US: u64 = 3_600_000_000;
/// Distinct error messages kept per run.
pub(super) const MAX_ERROR_KINDS: usize = 32;

pub(super) fn new_histogram() -> Histogram<u64> {
    // Constant bounds (1 us .. 1 h, 3 significant digits) that hdrhistogram
    // accepts; nothing here depends on input.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant histogram bounds are valid")
}

/// Live counters of a run, shared by all device tasks.
#[derive(Debug)]
pub struct Stats {
    pub attempted: AtomicU64,
    pub accepted: AtomicU64,
    pub refused_total: AtomicU64,
    pub errors: AtomicU64,
    pub timeouts: AtomicU64,
    pub server_disconnects: AtomicU64,
    pub msgs_sent: AtomicU64,
    pub msgs_acked: AtomicU64,
    pub msgs_rejected: AtomicU64,
    pub msgs_failed: AtomicU64,
    refused: Mutex<BTreeMap<u8, u64>>,
    latency_us: Mutex<Histogram<u64>>,
    error_kinds: Mutex<BTreeMap<String, u64>>,
    disconnect_reasons: Mutex<BTreeMap<String, u64>>,
    refusal_reasons: Mutex<BTreeMap<String, u64>>,
    /// First attempt and last connect result, for the connect rate.
    window: Mutex<(Option<Instant>, Option<Instant>)>,
    msg_window: Mutex<(Option<Instant>, Option<Instant>)>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            attempted: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            refused_total: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            server_disconnects: AtomicU64::new(0),
            msgs_sent: AtomicU64::new(0),
            msgs_acked: AtomicU64::new(0),
            msgs_rejected: AtomicU64::new(0),
            msgs_failed: AtomicU64::new(0),
            refused: Mutex::new(BTreeMap::new()),
            latency_us: Mutex::new(new_histogram()),
            error_kinds: Mutex::new(BTreeMap::new()),
            disconnect_reasons: Mutex::new(BTreeMap::new()),
            refusal_reasons: Mutex::new(BTreeMap::new()),
            window: Mutex::new((None, None)),
            msg_window: Mutex::new((None, None)),
        }
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking device task must not take the counters down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A snapshot for the progress line (a worker prints it as JSON).
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub attempted: u64,
    pub accepted: u64,
    pub refused: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub msgs_sent: u64,
    pub msgs_acked: u64,
}

impl Stats {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn attempt(&self) {
        let now = Instant::now();
        {
            let mut w = lock(&self.window);
            if w.0.is_none() {
                w.0 = Some(now);
            }
        }
        self.attempted.fetch_add(1, Ordering::Relaxed);
    }

    fn finished(&self) {
        lock(&self.window).1 = Some(Instant::now());
    }

    fn record_latency(&self, latency: Duration) {
        let us = (latency.as_micros() as u64).clamp(1, MAX_LATENCY_US);
        let _ = lock(&self.latency_us).record(us);
    }

    pub fn accepted(&self, latency: Duration) {
        self.record_latency(latency);
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.finished();
    }

    pub fn refused(&self, code: u8, latency: Duration) {
        self.refused_because(code, None, latency);
    }

    /// A refusal with the MQTT 5 Reason String, when the client saw one.
    pub fn refused_because(&self, code: u8, reason: Option<&str>, latency: Duration) {
        if let Some(reason) = reason {
            count_kind(
                &self.refusal_reasons,
                &format!("{} {reason}", code_key(code)),
            );
        }
        self.record_latency(latency);
        *lock(&self.refused).entry(code).or_insert(0) += 1;
        self.refused_total.fetch_add(1, Ordering::Relaxed);
        self.finished();
    }

    pub fn error(&self, what: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.error_kind(what);
        self.finished();
    }

    /// Notes an error message without counting a failed connect.
    pub fn error_kind(&self, what: &str) {
        count_kind(&self.error_kinds, what);
    }

    pub fn timeout(&self) {
        self.timeouts.fetch_add(1, Ordering::Relaxed);
        self.finished();
    }

    /// An accepted connection ended by the broker (or the network) while
    /// the simulator still held it.
    pub fn server_disconnect(&self, reason: &str) {
        self.server_disconnects.fetch_add(1, Ordering::Relaxed);
        count_kind(&self.disconnect_reasons, reason);
    }

    pub fn msg_sent(&self) {
        let now = Instant::now();
        {
            let mut w = lock(&self.msg_window);
            if w.0.is_none() {
                w.0 = Some(now);
            }
            w.1 = Some(now);
        }
        self.msgs_sent.fetch_add(1, Ordering::Relaxed);
    }

    pub fn msg_acked(&self) {
        lock(&self.msg_window).1 = Some(Instant::now());
        self.msgs_acked.fetch_add(1, Ordering::Relaxed);
    }

    pub fn msg_rejected(&self) {
        self.msgs_rejected.fetch_add(1, Ordering::Relaxed);
    }

    pub fn msg_failed(&self) {
        self.msgs_failed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn progress(&self) -> Progress {
        Progress {
            attempted: self.attempted.load(Ordering::Relaxed),
            accepted: self.accepted.load(Ordering::Relaxed),
            refused: self.refused_total.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
            msgs_sent: self.msgs_sent.load(Ordering::Relaxed),
            msgs_acked: self.msgs_acked.load(Ordering::Relaxed),
        }
    }

    /// The final report. `with_messages` adds the telemetry counters.
    pub fn report(&self, scenario: &str, protocol: u8, with_messages: bool) -> Report {
        let p = self.progress();
        let (first, last) = *lock(&self.window);
        let duration_s = match (first, last) {
            (Some(f), Some(l)) if l > f => (l - f).as_secs_f64(),
            _ => 0.0,
        };
        let done = p.accepted + p.refused + p.errors + p.timeouts;
        let hist = lock(&self.latency_us).clone();
        let messages = with_messages.then(|| {
            let (first, last) = *lock(&self.msg_window);
            let d = match (first, last) {
                (Some(f), Some(l)) if l > f => (l - f).as_secs_f64(),
                _ => 0.0,
            };
            MessageStats {
                sent: p.msgs_sent,
                acked: p.msgs_acked,
                rejected: self.msgs_rejected.load(Ordering::Relaxed),
                failed: self.msgs_failed.load(Ordering::Relaxed),
                duration_s: d,
                sent_per_sec: per_sec(p.msgs_sent, d),
                acked_per_sec: per_sec(p.msgs_acked, d),
            }
        });
        Report {
            scenario: scenario.to_owned(),
            protocol,
            attempted: p.attempted,
            accepted: p.accepted,
            refused: lock(&self.refused)
                .iter()
                .map(|(c, n)| (code_key(*c), *n))
                .collect(),
            errors: p.errors,
            timeouts: p.timeouts,
            duration_s,
            connects_per_sec: per_sec(done, duration_s),
            latency_ms: Latency::from_histogram(&hist),
            server_disconnects: self.server_disconnects.load(Ordering::Relaxed),
            messages,
            error_kinds: lock(&self.error_kinds).clone(),
            server_disconnect_reasons: lock(&self.disconnect_reasons).clone(),
            refusal_reasons: lock(&self.refusal_reasons).clone(),
            initial_phase: None,
            latency_histogram_us: Some(histogram_to_pairs(&hist)),
        }
    }
}

pub(super) fn count_kind(map: &Mutex<BTreeMap<String, u64>>, what: &str) {
    let mut kinds = lock(map);
    if let Some(n) = kinds.get_mut(what) {
        *n += 1;
    } else if kinds.len() < MAX_ERROR_KINDS {
        kinds.insert(what.to_owned(), 1);
    }
}

pub(super) fn per_sec(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}
