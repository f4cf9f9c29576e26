//! `flood`: new devices connect at the configured rate and hold.

use std::sync::Arc;

use anyhow::Result;
use tokio::task::JoinSet;

use super::{secs, Ctx, DISCONNECT_GRACE};
use crate::cli::FloodArgs;
use crate::device::Outcome;
use crate::report::{Report, Stats};

pub async fn run(ctx: Arc<Ctx>, args: &FloodArgs) -> Result<Report> {
    let stats = Arc::new(Stats::new());
    let hold = secs(args.hold);
    let n = ctx.devices.len();
    let ticker = ctx.ticker("flood", Some(n as u64), &stats);
    let mut tasks = JoinSet::new();
    for idx in 0..n {
        let Some(permit) = ctx.admit(true).await else {
            break;
        };
        let ctx = ctx.clone();
        let stats = stats.clone();
        tasks.spawn(async move {
            let attempt = ctx.connect(idx, &stats).await;
            drop(permit);
            if let Outcome::Accepted(mut session) = attempt.outcome {
                if let Some(end) = ctx.hold(&mut session, hold).await {
                    stats.server_disconnect(&end.to_string());
                    return;
                }
                session.disconnect(DISCONNECT_GRACE).await;
            }
        });
        // Reap finished tasks as we go so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    ticker.finish(stats.progress());
    Ok(stats.report("flood", ctx.target.protocol, false))
}
