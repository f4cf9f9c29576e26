//! Data-plane benchmark (issue 11, benchmarks 1–3), every server a child
//! process on loopback, driven by the client of `activation_broker::bench`:
//!
//! 1. connect + SUBSCRIBE: each device subscribes to
//!    `devices/{PK}/{DK}/command` (QoS 1) after its CONNACK and waits for the
//!    SUBACK; devices/s and latency socket open → SUBACK, against Mosquitto
//!    with a password file and anonymous at the same concurrency, each beside
//!    the same devices connecting without subscribing;
//! 2. telemetry: QoS 1 msgs/s acknowledged from `--publishers` devices
//!    publishing to `devices/{PK}/{DK}/telemetry`, with no other device,
//!    then with `--devices` idle subscribed devices held; a backend account
//!    subscribed to `devices/+/+/telemetry` counts what it receives;
//! 3. RSS per idle device: the broker's RSS growth over each phase of 1 /
//!    the devices, with and without a subscription.
//!
//! Benchmarks 1 and 3 share one broker, benchmark 2 starts a fresh one.
//! Prints markdown tables with their settings.
//!
//! ```sh
//! cargo build --release --bins
//! target/release/dataplane-bench [--devices 15000] [--publishers 200] [--concurrency 64]
//! ```

mod subscribe;
mod telemetry;

use std::path::PathBuf;
use std::time::Duration;

use activation_broker::bench::child::TempDir;
use activation_broker::bench::load::Load;
use activation_broker::bench::procfs::{cpus, nofile_limit};
use activation_broker::bench::targets::broker_bin;
use activation_broker::bench::{check_stop, stop_on_ctrl_c};
use anyhow::bail;
use clap::Parser;

#[derive(Parser)]
#[command(
    about = "Benchmark the data plane: connect + SUBSCRIBE, telemetry, RSS per subscribed device"
)]
struct Args {
    /// Devices that connect and subscribe (and are held idle).
    #[arg(long, default_value_t = 15_000)]
    devices: usize,
    /// Devices publishing telemetry in benchmark 2.
    #[arg(long, default_value_t = 200)]
    publishers: usize,
    /// Connections in flight at once (below Mosquitto's listen backlog of 100).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Unacknowledged QoS 1 PUBLISHes per publisher.
    #[arg(long, default_value_t = 10)]
    inflight: usize,
    /// Payload bytes of a telemetry message (at least 14).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Seconds each telemetry measurement publishes.
    #[arg(long, default_value_t = 10)]
    publish_secs: u64,
    /// Worker threads of the client runtime.
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// `[devices] io_threads` of the activation broker (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    io_threads: usize,
    /// Run only benchmark 2 (telemetry).
    #[arg(long)]
    skip_subscribe: bool,
    /// Run only benchmarks 1 and 3.
    #[arg(long)]
    skip_telemetry: bool,
    /// Leave Mosquitto out of benchmark 1.
    #[arg(long)]
    skip_mosquitto: bool,
    /// The activation-broker binary (default: next to this one).
    #[arg(long)]
    broker_bin: Option<PathBuf>,
    /// The Mosquitto binary.
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    mosquitto_bin: PathBuf,
    /// Seconds allowed for one device's CONNACK and SUBACK, and for the
    /// last PUBACKs and backend messages after a telemetry window.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
    /// Print where the server's RSS is (from /proc/PID/smaps) at each reading.
    #[arg(long)]
    smaps: bool,
    /// Record each phase with `perf record -g -p SERVER` into `DIR/<phase>.data`.
    #[arg(long, value_name = "DIR")]
    perf: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Err(e) = activation_broker::limits::raise_open_file_limit() {
        eprintln!("warning: cannot raise the open-file limit: {e}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()?;
    stop_on_ctrl_c(&rt);
    let result = run(&args, &rt);
    drop(rt);
    result
}

fn run(args: &Args, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    if args.devices == 0 || args.concurrency == 0 || args.publishers == 0 || args.inflight == 0 {
        bail!("--devices, --publishers, --concurrency and --inflight must be at least 1");
    }
    // Both the client and the broker hold every connection at once.
    let needed = (args.devices + args.publishers + 100) as u64;
    if nofile_limit() < needed {
        bail!(
            "RLIMIT_NOFILE is {} but {needed} descriptors are needed: lower --devices or raise the limit",
            nofile_limit()
        );
    }
    let bin = broker_bin(args.broker_bin.as_deref())?;
    let tmp = TempDir::new("dataplane-bench")?;
    let mut load = Load::new(rt, Duration::from_secs(args.timeout_secs));
    load.smaps = args.smaps;
    load.perf = args.perf.clone();
    let client = format!(
        "{} CPUs shared by the client and the server, client on {} thread(s), MQTT 3.1.1 clean sessions, loopback, RLIMIT_NOFILE {} per process",
        cpus(),
        args.client_threads.max(1),
        nofile_limit()
    );
    if !args.skip_subscribe {
        subscribe::benches(args, &load, &bin, tmp.path(), &client)?;
    }
    check_stop()?;
    if !args.skip_telemetry {
        telemetry::bench(args, &load, &bin, tmp.path(), &client)?;
    }
    Ok(())
}
