//! The command-line settings both bench binaries share (flattened into
//! their own `Args`) and what they set up from them: the client runtime
//! and the load client.

use std::path::PathBuf;
use std::time::Duration;

use super::load::Load;
use super::stop_on_ctrl_c;

#[derive(clap::Args)]
pub struct CommonArgs {
    /// Worker threads of the client runtime.
    #[arg(long, default_value_t = 1)]
    pub client_threads: usize,
    /// `[devices] io_threads` of the activation broker (0: its default, one
    /// per CPU).
    #[arg(long, default_value_t = 0)]
    pub io_threads: usize,
    /// The activation-broker binary (default: next to this one).
    #[arg(long)]
    pub broker_bin: Option<PathBuf>,
    /// The Mosquitto binary.
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    pub mosquitto_bin: PathBuf,
    /// Print where each measured server's RSS is (from /proc/PID/smaps) at
    /// each reading.
    #[arg(long)]
    pub smaps: bool,
    /// Record each phase with `perf record -g -p SERVER` (or `perf $BENCH_PERF_ARGS -p SERVER`) into `DIR/<phase>.data`.
    #[arg(long, value_name = "DIR")]
    pub perf: Option<PathBuf>,
}

impl CommonArgs {
    /// The client runtime (`--client-threads` workers, at least one), after
    /// raising the open-file limit (a warning if it cannot be); Ctrl-C on
    /// it sets [`super::STOP`].
    pub fn runtime(&self) -> anyhow::Result<tokio::runtime::Runtime> {
        if let Err(e) = activation_client::limits::raise_open_file_limit() {
            eprintln!("warning: cannot raise the open-file limit: {e}");
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.client_threads.max(1))
            .enable_all()
            .build()?;
        stop_on_ctrl_c(&rt);
        Ok(rt)
    }

    /// The load client on `rt`, allowing `timeout_secs` per device, with
    /// `--smaps` and `--perf`.
    pub fn load<'a>(&self, rt: &'a tokio::runtime::Runtime, timeout_secs: u64) -> Load<'a> {
        let mut load = Load::new(rt, Duration::from_secs(timeout_secs));
        load.smaps = self.smaps;
        load.perf = self.perf.clone();
        load
    }
}
