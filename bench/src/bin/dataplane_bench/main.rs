//! Data-plane benchmark (benchmarks 1–3), every server a child
//! process on loopback, driven by the client of `activation_bench`:
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

use activation_bench::check_stop;
use activation_bench::child::TempDir;
use activation_bench::cli::CommonArgs;
use activation_bench::procfs::{cpus, nofile_limit};
use activation_bench::targets::broker_bin;
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
    #[command(flatten)]
    common: CommonArgs,
    /// Run only benchmark 2 (telemetry).
    #[arg(long)]
    skip_subscribe: bool,
    /// Run only benchmarks 1 and 3.
    #[arg(long)]
    skip_telemetry: bool,
    /// Leave Mosquitto out of benchmark 1.
    #[arg(long)]
    skip_mosquitto: bool,
    /// Another activation-broker binary (e.g. an earlier build) measured
    /// in benchmark 2 with the backend subscribed, in the same run, as the
    /// baseline.
    #[arg(long, value_name = "PATH")]
    baseline_bin: Option<std::path::PathBuf>,
    /// `[router] max_inflight_per_session` of this build in benchmark 2
    /// (default: the embedded config's).
    #[arg(long, value_name = "N")]
    router_inflight: Option<u16>,
    /// Rounds of each compared measurement, interleaved: benchmark 1's
    /// connect + SUBSCRIBE phases of the activation broker and Mosquitto,
    /// benchmark 2's windows with and without the held devices. Each
    /// verdict is the median of the rounds' ratios.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds allowed for one device's CONNACK and SUBACK, and for the
    /// last PUBACKs and backend messages after a telemetry window.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = args.common.runtime()?;
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
    let bin = broker_bin(args.common.broker_bin.as_deref())?;
    let tmp = TempDir::new("dataplane-bench")?;
    let load = args.common.load(rt, args.timeout_secs);
    let client = format!(
        "{} CPUs shared by the client and the server, client on {} thread(s), MQTT 3.1.1 clean sessions, loopback, RLIMIT_NOFILE {} per process",
        cpus(),
        args.common.client_threads.max(1),
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
