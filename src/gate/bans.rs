//! Failed credential checks per source address, and bans: `after` failures
//! within `window_ms` ban the source for `ban_ms`. Each ban is logged when
//! it starts and when it ends (expired, or lifted by an operator), and can
//! be listed and lifted (admin `DescribeBans`, `RemoveBan`).

use std::collections::HashMap;
use std::net::IpAddr;

use parking_lot::Mutex;

use crate::clock::{format_time, Millis};

/// Entries kept before expired ones are swept.
const SWEEP_AT: usize = 100_000;

pub(crate) struct Bans {
    after: u32,
    window_ms: Millis,
    ban_ms: Millis,
    state: Mutex<HashMap<IpAddr, SourceState>>,
}

#[derive(Default)]
struct SourceState {
    failures: u32,
    window_start: Millis,
    /// The current (or last, until noticed as ended) ban.
    ban: Option<BanInfo>,
}

#[derive(Debug, Clone)]
struct BanInfo {
    failures: u32,
    since: Millis,
    until: Millis,
    reason: String,
}

/// A source that is banned now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ban {
    pub source: IpAddr,
    /// Failed checks that led to the ban.
    pub failures: u32,
    pub since: Millis,
    pub until: Millis,
    /// The last failure before the ban.
    pub reason: String,
}

impl Bans {
    pub(crate) fn new(after: u32, window_ms: Millis, ban_ms: Millis) -> Bans {
        Bans {
            after,
            window_ms,
            ban_ms,
            state: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `ip` is banned at `now` (a ban found over is logged as ended).
    pub(crate) fn banned(&self, ip: IpAddr, now: Millis) -> bool {
        if self.after == 0 {
            return false;
        }
        let mut map = self.state.lock();
        let Some(s) = map.get_mut(&ip) else {
            return false;
        };
        match &s.ban {
            Some(b) if b.until > now => true,
            Some(_) => {
                end(ip, s, "expired");
                false
            }
            None => false,
        }
    }

    /// Counts a failed credential check of `ip`; `reason` says what failed.
    pub(crate) fn failed(&self, ip: IpAddr, now: Millis, reason: &str) {
        if self.after == 0 {
            return;
        }
        let mut map = self.state.lock();
        if map.len() > SWEEP_AT {
            let window = self.window_ms;
            for (ip, s) in map.iter_mut() {
                if s.ban.as_ref().is_some_and(|b| b.until <= now) {
                    end(*ip, s, "expired");
                }
            }
            map.retain(|_, s| s.ban.is_some() || now - s.window_start < window);
        }
        let s = map.entry(ip).or_default();
        if now - s.window_start >= self.window_ms {
            s.window_start = now;
            s.failures = 0;
        }
        s.failures += 1;
        if s.failures >= self.after {
            let ban = BanInfo {
                failures: s.failures,
                since: now,
                until: now.saturating_add(self.ban_ms),
                reason: reason.to_owned(),
            };
            tracing::warn!(
                source = %ip,
                failures = ban.failures,
                window_secs = self.window_ms / 1000,
                until = %format!("{}Z", format_time(ban.until).replace(' ', "T")),
                reason = %ban.reason,
                "source banned after repeated failed credential checks"
            );
            s.ban = Some(ban);
            s.failures = 0;
        }
    }

    /// The sources banned at `now`, by address.
    pub(crate) fn list(&self, now: Millis) -> Vec<Ban> {
        let mut map = self.state.lock();
        let mut out = Vec::new();
        for (ip, s) in map.iter_mut() {
            match &s.ban {
                Some(b) if b.until > now => out.push(Ban {
                    source: *ip,
                    failures: b.failures,
                    since: b.since,
                    until: b.until,
                    reason: b.reason.clone(),
                }),
                Some(_) => end(*ip, s, "expired"),
                None => {}
            }
        }
        out.sort_by_key(|b| b.source);
        out
    }

    /// Lifts the ban of `ip` (and forgets its failures); the ban lifted,
    /// or `None` if `ip` is not banned at `now`.
    pub(crate) fn lift(&self, ip: IpAddr, now: Millis, by: &str) -> Option<Ban> {
        let mut map = self.state.lock();
        let s = map.get_mut(&ip)?;
        let b = s.ban.clone()?;
        if b.until <= now {
            end(ip, s, "expired");
            return None;
        }
        end(ip, s, &format!("lifted by {by}"));
        s.failures = 0;
        Some(Ban {
            source: ip,
            failures: b.failures,
            since: b.since,
            until: b.until,
            reason: b.reason,
        })
    }
}

/// Ends the ban of `ip`, logging how.
fn end(ip: IpAddr, s: &mut SourceState, how: &str) {
    if let Some(b) = s.ban.take() {
        tracing::info!(
            source = %ip,
            until = %format!("{}Z", format_time(b.until).replace(' ', "T")),
            how,
            "ban ended"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banned_listed_lifted_and_expired() {
        let bans = Bans::new(3, 60_000, 300_000);
        let ip: IpAddr = "192.0.2.7".parse().expect("ip");
        for _ in 0..3 {
            assert!(!bans.banned(ip, 1_000));
            bans.failed(ip, 1_000, "signature does not match");
        }
        assert!(bans.banned(ip, 1_000));
        let list = bans.list(2_000);
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].until, 301_000);
        assert_eq!(list[0].failures, 3);
        assert_eq!(list[0].reason, "signature does not match");
        assert!(bans.lift(ip, 2_000, "admin").is_some());
        assert!(!bans.banned(ip, 2_000));
        assert!(bans.lift(ip, 2_000, "admin").is_none());
        for _ in 0..3 {
            bans.failed(ip, 3_000, "unknown product x");
        }
        assert!(bans.banned(ip, 302_999));
        assert!(!bans.banned(ip, 303_000));
        assert!(bans.list(303_000).is_empty());
    }
}
