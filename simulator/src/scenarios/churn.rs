//! `churn`: every device goes online and offline at random for --duration;
//! the shared token bucket caps the connect rate at --rate.

use std::sync::Arc;

use anyhow::Result;
use rand::Rng;
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

pub async fn run(ctx: Arc<Ctx>, args: &ChurnArgs) -> Result<Report> {
    let stats = Arc::new(Stats::new());
    let deadline = Instant::now() + secs(args.duration);
    let abrupt = args.abrupt.clamp(0.0, 1.0);
    let (online, offline) = (args.online, args.offline);
    let ticker = ctx.ticker("churn", None, &stats);
    let mut tasks = JoinSet::new();
    for idx in 0..ctx.devices.len() {
        let ctx = ctx.clone();
        let stats = stats.clone();
        tasks.spawn(async move {
            loop {
                // Offline for a while (this also spreads the first connects).
                let wake = Instant::now() + around(offline);
                if wake >= deadline {
                    return;
                }
                tokio::time::sleep_until(wake).await;
                let Some(permit) = ctx.admit(true).await else {
                    return;
                };
                if Instant::now() >= deadline {
                    return;
                }
                let attempt = ctx.connect(idx, &stats).await;
                drop(permit);
                let Outcome::Accepted(mut session) = attempt.outcome else {
                    continue;
                };
                let until = (Instant::now() + around(online)).min(deadline);
                let stay = until.saturating_duration_since(Instant::now());
                if let Some(end) = session.hold(stay).await {
                    stats.server_disconnect(&end.to_string());
                    continue;
                }
                if Instant::now() >= deadline {
                    session.disconnect(DISCONNECT_GRACE).await;
                    return;
                }
                if rand::thread_rng().gen_bool(abrupt) {
                    session.drop_abruptly();
                } else {
                    session.disconnect(DISCONNECT_GRACE).await;
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    ticker.finish(stats.progress());
    Ok(stats.report("churn", ctx.target.protocol, false))
}
