//! `churn`: for --duration seconds, offline devices are picked at random and
//! connected at the target --rate (shared token bucket); each stays online
//! for a random time (mean --online), then leaves, half of the time (see
//! --abrupt) without DISCONNECT, and is offline for a random time (mean
//! --offline) before it can be picked again. With too few devices for the
//! rate (fewer than about rate x (online + offline)) the offline pool runs
//! dry and the achieved rate is lower; the report shows the real one.

use std::sync::{Arc, Mutex};

use anyhow::Result;
use rand::Rng;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{secs, Ctx, DISCONNECT_GRACE};
use crate::cli::ChurnArgs;
use crate::device::Outcome;
use crate::report::{Report, Stats};

/// Uniform in [0, 2 * mean] seconds: mean `mean`.
fn around(mean: f64) -> std::time::Duration {
    let mean = if mean.is_finite() { mean.max(0.0) } else { 0.0 };
    if mean == 0.0 {
        return std::time::Duration::ZERO;
    }
    secs(rand::thread_rng().gen_range(0.0..=2.0 * mean))
}

/// Devices that may be connected next.
struct Pool {
    idle: Mutex<Vec<usize>>,
    returned: Notify,
}

impl Pool {
    fn take_random(&self) -> Option<usize> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.is_empty() {
            return None;
        }
        let i = rand::thread_rng().gen_range(0..idle.len());
        Some(idle.swap_remove(i))
    }

    fn put_back(&self, idx: usize) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(idx);
        self.returned.notify_one();
    }
}

pub async fn run(ctx: Arc<Ctx>, args: &ChurnArgs) -> Result<Report> {
    let stats = Arc::new(Stats::new());
    let deadline = Instant::now() + secs(args.duration);
    let abrupt = args.abrupt.clamp(0.0, 1.0);
    let (online, offline) = (args.online, args.offline);
    let pool = Arc::new(Pool {
        idle: Mutex::new((0..ctx.devices.len()).collect()),
        returned: Notify::new(),
    });
    let ticker = ctx.ticker("churn", None, &stats);
    let mut tasks = JoinSet::new();
    'dispatch: while Instant::now() < deadline && !ctx.stop.is_stopped() {
        let idx = loop {
            if let Some(idx) = pool.take_random() {
                break idx;
            }
            // Everyone is online or resting: wait for one to come back.
            let wait = pool.returned.notified();
            if let Some(idx) = pool.take_random() {
                break idx;
            }
            tokio::select! {
                r = tokio::time::timeout_at(deadline, wait) => {
                    if r.is_err() {
                        break 'dispatch;
                    }
                }
                _ = ctx.stop.wait() => break 'dispatch,
            }
        };
        let permit = tokio::select! {
            p = ctx.admit(true) => p,
            _ = tokio::time::sleep_until(deadline) => None,
        };
        let Some(permit) = permit else {
            pool.put_back(idx);
            break;
        };
        if Instant::now() >= deadline {
            break;
        }
        let ctx = ctx.clone();
        let stats = stats.clone();
        let pool = pool.clone();
        tasks.spawn(async move {
            let attempt = ctx.connect(idx, &stats).await;
            drop(permit);
            if let Outcome::Accepted(mut session) = attempt.outcome {
                let until = (Instant::now() + around(online)).min(deadline);
                let stay = until.saturating_duration_since(Instant::now());
                if let Some(end) = ctx.hold(&mut session, stay).await {
                    stats.server_disconnect(&end.to_string());
                } else if Instant::now() >= deadline || ctx.stop.is_stopped() {
                    session.disconnect(DISCONNECT_GRACE).await;
                    return;
                } else if rand::thread_rng().gen_bool(abrupt) {
                    session.drop_abruptly();
                } else {
                    session.disconnect(DISCONNECT_GRACE).await;
                }
            }
            let rest = around(offline);
            if Instant::now() + rest < deadline && ctx.stop.sleep(rest).await {
                pool.put_back(idx);
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    ticker.finish(stats.progress());
    Ok(stats.report("churn", ctx.target.protocol, false))
}
