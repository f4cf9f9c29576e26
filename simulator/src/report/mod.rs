//! Counting while a run is going ([`Stats`]), the final [`Report`] (table and
//! JSON), merging reports of worker processes, and `--expect` assertions.

mod expect;
mod stats;

pub use expect::*;
pub use stats::*;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

pub use activation_client::connack::{key as code_key, name as code_name};

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
