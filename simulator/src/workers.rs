//! `--workers N`: the devices are split into N contiguous slices, each run
//! by a child process of the same binary; the parent shows their combined
//! progress (the children print JSON progress lines) and merges their JSON
//! reports, raw latency histograms included, into one summary.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::cli::{Command, WORKER_SPEC_ENV};
use crate::progress::{Mode, Ticker};
use crate::report::{Progress, Report};
use crate::scenarios::Stop;

/// Contiguous `(offset, count)` slices of `total` devices over `workers`.
pub fn split(total: u64, workers: usize) -> Vec<(u64, u64)> {
    let w = workers.max(1) as u64;
    let base = total / w;
    let extra = total % w;
    let mut offset = 0;
    let mut out = Vec::new();
    for i in 0..w {
        let count = base + u64::from(i < extra);
        if count > 0 {
            out.push((offset, count));
        }
        offset += count;
    }
    out
}

/// The binary to start as a worker: `ACTIVATION_SIM_EXE`, else this process.
pub fn worker_exe() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ACTIVATION_SIM_EXE") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating the activation-sim binary")?;
    let name = exe
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !name.starts_with("activation-sim") {
        bail!(
            "--workers starts copies of the activation-sim binary, but this process is {name:?}; \
             set ACTIVATION_SIM_EXE to the activation-sim binary"
        );
    }
    Ok(exe)
}

/// Runs `cmd` over `total` devices in worker processes.
pub async fn run(cmd: &Command, total: u64, progress: Mode, stop: Arc<Stop>) -> Result<Report> {
    let Some(common) = cmd.common() else {
        bail!("setup does not run in workers");
    };
    let exe = worker_exe()?;
    let slices = split(total, common.workers);
    let n = slices.len().max(1);
    if let Some(path) = &common.accepted_file {
        // Children append; the parent starts the file empty.
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    }
    let dir = std::env::temp_dir();
    let samples: Arc<Mutex<Vec<Progress>>> = Arc::new(Mutex::new(vec![Progress::default(); n]));
    let source = {
        let samples = samples.clone();
        Arc::new(move || {
            let s = samples.lock().unwrap_or_else(|e| e.into_inner());
            s.iter().fold(Progress::default(), |a, p| Progress {
                attempted: a.attempted + p.attempted,
                accepted: a.accepted + p.accepted,
                refused: a.refused + p.refused,
                errors: a.errors + p.errors,
                timeouts: a.timeouts + p.timeouts,
                msgs_sent: a.msgs_sent + p.msgs_sent,
                msgs_acked: a.msgs_acked + p.msgs_acked,
            })
        })
    };
    let total_len = match cmd {
        Command::Churn(_) => None,
        _ => Some(total),
    };
    let ticker = Ticker::start(
        if progress == Mode::Bar {
            Mode::Bar
        } else {
            Mode::Hidden
        },
        &format!("{}x{}", cmd.name(), n),
        total_len,
        source.clone(),
    );

    let mut children = Vec::new();
    for (i, (offset, count)) in slices.iter().enumerate() {
        let mut child_cmd = cmd.clone();
        if let Some(c) = child_cmd.common_mut() {
            c.rate /= n as f64;
            c.concurrency = (c.concurrency / n).max(1);
        }
        let json = dir.join(format!(
            "activation-sim-{}-worker-{i}.json",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&json);
        if let Some(c) = child_cmd.common_mut() {
            c.workers = 1;
            c.worker_slice = Some((*offset, *count));
            c.worker_mode = true;
            c.quiet = true;
            c.json = Some(json.clone());
            c.expect.clear();
        }
        let spec = serde_json::to_string(&child_cmd).context("encoding a worker's command")?;
        let mut child = tokio::process::Command::new(&exe)
            .env(WORKER_SPEC_ENV, spec)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting worker {i} ({})", exe.display()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("worker {i} has no stdout"))?;
        let samples = samples.clone();
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(p) = serde_json::from_str::<Progress>(&line) {
                    if let Some(slot) = samples.lock().unwrap_or_else(|e| e.into_inner()).get_mut(i)
                    {
                        *slot = p;
                    }
                }
            }
        });
        children.push((i, child, reader, json));
    }

    // Pass a stop on to the children (they stop on SIGINT and still report).
    let pids: Vec<u32> = children.iter().filter_map(|c| c.1.id()).collect();
    let forward = tokio::spawn(async move {
        stop.wait().await;
        for pid in pids {
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: kill(2) with a child's pid and a valid signal.
                unsafe {
                    libc::kill(pid, libc::SIGINT);
                }
            }
        }
    });

    let mut reports = Vec::new();
    let mut failures = Vec::new();
    for (i, mut child, reader, json) in children {
        let status = child
            .wait()
            .await
            .with_context(|| format!("waiting for worker {i}"))?;
        let _ = reader.await;
        match read_report(&json) {
            Ok(r) => reports.push(r),
            Err(e) => failures.push(format!("worker {i} ({status}): {e:#}")),
        }
        let _ = std::fs::remove_file(&json);
    }
    forward.abort();
    let merged = Report::merge(&reports);
    ticker.finish(source());
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    Ok(merged)
}

fn read_report(path: &Path) -> Result<Report> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("no report at {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("bad report in {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_evenly_and_covers_all() {
        assert_eq!(split(10, 3), vec![(0, 4), (4, 3), (7, 3)]);
        assert_eq!(split(2, 4), vec![(0, 1), (1, 1)]);
        assert_eq!(split(0, 2), Vec::<(u64, u64)>::new());
        let s = split(100_001, 7);
        assert_eq!(s.iter().map(|x| x.1).sum::<u64>(), 100_001);
        for w in s.windows(2) {
            assert_eq!(w[0].0 + w[0].1, w[1].0);
        }
    }
}
