//! `storm`: connect every device, drop them all abruptly, and have all
//! reconnect at once (bounded only by --concurrency, not by --rate).

use std::sync::Arc;

use anyhow::Result;
use tokio::task::JoinSet;

use super::{secs, Ctx, DISCONNECT_GRACE};
use crate::cli::StormArgs;
use crate::device::{Outcome, Session};
use crate::report::{Report, Stats};

pub async fn run(ctx: Arc<Ctx>, args: &StormArgs) -> Result<Report> {
    let n = ctx.devices.len();

    // Phase 1: connect everyone at --rate and keep the sessions.
    let initial = Arc::new(Stats::new());
    let ticker = ctx.ticker("connect", Some(n as u64), &initial);
    let mut tasks: JoinSet<Option<(usize, Session)>> = JoinSet::new();
    let mut held: Vec<(usize, Session)> = Vec::with_capacity(n);
    for idx in 0..n {
        let Some(permit) = ctx.admit(true).await else {
            break;
        };
        let ctx = ctx.clone();
        let stats = initial.clone();
        tasks.spawn(async move {
            let attempt = ctx.connect(idx, &stats).await;
            drop(permit);
            match attempt.outcome {
                Outcome::Accepted(session) => Some((idx, session)),
                _ => None,
            }
        });
        while let Some(done) = tasks.try_join_next() {
            if let Ok(Some(s)) = done {
                held.push(s);
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        if let Ok(Some(s)) = done {
            held.push(s);
        }
    }
    ticker.finish(initial.progress());

    ctx.stop.sleep(secs(args.settle)).await;

    // Phase 2: drop all at once, without DISCONNECT.
    let mut survivors = Vec::with_capacity(held.len());
    for (idx, mut session) in held {
        if let Some(end) = session.check_ended().await {
            initial.server_disconnect(&end.to_string());
        } else {
            survivors.push(idx);
        }
        session.drop_abruptly();
    }
    let initial_report = initial.report("storm", ctx.target.protocol, false);
    // Let the runtime close the sockets before everyone reconnects.
    tokio::task::yield_now().await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;

    if ctx.stop.is_stopped() {
        survivors.clear();
    }
    // Phase 3: everyone who was connected reconnects at once.
    let stats = Arc::new(Stats::new());
    let hold = secs(args.hold);
    let ticker = ctx.ticker("reconnect", Some(survivors.len() as u64), &stats);
    let start = Arc::new(tokio::sync::Barrier::new(survivors.len() + 1));
    let mut tasks = JoinSet::new();
    for idx in survivors {
        let ctx = ctx.clone();
        let stats = stats.clone();
        let start = start.clone();
        tasks.spawn(async move {
            start.wait().await;
            let Some(permit) = ctx.admit(false).await else {
                return;
            };
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
    }
    start.wait().await;
    while tasks.join_next().await.is_some() {}
    ticker.finish(stats.progress());
    let mut report = stats.report("storm", ctx.target.protocol, false);
    report.initial_phase = Some(Box::new(initial_report));
    Ok(report)
}
