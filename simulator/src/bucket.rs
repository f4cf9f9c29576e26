//! A connect-rate limiter shared by every device task: a token bucket whose
//! refill rate can rise linearly during a ramp-up.
//!
//! It works by reservation (GCRA): each caller takes the next token number
//! under a lock and is told the instant that token becomes available, so a
//! thousand waiting tasks never wake up to fight over one token. Tokens
//! accumulate while nobody asks, up to `burst`.
//!
//! Time is passed in as an offset from the bucket's start, so the arithmetic
//! is tested without sleeping; [`SharedBucket`] wires it to tokio's clock.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// The pure token arithmetic.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Tokens per second once ramped up; `None` = unlimited.
    rate: Option<f64>,
    /// Seconds over which the rate rises linearly from 0 to `rate`.
    ramp_up: f64,
    /// Tokens that may be saved up while idle.
    burst: f64,
    /// Position of the last token handed out on the cumulative refill curve
    /// (starts at -1: one token is there at the start).
    granted: f64,
}

impl TokenBucket {
    /// `rate` tokens/s (0 or negative = unlimited), rising linearly over
    /// `ramp_up`, with at most `burst` (at least 1) tokens saved up. The
    /// bucket starts with one token.
    ///
    /// `burst` is also the slack for callers that wake up late: a caller
    /// that is behind schedule by less than `burst` tokens catches up
    /// instead of losing them, so timer granularity does not lower the rate.
    pub fn new(rate: f64, ramp_up: Duration, burst: f64) -> Self {
        TokenBucket {
            rate: (rate > 0.0 && rate.is_finite()).then_some(rate),
            ramp_up: ramp_up.as_secs_f64(),
            burst: burst.max(1.0),
            granted: -1.0,
        }
    }

    /// The burst `SharedBucket` users get: 20 ms worth of tokens at the
    /// full rate, at least 1.
    pub fn default_burst(rate: f64) -> f64 {
        (rate * 0.02).max(1.0)
    }

    /// Tokens refilled from the start to `t` seconds: the integral of the
    /// rate curve.
    fn refilled(&self, rate: f64, t: f64) -> f64 {
        let t = t.max(0.0);
        if self.ramp_up <= 0.0 {
            return rate * t;
        }
        if t < self.ramp_up {
            rate * t * t / (2.0 * self.ramp_up)
        } else {
            rate * self.ramp_up / 2.0 + rate * (t - self.ramp_up)
        }
    }

    /// The instant (seconds from start) at which `refilled` reaches `y`.
    fn when_refilled(&self, rate: f64, y: f64) -> f64 {
        if y <= 0.0 {
            return 0.0;
        }
        if self.ramp_up <= 0.0 {
            return y / rate;
        }
        let at_ramp_end = rate * self.ramp_up / 2.0;
        if y < at_ramp_end {
            (2.0 * self.ramp_up * y / rate).sqrt()
        } else {
            self.ramp_up + (y - at_ramp_end) / rate
        }
    }

    /// The rate in force at `elapsed` (tokens/s), `None` when unlimited.
    pub fn current_rate(&self, elapsed: Duration) -> Option<f64> {
        let rate = self.rate?;
        let t = elapsed.as_secs_f64();
        if self.ramp_up > 0.0 && t < self.ramp_up {
            Some(rate * t / self.ramp_up)
        } else {
            Some(rate)
        }
    }

    /// Reserves one token asked for at `now` (offset from the start) and
    /// returns the offset at which it may be used (`<= now`: immediately).
    pub fn reserve(&mut self, now: Duration) -> Duration {
        let Some(rate) = self.rate else {
            return now;
        };
        let t = now.as_secs_f64();
        let available = self.refilled(rate, t);
        // Idle time saves up at most `burst` tokens.
        if self.granted < available - self.burst {
            self.granted = available - self.burst;
        }
        self.granted += 1.0;
        // The token is usable once the refill curve reaches it.
        let at = self.when_refilled(rate, self.granted);
        Duration::from_secs_f64(at.max(0.0))
    }
}

/// A [`TokenBucket`] on tokio's clock, shared by all tasks of a run.
#[derive(Debug, Clone)]
pub struct SharedBucket {
    inner: Arc<Mutex<TokenBucket>>,
    start: Instant,
}

impl SharedBucket {
    pub fn new(bucket: TokenBucket) -> Self {
        SharedBucket {
            inner: Arc::new(Mutex::new(bucket)),
            start: Instant::now(),
        }
    }

    /// Waits for one token.
    pub async fn acquire(&self) {
        let at = {
            let mut b = self.inner.lock().await;
            b.reserve(self.start.elapsed())
        };
        let deadline = self.start + at;
        if deadline > Instant::now() {
            tokio::time::sleep_until(deadline).await;
        }
    }

    /// The rate currently in force, `None` when unlimited.
    pub async fn current_rate(&self) -> Option<f64> {
        self.inner.lock().await.current_rate(self.start.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// Simulates many callers asking at `now` each; returns the grant times.
    fn grants(b: &mut TokenBucket, n: usize, now: Duration) -> Vec<Duration> {
        (0..n).map(|_| b.reserve(now)).collect()
    }

    #[test]
    fn unlimited_grants_immediately() {
        let mut b = TokenBucket::new(0.0, Duration::ZERO, 1.0);
        assert_eq!(b.reserve(secs(3.0)), secs(3.0));
        assert_eq!(b.current_rate(secs(1.0)), None);
    }

    #[test]
    fn steady_rate_spaces_tokens_evenly() {
        let mut b = TokenBucket::new(100.0, Duration::ZERO, 1.0);
        let g = grants(&mut b, 201, Duration::ZERO);
        // First token at once, then one every 10 ms.
        assert_eq!(g[0], Duration::ZERO);
        for (i, at) in g.iter().enumerate() {
            let expected = i as f64 * 0.01;
            assert!((at.as_secs_f64() - expected).abs() < 1e-9, "{i}: {at:?}");
        }
        // 200 tokens after the first take 2 s.
        assert!((g[200].as_secs_f64() - 2.0).abs() < 1e-9);
    }

    #[test]
    fn late_callers_catch_up_within_burst() {
        // 500/s with 10 tokens of slack: a dispatcher that always wakes
        // 5 ms (2.5 tokens) late still gets 500 tokens per second.
        let mut b = TokenBucket::new(500.0, Duration::ZERO, 10.0);
        let mut now = Duration::ZERO;
        let mut count = 0;
        while now < secs(2.0) {
            let at = b.reserve(now);
            // Sleeping callers wake 5 ms late; due ones go at once.
            if at > now {
                now = at + Duration::from_millis(5);
            }
            now += Duration::from_micros(10);
            count += 1;
        }
        assert!((995..=1005).contains(&count), "{count}");
        // With no slack the same late dispatcher loses tokens.
        let mut b = TokenBucket::new(500.0, Duration::ZERO, 1.0);
        let mut now = Duration::ZERO;
        let mut count = 0;
        while now < secs(2.0) {
            let at = b.reserve(now);
            // Sleeping callers wake 5 ms late; due ones go at once.
            if at > now {
                now = at + Duration::from_millis(5);
            }
            now += Duration::from_micros(10);
            count += 1;
        }
        assert!(count < 800, "{count}");
    }

    #[test]
    fn idle_time_saves_at_most_burst() {
        let mut b = TokenBucket::new(10.0, Duration::ZERO, 5.0);
        // Idle for 100 s: only 5 tokens saved, then 10/s again.
        let now = secs(100.0);
        let g = grants(&mut b, 7, now);
        for at in &g[..5] {
            assert!(*at <= now);
        }
        assert!((g[5].as_secs_f64() - 100.1).abs() < 1e-9, "{:?}", g[5]);
        assert!((g[6].as_secs_f64() - 100.2).abs() < 1e-9, "{:?}", g[6]);
    }

    #[test]
    fn callers_arriving_late_are_not_penalised() {
        let mut b = TokenBucket::new(2.0, Duration::ZERO, 1.0);
        assert_eq!(b.reserve(Duration::ZERO), Duration::ZERO);
        // Next token due at 0.5 s; a caller arriving at 3 s goes at once.
        assert!(b.reserve(secs(3.0)) <= secs(3.0));
        // And the one after waits a full interval from there.
        assert!((b.reserve(secs(3.0)).as_secs_f64() - 3.5).abs() < 1e-9);
    }

    #[test]
    fn ramp_up_rises_linearly() {
        // 100/s reached after 10 s: cumulative tokens = 5 t^2 for t < 10.
        let mut b = TokenBucket::new(100.0, secs(10.0), 1.0);
        assert_eq!(b.current_rate(secs(0.0)), Some(0.0));
        assert_eq!(b.current_rate(secs(5.0)), Some(50.0));
        assert_eq!(b.current_rate(secs(20.0)), Some(100.0));
        let g = grants(&mut b, 1001, Duration::ZERO);
        // Token k (k >= 1) comes when 5 t^2 = k, i.e. t = sqrt(k / 5).
        for k in [1usize, 20, 125, 499] {
            let expected = (k as f64 / 5.0).sqrt();
            assert!(
                (g[k].as_secs_f64() - expected).abs() < 1e-6,
                "{k}: {:?}",
                g[k]
            );
        }
        // 500 tokens by the end of the ramp; then 100/s.
        assert!((g[500].as_secs_f64() - 10.0).abs() < 1e-6);
        assert!((g[1000].as_secs_f64() - 15.0).abs() < 1e-6);
        // Count granted within the first 5 s: 5 * 25 = 125 (+ the free first).
        let within_5s = g.iter().filter(|at| **at <= secs(5.0)).count();
        assert_eq!(within_5s, 126);
    }

    #[test]
    fn rate_over_a_window_matches_target() {
        let mut b = TokenBucket::new(1000.0, Duration::ZERO, 1.0);
        // Callers arrive at 1 ms steps asking 3 at a time (over-demand).
        let mut all = Vec::new();
        for ms in 0..1000u64 {
            all.extend(grants(&mut b, 3, Duration::from_millis(ms)));
        }
        let within_1s = all.iter().filter(|at| **at < secs(1.0)).count();
        assert!((999..=1001).contains(&within_1s), "{within_1s}");
    }
}
