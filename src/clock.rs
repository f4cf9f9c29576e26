//! Injected time. Everything that decides on validity, expiry or credential
//! freshness asks a [`Clock`], so tests can move time without sleeping.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// Milliseconds since the unix epoch, UTC.
pub type Millis = i64;

/// The source of time for the ledger, the gate and the expiry enforcer.
#[derive(Clone, Debug)]
pub enum Clock {
    /// Wall-clock time.
    System,
    /// Time that only moves when a test says so.
    Manual(Arc<ManualClock>),
}

#[derive(Debug)]
pub struct ManualClock {
    now: AtomicI64,
    tick: watch::Sender<Millis>,
}

impl Clock {
    pub fn system() -> Self {
        Clock::System
    }

    /// A manual clock starting at `start` (unix ms) and its handle.
    pub fn manual(start: Millis) -> (Self, Arc<ManualClock>) {
        let (tick, _) = watch::channel(start);
        let m = Arc::new(ManualClock {
            now: AtomicI64::new(start),
            tick,
        });
        (Clock::Manual(m.clone()), m)
    }

    pub fn now(&self) -> Millis {
        match self {
            Clock::System => chrono::Utc::now().timestamp_millis(),
            Clock::Manual(m) => m.now(),
        }
    }

    /// Resolves once `now() >= at`. With a manual clock this wakes when a
    /// test advances time past `at`; it never sleeps on the wall clock.
    pub async fn sleep_until(&self, at: Millis) {
        match self {
            Clock::System => loop {
                let now = self.now();
                if now >= at {
                    return;
                }
                // Cap each sleep so a wall-clock jump is noticed within a second.
                let wait = (at - now).clamp(1, 1000) as u64;
                tokio::time::sleep(Duration::from_millis(wait)).await;
            },
            Clock::Manual(m) => {
                let mut rx = m.tick.subscribe();
                while m.now() < at {
                    if rx.changed().await.is_err() {
                        // The clock is gone; nothing will ever advance it.
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }
}

impl ManualClock {
    pub fn now(&self) -> Millis {
        self.now.load(Ordering::SeqCst)
    }

    pub fn set(&self, at: Millis) {
        self.now.store(at, Ordering::SeqCst);
        self.tick.send_replace(at);
    }

    pub fn advance(&self, by: Duration) {
        let at =
            self.now.fetch_add(by.as_millis() as i64, Ordering::SeqCst) + by.as_millis() as i64;
        self.tick.send_replace(at);
    }
}

/// `YYYY-MM-DD HH:MM:SS` in UTC, the format of every time in the admin API.
pub fn format_time(ms: Millis) -> String {
    match chrono::DateTime::from_timestamp_millis(ms) {
        Some(t) => t.format_with_items(TIME_FORMAT.iter()).to_string(),
        None => String::from("invalid time"),
    }
}

/// `%Y-%m-%d %H:%M:%S`, parsed once here: every event carries a time, and
/// `format` would parse its format string on every call.
const TIME_FORMAT: &[chrono::format::Item<'static>] = {
    use chrono::format::{Item, Numeric, Pad};
    &[
        Item::Numeric(Numeric::Year, Pad::Zero),
        Item::Literal("-"),
        Item::Numeric(Numeric::Month, Pad::Zero),
        Item::Literal("-"),
        Item::Numeric(Numeric::Day, Pad::Zero),
        Item::Space(" "),
        Item::Numeric(Numeric::Hour, Pad::Zero),
        Item::Literal(":"),
        Item::Numeric(Numeric::Minute, Pad::Zero),
        Item::Literal(":"),
        Item::Numeric(Numeric::Second, Pad::Zero),
    ]
};

/// Parses `YYYY-MM-DD HH:MM:SS` (UTC) or `YYYY-MM-DD` (midnight UTC).
pub fn parse_time(s: &str) -> Option<Millis> {
    use chrono::{NaiveDate, NaiveDateTime};
    if let Ok(t) = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S") {
        return Some(t.and_utc().timestamp_millis());
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_format_round_trips() {
        let t = parse_time("2026-11-22 21:19:15").expect("parses");
        assert_eq!(format_time(t), "2026-11-22 21:19:15");
        assert_eq!(
            format_time(parse_time("2026-11-22").expect("date")),
            "2026-11-22 00:00:00"
        );
        assert_eq!(parse_time("22/11/2026"), None);
    }

    proptest::proptest! {
        #[test]
        fn time_format_matches_chrono(ms in -70_000_000_000_000i64..300_000_000_000_000i64) {
            let expected = chrono::DateTime::from_timestamp_millis(ms)
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string());
            proptest::prop_assert_eq!(Some(format_time(ms)), expected);
        }
    }

    #[tokio::test]
    async fn manual_clock_wakes_sleepers_when_advanced() {
        let (clock, handle) = Clock::manual(1_000);
        let c = clock.clone();
        let sleeper = tokio::spawn(async move { c.sleep_until(5_000).await });
        handle.advance(Duration::from_secs(2));
        assert!(!sleeper.is_finished());
        handle.advance(Duration::from_secs(2));
        tokio::time::timeout(Duration::from_secs(5), sleeper)
            .await
            .expect("woken")
            .expect("joined");
    }
}
