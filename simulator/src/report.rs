//! Counting while a run is going ([`Stats`]), the final [`Report`] (table and
//! JSON), merging reports of worker processes, and `--expect` assertions.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency the histogram tracks: one hour, in microseconds.
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// Distinct error messages kept per run.
const MAX_ERROR_KINDS: usize = 32;

fn new_histogram() -> Histogram<u64> {
    // Constant bounds (1 us .. 1 h, 3 significant digits) that hdrhistogram
    // accepts; nothing here depends on input.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant histogram bounds are valid")
}

pub use activation_client::connack::{key as code_key, name as code_name};

fn parse_code(s: &str) -> Option<u8> {
    let s = s.trim();
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u8::from_str_radix(hex, 16).ok()
    } else {
        s.parse().ok()
    }
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking device task must not take the counters down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A snapshot for the progress line.
#[derive(Debug, Clone, Copy, Default)]
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

fn count_kind(map: &Mutex<BTreeMap<String, u64>>, what: &str) {
    let mut kinds = lock(map);
    if let Some(n) = kinds.get_mut(what) {
        *n += 1;
    } else if kinds.len() < MAX_ERROR_KINDS {
        kinds.insert(what.to_owned(), 1);
    }
}

fn per_sec(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// CONNACK latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Latency {
    fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
        }
    }
}

/// Telemetry counters of the `publish` scenario.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MessageStats {
    pub sent: u64,
    pub acked: u64,
    /// Acknowledged with a failure reason code (MQTT 5 PUBACK >= 0x80).
    pub rejected: u64,
    /// Not sent or never acknowledged (connection lost, timeout).
    pub failed: u64,
    pub duration_s: f64,
    pub sent_per_sec: f64,
    pub acked_per_sec: f64,
}

/// The outcome of a run. Field names are stable (they are the JSON format).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub protocol: u8,
    pub attempted: u64,
    pub accepted: u64,
    /// Refusals by CONNACK code, keyed `"0x97"`.
    pub refused: BTreeMap<String, u64>,
    pub errors: u64,
    pub timeouts: u64,
    /// From the first connect attempt to the last CONNACK/error/timeout.
    pub duration_s: f64,
    /// Completed connect attempts per second over `duration_s`.
    pub connects_per_sec: f64,
    pub latency_ms: Latency,
    /// Accepted connections that the broker closed while they were held.
    #[serde(default)]
    pub server_disconnects: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<MessageStats>,
    /// Error messages and how often they occurred (first few kinds).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub error_kinds: BTreeMap<String, u64>,
    /// Why held connections ended early (first few kinds), e.g. the MQTT 5
    /// DISCONNECT reason code and reason string.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub server_disconnect_reasons: BTreeMap<String, u64>,
    /// MQTT 5 refusals by code and Reason String (first few kinds; only the
    /// bound-socket client sees reason strings).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub refusal_reasons: BTreeMap<String, u64>,
    /// `storm`: the initial connect phase (the report itself is the
    /// reconnect phase).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_phase: Option<Box<Report>>,
    /// Raw CONNACK latency histogram as `[microseconds, count]` pairs; kept
    /// so worker reports can be merged exactly. Left out of `--json` output
    /// except between workers and their parent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_histogram_us: Option<Vec<[u64; 2]>>,
}

fn histogram_to_pairs(h: &Histogram<u64>) -> Vec<[u64; 2]> {
    h.iter_recorded()
        .map(|v| [v.value_iterated_to(), v.count_at_value()])
        .collect()
}

fn pairs_to_histogram(pairs: &[[u64; 2]]) -> Histogram<u64> {
    let mut h = new_histogram();
    for [value, count] in pairs {
        let _ = h.record_n((*value).clamp(1, MAX_LATENCY_US), *count);
    }
    h
}

impl Report {
    /// Total refusals over all codes.
    pub fn refused_total(&self) -> u64 {
        self.refused.values().sum()
    }

    /// Refusals with one CONNACK code.
    pub fn refused_with(&self, code: u8) -> u64 {
        self.refused.get(&code_key(code)).copied().unwrap_or(0)
    }

    /// The same report without raw histograms (for user-facing JSON).
    pub fn without_histograms(&self) -> Report {
        let mut r = self.clone();
        r.latency_histogram_us = None;
        if let Some(initial) = &r.initial_phase {
            r.initial_phase = Some(Box::new(initial.without_histograms()));
        }
        r
    }

    /// Combines the reports of workers that ran side by side.
    pub fn merge(reports: &[Report]) -> Report {
        let Some(first) = reports.first() else {
            return Report::default();
        };
        let mut out = Report {
            scenario: first.scenario.clone(),
            protocol: first.protocol,
            ..Report::default()
        };
        let mut hist = new_histogram();
        let mut have_hist = true;
        let mut messages: Option<MessageStats> = None;
        let mut initials = Vec::new();
        for r in reports {
            out.attempted += r.attempted;
            out.accepted += r.accepted;
            for (code, n) in &r.refused {
                *out.refused.entry(code.clone()).or_insert(0) += n;
            }
            out.errors += r.errors;
            out.timeouts += r.timeouts;
            out.server_disconnects += r.server_disconnects;
            out.duration_s = out.duration_s.max(r.duration_s);
            for (kind, n) in &r.error_kinds {
                *out.error_kinds.entry(kind.clone()).or_insert(0) += n;
            }
            for (kind, n) in &r.refusal_reasons {
                *out.refusal_reasons.entry(kind.clone()).or_insert(0) += n;
            }
            for (kind, n) in &r.server_disconnect_reasons {
                *out.server_disconnect_reasons
                    .entry(kind.clone())
                    .or_insert(0) += n;
            }
            match &r.latency_histogram_us {
                Some(pairs) => {
                    let _ = hist.add(pairs_to_histogram(pairs));
                }
                None => have_hist = false,
            }
            if let Some(m) = &r.messages {
                let acc = messages.get_or_insert_with(MessageStats::default);
                acc.sent += m.sent;
                acc.acked += m.acked;
                acc.rejected += m.rejected;
                acc.failed += m.failed;
                acc.duration_s = acc.duration_s.max(m.duration_s);
            }
            if let Some(i) = &r.initial_phase {
                initials.push((**i).clone());
            }
        }
        let done = out.accepted + out.refused_total() + out.errors + out.timeouts;
        out.connects_per_sec = per_sec(done, out.duration_s);
        if have_hist {
            out.latency_ms = Latency::from_histogram(&hist);
            out.latency_histogram_us = Some(histogram_to_pairs(&hist));
        } else {
            // Without raw data the best available is the worst of each.
            out.latency_ms = reports.iter().fold(Latency::default(), |a, r| Latency {
                p50: a.p50.max(r.latency_ms.p50),
                p90: a.p90.max(r.latency_ms.p90),
                p99: a.p99.max(r.latency_ms.p99),
                max: a.max.max(r.latency_ms.max),
            });
        }
        if let Some(m) = messages.as_mut() {
            m.sent_per_sec = per_sec(m.sent, m.duration_s);
            m.acked_per_sec = per_sec(m.acked, m.duration_s);
        }
        out.messages = messages;
        if !initials.is_empty() {
            out.initial_phase = Some(Box::new(Report::merge(&initials)));
        }
        out
    }

    /// The human summary printed on stdout.
    pub fn table(&self) -> String {
        let mut s = String::new();
        if let Some(initial) = &self.initial_phase {
            let _ = writeln!(s, "== initial connect phase ==");
            s.push_str(&initial.table_body());
            let _ = writeln!(s, "== reconnect phase ==");
        }
        s.push_str(&self.table_body());
        s
    }

    fn table_body(&self) -> String {
        let mut s = String::new();
        let row = |s: &mut String, k: &str, v: String| {
            let _ = writeln!(s, "  {k:<28} {v:>14}");
        };
        let _ = writeln!(
            s,
            "scenario {} (MQTT {})",
            self.scenario,
            if self.protocol == 5 { "5.0" } else { "3.1.1" }
        );
        row(&mut s, "attempted", self.attempted.to_string());
        row(&mut s, "accepted", self.accepted.to_string());
        row(&mut s, "refused", self.refused_total().to_string());
        for (key, n) in &self.refused {
            let name = parse_code(key)
                .map(|c| code_name(self.protocol, c))
                .unwrap_or("unknown");
            row(&mut s, &format!("  {key} {name}"), n.to_string());
        }
        for (reason, n) in &self.refusal_reasons {
            let _ = writeln!(s, "    {n:>8}  {reason}");
        }
        row(&mut s, "errors", self.errors.to_string());
        row(&mut s, "timeouts", self.timeouts.to_string());
        if self.server_disconnects > 0 {
            row(
                &mut s,
                "closed by broker",
                self.server_disconnects.to_string(),
            );
        }
        row(&mut s, "duration (s)", format!("{:.3}", self.duration_s));
        row(
            &mut s,
            "connects/s",
            format!("{:.1}", self.connects_per_sec),
        );
        let l = &self.latency_ms;
        let _ = writeln!(
            s,
            "  CONNACK latency (ms)         p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}",
            l.p50, l.p90, l.p99, l.max
        );
        if let Some(m) = &self.messages {
            row(&mut s, "messages sent", m.sent.to_string());
            row(&mut s, "messages acked", m.acked.to_string());
            if m.rejected > 0 {
                row(&mut s, "messages rejected", m.rejected.to_string());
            }
            row(&mut s, "messages failed", m.failed.to_string());
            row(&mut s, "messages sent/s", format!("{:.1}", m.sent_per_sec));
            row(
                &mut s,
                "messages acked/s",
                format!("{:.1}", m.acked_per_sec),
            );
        }
        if !self.server_disconnect_reasons.is_empty() {
            let _ = writeln!(s, "  closed by broker because:");
            for (kind, n) in &self.server_disconnect_reasons {
                let _ = writeln!(s, "    {n:>8}  {kind}");
            }
        }
        if !self.error_kinds.is_empty() {
            let _ = writeln!(s, "  error kinds:");
            for (kind, n) in &self.error_kinds {
                let _ = writeln!(s, "    {n:>8}  {kind}");
            }
        }
        s
    }
}

/// What an `--expect` assertion looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectKey {
    Attempted,
    Accepted,
    /// All refusals, or those with one code.
    Refused(Option<u8>),
    Errors,
    Timeouts,
    ServerDisconnects,
    MessagesAcked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectOp {
    Eq,
    AtLeast,
    AtMost,
}

/// `--expect accepted=100`, `refused:0x97=5`, `errors<=0`, `timeouts>=1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expectation {
    pub key: ExpectKey,
    pub op: ExpectOp,
    pub value: u64,
}

impl FromStr for Expectation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (lhs, op, rhs) = if let Some((l, r)) = s.split_once(">=") {
            (l, ExpectOp::AtLeast, r)
        } else if let Some((l, r)) = s.split_once("<=") {
            (l, ExpectOp::AtMost, r)
        } else if let Some((l, r)) = s.split_once('=') {
            (l, ExpectOp::Eq, r)
        } else {
            return Err(format!(
                "expectation {s:?} must look like accepted=N, refused:0x97=N, errors<=N"
            ));
        };
        let value: u64 = rhs
            .trim()
            .parse()
            .map_err(|_| format!("expectation {s:?}: {rhs:?} is not a count"))?;
        let lhs = lhs.trim().to_ascii_lowercase();
        let key = match lhs.as_str() {
            "attempted" => ExpectKey::Attempted,
            "accepted" => ExpectKey::Accepted,
            "refused" => ExpectKey::Refused(None),
            "errors" => ExpectKey::Errors,
            "timeouts" => ExpectKey::Timeouts,
            "server_disconnects" => ExpectKey::ServerDisconnects,
            "messages_acked" => ExpectKey::MessagesAcked,
            other => match other.strip_prefix("refused:") {
                Some(code) => ExpectKey::Refused(Some(parse_code(code).ok_or_else(|| {
                    format!("expectation {s:?}: {code:?} is not a CONNACK code like 0x97")
                })?)),
                None => {
                    return Err(format!(
                        "expectation {s:?}: unknown counter {lhs:?} (attempted, accepted, \
                         refused, refused:0xNN, errors, timeouts, server_disconnects, \
                         messages_acked)"
                    ))
                }
            },
        };
        Ok(Expectation { key, op, value })
    }
}

impl std::fmt::Display for Expectation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = match self.key {
            ExpectKey::Attempted => "attempted".to_owned(),
            ExpectKey::Accepted => "accepted".to_owned(),
            ExpectKey::Refused(None) => "refused".to_owned(),
            ExpectKey::Refused(Some(c)) => format!("refused:{}", code_key(c)),
            ExpectKey::Errors => "errors".to_owned(),
            ExpectKey::Timeouts => "timeouts".to_owned(),
            ExpectKey::ServerDisconnects => "server_disconnects".to_owned(),
            ExpectKey::MessagesAcked => "messages_acked".to_owned(),
        };
        let op = match self.op {
            ExpectOp::Eq => "=",
            ExpectOp::AtLeast => ">=",
            ExpectOp::AtMost => "<=",
        };
        write!(f, "{key}{op}{}", self.value)
    }
}

impl Expectation {
    pub fn actual(&self, r: &Report) -> u64 {
        match self.key {
            ExpectKey::Attempted => r.attempted,
            ExpectKey::Accepted => r.accepted,
            ExpectKey::Refused(None) => r.refused_total(),
            ExpectKey::Refused(Some(c)) => r.refused_with(c),
            ExpectKey::Errors => r.errors,
            ExpectKey::Timeouts => r.timeouts,
            ExpectKey::ServerDisconnects => r.server_disconnects,
            ExpectKey::MessagesAcked => r.messages.as_ref().map(|m| m.acked).unwrap_or(0),
        }
    }

    pub fn holds(&self, r: &Report) -> bool {
        let a = self.actual(r);
        match self.op {
            ExpectOp::Eq => a == self.value,
            ExpectOp::AtLeast => a >= self.value,
            ExpectOp::AtMost => a <= self.value,
        }
    }
}

/// Failed expectations as messages (empty: all hold).
pub fn check_expectations(report: &Report, expectations: &[Expectation]) -> Vec<String> {
    expectations
        .iter()
        .filter(|e| !e.holds(report))
        .map(|e| format!("expected {e}, got {}", e.actual(report)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(accepted: u64, refused_97: u64, lat_ms: &[u64]) -> Report {
        let stats = Stats::new();
        for _ in 0..accepted + refused_97 {
            stats.attempt();
        }
        for (i, ms) in lat_ms.iter().enumerate() {
            let d = Duration::from_millis(*ms);
            if (i as u64) < accepted {
                stats.accepted(d);
            } else {
                stats.refused(0x97, d);
            }
        }
        stats.report("flood", 5, false)
    }

    #[test]
    fn parses_expectations() {
        let e: Expectation = "accepted=100".parse().expect("parse");
        assert_eq!(
            e,
            Expectation {
                key: ExpectKey::Accepted,
                op: ExpectOp::Eq,
                value: 100
            }
        );
        let e: Expectation = "refused:0x97=5".parse().expect("parse");
        assert_eq!(e.key, ExpectKey::Refused(Some(0x97)));
        assert_eq!(e.value, 5);
        let e: Expectation = "refused:151=5".parse().expect("parse");
        assert_eq!(e.key, ExpectKey::Refused(Some(0x97)));
        let e: Expectation = "Errors<=0".parse().expect("parse");
        assert_eq!((e.key, e.op), (ExpectKey::Errors, ExpectOp::AtMost));
        let e: Expectation = "timeouts>=2".parse().expect("parse");
        assert_eq!(
            (e.key, e.op, e.value),
            (ExpectKey::Timeouts, ExpectOp::AtLeast, 2)
        );
        assert_eq!(
            "refused=3".parse::<Expectation>().map(|e| e.key),
            Ok(ExpectKey::Refused(None))
        );
        assert!("accepted".parse::<Expectation>().is_err());
        assert!("accepted=x".parse::<Expectation>().is_err());
        assert!("bogus=1".parse::<Expectation>().is_err());
        assert!("refused:0xZZ=1".parse::<Expectation>().is_err());
        assert_eq!(
            "refused:0x97>=5"
                .parse::<Expectation>()
                .map(|e| e.to_string()),
            Ok("refused:0x97>=5".to_owned())
        );
    }

    #[test]
    fn checks_expectations() {
        let r = sample(3, 2, &[1, 2, 3, 4, 5]);
        let ok: Vec<Expectation> = ["accepted=3", "refused:0x97=2", "refused=2", "errors=0"]
            .iter()
            .map(|s| s.parse().expect("parse"))
            .collect();
        assert!(check_expectations(&r, &ok).is_empty());
        let bad: Vec<Expectation> = ["accepted=4", "refused:0x86>=1", "timeouts=0"]
            .iter()
            .map(|s| s.parse().expect("parse"))
            .collect();
        let failures = check_expectations(&r, &bad);
        assert_eq!(failures.len(), 2, "{failures:?}");
        assert_eq!(failures[0], "expected accepted=4, got 3");
    }

    #[test]
    fn json_round_trip_with_stable_names() {
        let r = sample(2, 1, &[10, 20, 30]).without_histograms();
        let json = serde_json::to_string(&r).expect("serialize");
        let v: serde_json::Value = serde_json::from_str(&json).expect("json");
        for key in [
            "scenario",
            "protocol",
            "attempted",
            "accepted",
            "refused",
            "errors",
            "timeouts",
            "duration_s",
            "connects_per_sec",
            "latency_ms",
        ] {
            assert!(v.get(key).is_some(), "missing {key} in {json}");
        }
        assert_eq!(v["refused"]["0x97"], 1);
        for p in ["p50", "p90", "p99", "max"] {
            assert!(v["latency_ms"].get(p).is_some());
        }
        assert!(v.get("latency_histogram_us").is_none());
        let back: Report = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, r);
        // The raw histogram survives a round trip too.
        let full = sample(1, 0, &[7]);
        let back: Report =
            serde_json::from_str(&serde_json::to_string(&full).expect("ser")).expect("de");
        assert_eq!(back, full);
    }

    #[test]
    fn latency_percentiles_in_ms() {
        let lat: Vec<u64> = (1..=100).collect();
        let r = sample(100, 0, &lat);
        assert!((r.latency_ms.p50 - 50.0).abs() < 0.1, "{:?}", r.latency_ms);
        assert!((r.latency_ms.p90 - 90.0).abs() < 0.1, "{:?}", r.latency_ms);
        assert!((r.latency_ms.p99 - 99.0).abs() < 0.1, "{:?}", r.latency_ms);
        assert!((r.latency_ms.max - 100.0).abs() < 0.1, "{:?}", r.latency_ms);
    }

    #[test]
    fn merges_worker_reports() {
        let a = sample(50, 0, &(1..=50).collect::<Vec<_>>());
        let mut b = sample(40, 10, &(51..=100).collect::<Vec<_>>());
        b.errors = 2;
        b.error_kinds.insert("connection refused".into(), 2);
        b.duration_s = 2.0;
        let mut a2 = a.clone();
        a2.duration_s = 1.0;
        let m = Report::merge(&[a2, b]);
        assert_eq!(m.attempted, 100);
        assert_eq!(m.accepted, 90);
        assert_eq!(m.refused_with(0x97), 10);
        assert_eq!(m.errors, 2);
        assert_eq!(m.error_kinds.get("connection refused"), Some(&2));
        assert_eq!(m.duration_s, 2.0);
        assert!((m.connects_per_sec - 51.0).abs() < 1e-9);
        // Percentiles come from the merged raw histograms: 1..=100 ms.
        assert!((m.latency_ms.p50 - 50.0).abs() < 0.1, "{:?}", m.latency_ms);
        assert!((m.latency_ms.max - 100.0).abs() < 0.1, "{:?}", m.latency_ms);
        // Reports from JSON without histograms still merge counters.
        let m2 = Report::merge(&[a.without_histograms(), a.without_histograms()]);
        assert_eq!(m2.accepted, 100);
        assert!((m2.latency_ms.max - a.latency_ms.max).abs() < 1e-9);
    }

    #[test]
    fn merges_storm_phases_and_messages() {
        let mut a = sample(5, 0, &[1, 1, 1, 1, 1]);
        a.initial_phase = Some(Box::new(sample(5, 0, &[2, 2, 2, 2, 2])));
        a.messages = Some(MessageStats {
            sent: 10,
            acked: 9,
            failed: 1,
            duration_s: 1.0,
            ..MessageStats::default()
        });
        let m = Report::merge(&[a.clone(), a]);
        assert_eq!(m.initial_phase.as_ref().map(|i| i.accepted), Some(10));
        let msgs = m.messages.expect("messages");
        assert_eq!((msgs.sent, msgs.acked, msgs.failed), (20, 18, 2));
        assert!((msgs.sent_per_sec - 20.0).abs() < 1e-9);
    }

    #[test]
    fn table_names_codes() {
        let stats = Stats::new();
        stats.attempt();
        stats.refused_because(
            0x97,
            Some("no activation code available for product P"),
            Duration::from_millis(1),
        );
        let r = stats.report("flood", 5, false);
        assert_eq!(
            r.refusal_reasons
                .get("0x97 no activation code available for product P"),
            Some(&1)
        );
        let t = r.table();
        assert!(t.contains("0x97 Quota exceeded"), "{t}");
        assert!(
            t.contains("no activation code available for product P"),
            "{t}"
        );
        let merged = Report::merge(&[r.clone(), r]);
        assert_eq!(merged.refusal_reasons.values().sum::<u64>(), 2);
        assert_eq!(code_name(4, 5), "not authorized");
        assert_eq!(code_name(5, 0x9F), "Connection rate exceeded");
    }
}
