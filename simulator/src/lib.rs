//! activation-sim: simulated devices against the activation broker (SPEC §5).
//!
//! The binary is a thin wrapper around [`run`]; tests can drive scenarios
//! in-process:
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let cmd = activation_simulator::parse_args([
//!     "activation-sim", "flood", "--port", "1883", "--product-key", "pk1",
//!     "--product-secret", "secret", "--devices", "100", "--hold", "0", "--quiet",
//! ])?;
//! let report = activation_simulator::run(cmd).await?;
//! assert_eq!(report.accepted, 100);
//! # Ok(()) }
//! ```

pub mod bucket;
pub mod cli;
pub mod device;
pub mod devices;
pub mod limits;
pub mod progress;
pub mod report;
pub mod scenarios;
pub mod workers;

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::{bail, Result};
use clap::Parser;
use tokio::sync::Semaphore;

use crate::bucket::{SharedBucket, TokenBucket};
use crate::cli::{Cli, ClientIdMode, Command, Engine};
use crate::device::Target;
use crate::progress::Mode;
pub use crate::report::Report;
pub use crate::scenarios::Stop;
use crate::scenarios::{secs, AcceptedLog, Ctx};

/// Parses a command line (program name first).
pub fn parse_args<I, T>(args: I) -> Result<Command, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    Cli::try_parse_from(args).map(|c| c.command)
}

/// Connections a scenario may hold at once per process (for the open-file
/// check).
fn held_at_once(cmd: &Command, devices: u64) -> u64 {
    match cmd {
        Command::Flood(a) if a.hold <= 0.0 => {
            let c = cmd
                .common()
                .map(|c| c.concurrency as u64)
                .unwrap_or(devices);
            devices.min(c)
        }
        // A storm briefly has the dropped and the new sockets open.
        Command::Storm(_) => devices.saturating_mul(2),
        _ => devices,
    }
}

/// Runs a load scenario (`flood`, `storm`, `churn`, `publish`) and returns
/// its report. `setup` is [`scenarios::setup::run`].
pub async fn run(cmd: Command) -> Result<Report> {
    run_until(cmd, Stop::new()).await
}

/// [`run`] that ends early, with a report of what happened so far, once
/// `stop` is triggered (the binary does that on Ctrl-C).
pub async fn run_until(cmd: Command, stop: Arc<Stop>) -> Result<Report> {
    let Some(common) = cmd.common() else {
        bail!("setup is not a load scenario: call scenarios::setup::run");
    };
    if common.protocol != 4 && common.protocol != 5 {
        bail!("--protocol must be 4 or 5");
    }
    if common.engine == Engine::Rumqttc && !common.source_ip.is_empty() {
        bail!("--engine rumqttc cannot bind --source-ip; use --engine auto or socket");
    }
    let progress = if common.worker_mode {
        Mode::JsonLines
    } else if common.quiet || !std::io::stderr().is_terminal() {
        Mode::Hidden
    } else {
        Mode::Bar
    };
    let devices = devices::device_list(common)?;
    if devices.is_empty() {
        bail!("no devices to simulate (--devices 0?)");
    }
    if common.workers > 1 && !common.worker_mode {
        let per_worker = (devices.len() as u64).div_ceil(common.workers as u64);
        limits::ensure_open_files(held_at_once(&cmd, per_worker), false)?;
        // Ports are per machine, not per process.
        let held = held_at_once(&cmd, devices.len() as u64);
        if let Some(w) = limits::port_warning(held, common.source_ip.len()) {
            eprintln!("{w}");
        }
        return workers::run(&cmd, devices.len() as u64, progress, stop).await;
    }
    let held = held_at_once(&cmd, devices.len() as u64);
    limits::ensure_open_files(held, true)?;
    if !common.worker_mode {
        if let Some(w) = limits::port_warning(held, common.source_ip.len()) {
            eprintln!("{w}");
        }
    }

    let accepted_log = match &common.accepted_file {
        Some(path) => Some(Arc::new(AcceptedLog::open(path, !common.worker_mode)?)),
        None => None,
    };
    let timeout = secs(common.timeout);
    if timeout.is_zero() {
        bail!("--timeout must be positive");
    }
    let target = Target {
        host: common.host.clone(),
        port: common.port,
        protocol: common.protocol,
        keepalive: common.keepalive,
        timeout,
        own_socket: common.engine == Engine::Socket || !common.source_ip.is_empty(),
        empty_client_id: common.client_id == ClientIdMode::Empty,
        clock_skew_ms: if common.clock_skew.is_finite() {
            (common.clock_skew * 1000.0).round() as i64
        } else {
            bail!("--clock-skew must be a number of seconds")
        },
    };
    let ctx = Arc::new(Ctx {
        target,
        devices: Arc::new(devices),
        source_ips: common.source_ip.clone(),
        bucket: SharedBucket::new(TokenBucket::new(
            common.rate,
            secs(common.ramp_up),
            TokenBucket::default_burst(common.rate),
        )),
        inflight: Arc::new(Semaphore::new(common.concurrency.max(1))),
        accepted_log,
        progress,
        stop,
    });
    match &cmd {
        Command::Flood(a) => scenarios::flood::run(ctx, a).await,
        Command::Storm(a) => scenarios::storm::run(ctx, a).await,
        Command::Churn(a) => scenarios::churn::run(ctx, a).await,
        Command::Publish(a) => scenarios::publish::run(ctx, a).await,
        Command::Setup(_) => bail!("setup is not a load scenario"),
    }
}

/// Writes `--json` (a worker's includes the raw histogram).
pub fn write_json(report: &Report, cmd: &Command) -> Result<()> {
    let Some(common) = cmd.common() else {
        return Ok(());
    };
    let Some(path) = &common.json else {
        return Ok(());
    };
    let out = if common.worker_mode {
        report.clone()
    } else {
        report.without_histograms()
    };
    let text = serde_json::to_string_pretty(&out)?;
    std::fs::write(path, text + "\n")
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
}
