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

use std::path::{Path, PathBuf};
use std::time::Duration;

use activation_broker::bench::child::TempDir;
use activation_broker::bench::load::{source_ip, telemetry_topic, Held, Load, Phase};
use activation_broker::bench::procfs::{cpus, nofile_limit};
use activation_broker::bench::report::{
    kb_per, mb, phase_cells, phase_notes, ratio, Table, PHASE_HEADERS,
};
use activation_broker::bench::targets::{
    broker_bin, mosquitto_name, mosquitto_settings, Account, ActivationBroker, BrokerSpec,
    Mosquitto, PRODUCT,
};
use activation_broker::bench::telemetry::{self, Backend, Publisher, Settings, Telemetry};
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

const BACKEND: &str = "backend";
const BACKEND_FILTER: &str = "devices/+/+/telemetry";

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
        subscribe_benches(args, &load, &bin, tmp.path(), &client)?;
    }
    check_stop()?;
    if !args.skip_telemetry {
        telemetry_bench(args, &load, &bin, tmp.path(), &client)?;
    }
    Ok(())
}

/// RSS before and after a phase.
struct Rss {
    label: String,
    devices: u64,
    before_kb: u64,
    after_kb: u64,
}

impl Rss {
    fn per_device(&self) -> f64 {
        self.after_kb.saturating_sub(self.before_kb) as f64 / self.devices.max(1) as f64
    }
}

/// Runs a phase on a settled server, holds its devices until the server's
/// RSS is stable again, then releases them and waits for the server to
/// settle: returns the phase and the RSS growth it caused.
fn measured_phase(
    load: &Load,
    label: &str,
    concurrency: usize,
    pid: u32,
    addr: std::net::SocketAddr,
    devices: Vec<activation_broker::bench::load::Device>,
) -> anyhow::Result<(Phase, Rss)> {
    let (before_kb, fds_idle) = load.settle(pid)?;
    let (phase, held): (Phase, Held) = load.phase(label, concurrency, pid, addr, devices)?;
    let (after_kb, _) = load.settle(pid)?;
    let rss = Rss {
        label: label.to_owned(),
        devices: held.len() as u64,
        before_kb,
        after_kb,
    };
    load.release(held, pid, fds_idle);
    Ok((phase, rss))
}

/// Benchmarks 1 and 3.
fn subscribe_benches(
    args: &Args,
    load: &Load,
    bin: &Path,
    tmp: &Path,
    client: &str,
) -> anyhow::Result<()> {
    let n = args.devices;
    let c = args.concurrency;
    let spec = BrokerSpec {
        codes: n as u64,
        io_threads: args.io_threads,
        account: None,
    };
    let mut phases = Vec::new();
    let mut rss = Vec::new();
    // Every phase runs on a freshly started server, so none inherits the
    // sessions, router state or allocator pages of another.
    let mut broker = ActivationBroker::start(bin, &tmp.join("broker-1"), &spec)?;
    for (k, (label, subscribe)) in [
        ("activation broker: first activations, connect only", false),
        ("activation broker: reconnects, connect only", false),
        ("activation broker: reconnects + SUBSCRIBE", true),
    ]
    .into_iter()
    .enumerate()
    {
        if k > 0 {
            broker.restart()?;
        }
        let devices = broker.devices("dev-", 0..n, subscribe)?;
        let (p, r) = measured_phase(load, label, c, broker.pid(), broker.addr, devices)?;
        phases.push(p);
        rss.push(r);
        check_stop()?;
    }
    let first = phases[0].accepted;
    let (consumed, _) = broker.stop_and_check()?;
    if consumed != first {
        bail!(
            "the store has {consumed} consumed codes but {first} first activations got CONNACK 0"
        );
    }
    let mut mosquitto = None;
    if args.skip_mosquitto {
    } else if !args.mosquitto_bin.is_file() {
        eprintln!(
            "Mosquitto skipped: {} is not installed (apt-get install mosquitto)",
            args.mosquitto_bin.display()
        );
    } else {
        let name = mosquitto_name(&args.mosquitto_bin);
        let dir = tmp.join("mosquitto");
        let passwd = Mosquitto::write_passwd(&args.mosquitto_bin, &dir, "dev-", 0..n)?;
        for (auth, passwd) in [
            ("password file", Some(passwd.as_path())),
            ("anonymous", None),
        ] {
            for (what, subscribe) in [("connect only", false), ("connect + SUBSCRIBE", true)] {
                let mut m = Mosquitto::start(&args.mosquitto_bin, &dir, passwd)?;
                let label = format!("{name}, {auth}: {what}");
                let devices = m.devices("dev-", 0..n, subscribe)?;
                let (p, r) = measured_phase(load, &label, c, m.pid(), m.addr, devices)?;
                m.child.check_alive()?;
                phases.push(p);
                rss.push(r);
                check_stop()?;
            }
        }
        mosquitto = Some(name);
    }

    // Benchmark 1.
    let mut headers = PHASE_HEADERS.to_vec();
    headers.extend(["vs Mosquitto password file", "vs Mosquitto anonymous"]);
    let mut t = Table::new(
        &format!("Benchmark 1: connect + SUBSCRIBE of {n} devices, {c} in flight"),
        &headers,
    );
    t.setting(format!("{n} devices, {c} in flight; {client}"));
    t.setting(format!("each device: socket → CONNECT → CONNACK, and in the SUBSCRIBE rows → SUBSCRIBE `devices/{PRODUCT}/{{DK}}/command` QoS 1 → SUBACK; latency: socket open → CONNACK or SUBACK; the devices stay connected (idle) until the phase's RSS is read, then DISCONNECT"));
    t.setting(spec.describe());
    t.setting("every phase runs on a freshly started server process: the activation broker restarted on its store (the first phase activates the devices, a code consumed and flushed before each CONNACK; the next ones reconnect them), Mosquitto started anew");
    if let Some(name) = &mosquitto {
        t.setting(mosquitto_settings(name));
    }
    let find = |what: &str| {
        phases
            .iter()
            .find(|p| p.label.contains("Mosquitto") && p.label.contains(what))
            .map(Phase::rate)
    };
    for p in &phases {
        let kind = if p.label.contains("SUBSCRIBE") {
            "connect + SUBSCRIBE"
        } else {
            "connect only"
        };
        let mut cells = phase_cells(p);
        let ours = !p.label.contains("Mosquitto");
        let cmp = |auth: &str| {
            if ours {
                ratio(Some(p.rate()), find(&format!("{auth}: {kind}")))
            } else {
                String::new()
            }
        };
        cells.push(cmp("password file"));
        cells.push(cmp("anonymous"));
        t.row(cells);
    }
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let sub = phases
        .iter()
        .find(|p| p.label == "activation broker: reconnects + SUBSCRIBE");
    let conn = phases
        .iter()
        .find(|p| p.label == "activation broker: reconnects, connect only");
    if let (Some(sub), Some(conn)) = (sub, conn) {
        t.note(format!(
            "activation broker, reconnects: connect + SUBSCRIBE at {:.2}x the rate of connect alone.",
            sub.rate() / conn.rate().max(1e-9)
        ));
        for auth in ["password file", "anonymous"] {
            if let Some(m) = find(&format!("{auth}: connect + SUBSCRIBE")) {
                let x = sub.rate() / m.max(1e-9);
                t.note(format!(
                    "connect + SUBSCRIBE ≥ 1.0x Mosquitto {auth}: {x:.2}x, {}",
                    verdict(x >= 1.0)
                ));
            }
        }
    }
    t.note(format!(
        "the first activations consumed {first} codes; the store reopened after the broker stopped holds {consumed} consumed."
    ));
    let refs: Vec<&Phase> = phases.iter().collect();
    phase_notes(&mut t, &refs);
    t.print();

    // Benchmark 3.
    let mut r = Table::new(
        &format!("Benchmark 3: RSS per idle device, {n} devices"),
        &[
            "server and phase",
            "devices",
            "before MB",
            "with devices MB",
            "KB per device",
        ],
    );
    r.setting(format!("the phases of benchmark 1; {client}"));
    r.setting("KB per device = (server VmRSS with the phase's devices connected, subscribed if the phase subscribes, and idle − VmRSS of the freshly started server right before the phase) / devices; each reading once stable (three readings 1 s apart within 0.5 %)");
    r.setting("activation broker: the first row's growth includes the devices' ledger records; the reconnect rows start from a broker restarted with the devices already activated (their records loaded)");
    for s in &rss {
        r.row(vec![
            s.label.clone(),
            s.devices.to_string(),
            mb(s.before_kb),
            mb(s.after_kb),
            kb_per(s.before_kb, s.after_kb, s.devices),
        ]);
    }
    if let Some(s) = rss
        .iter()
        .find(|s| s.label == "activation broker: reconnects + SUBSCRIBE")
    {
        let kb = s.per_device();
        r.note(format!(
            "RSS per idle subscribed device ≤ 8 KB: {kb:.1} KB, {}",
            verdict(kb <= 8.0)
        ));
    }
    r.print();
    Ok(())
}

/// One broker's telemetry measurements: with no other device, then with
/// the idle subscribed devices held.
struct TelemetryRun {
    backend: bool,
    publishers: Phase,
    devices: Phase,
    none: Telemetry,
    with: Telemetry,
    consumed: u64,
    spec: BrokerSpec,
}

/// Benchmark 2 on a fresh broker, with or without the backend account
/// subscribed.
fn telemetry_run(
    args: &Args,
    load: &Load,
    bin: &Path,
    dir: &Path,
    with_backend: bool,
    settings: Settings,
) -> anyhow::Result<TelemetryRun> {
    let (n, np, c) = (args.devices, args.publishers, args.concurrency);
    let password = format!("bench-{}", std::process::id());
    let spec = BrokerSpec {
        codes: (n + np) as u64,
        io_threads: args.io_threads,
        account: with_backend.then(|| Account {
            name: BACKEND.into(),
            password: password.clone(),
            subscribe: vec![BACKEND_FILTER.into()],
        }),
    };
    let broker = ActivationBroker::start(bin, dir, &spec)?;
    let (pid, addr) = (broker.pid(), broker.addr);
    let backend = if with_backend {
        Some(load.rt.block_on(Backend::connect(
            broker.accounts_addr,
            source_ip(load.source_net(), 0),
            "telemetry",
            (BACKEND.into(), password),
            BACKEND_FILTER,
        ))?)
    } else {
        None
    };
    let tag = if with_backend {
        "backend"
    } else {
        "no backend"
    };
    let (pub_phase, held) = load.phase(
        &format!("{tag}: publishers, first activations"),
        c.min(np),
        pid,
        addr,
        broker.devices("pub-", 0..np, false)?,
    )?;
    if held.len() != np {
        bail!(
            "only {} of {np} publishers connected: {}",
            held.len(),
            pub_phase.failure_note().unwrap_or_default()
        );
    }
    let publishers = held
        .into_iter()
        .map(|(i, stream)| Publisher {
            index: i as u32,
            topic: telemetry_topic(PRODUCT, &format!("pub-{i}")),
            stream,
        })
        .collect();
    load.settle(pid)?;
    let (none, publishers) = telemetry::measure(
        load.rt,
        &format!("{tag}, no other device"),
        1,
        pid,
        publishers,
        backend.as_ref(),
        settings,
    )?;
    check_stop()?;
    let (devices_phase, devices_held) = load.phase(
        &format!("{tag}: idle devices, first activations + SUBSCRIBE"),
        c,
        pid,
        addr,
        broker.devices("dev-", 0..n, true)?,
    )?;
    load.settle(pid)?;
    let (with, publishers) = telemetry::measure(
        load.rt,
        &format!("{tag}, {} idle subscribed devices held", devices_held.len()),
        2,
        pid,
        publishers,
        backend.as_ref(),
        settings,
    )?;
    drop(backend);
    drop(publishers);
    drop(devices_held);
    let (consumed, _) = broker.stop_and_check()?;
    Ok(TelemetryRun {
        backend: with_backend,
        publishers: pub_phase,
        devices: devices_phase,
        none,
        with,
        consumed,
        spec,
    })
}

/// Benchmark 2: with the backend account subscribed (every message must
/// reach it), and without (no subscriber matches the telemetry topics).
fn telemetry_bench(
    args: &Args,
    load: &Load,
    bin: &Path,
    tmp: &Path,
    client: &str,
) -> anyhow::Result<()> {
    let (n, np, c) = (args.devices, args.publishers, args.concurrency);
    let settings = Settings {
        inflight: args.inflight,
        payload: args.payload,
        window: Duration::from_secs(args.publish_secs.max(1)),
        drain: Duration::from_secs(args.timeout_secs),
    };
    let mut runs = Vec::new();
    for (k, with_backend) in [true, false].into_iter().enumerate() {
        check_stop()?;
        let dir = tmp.join(format!("broker-telemetry-{k}"));
        runs.push(telemetry_run(
            args,
            load,
            bin,
            &dir,
            with_backend,
            settings,
        )?);
    }

    let mut t = Table::new(
        &format!("Benchmark 2: telemetry QoS 1 from {np} publishers, with and without {n} idle subscribed devices"),
        &[
            "backend subscribed",
            "held devices",
            "publishers",
            "in flight each",
            "seconds",
            "msgs/s acked",
            "p50 ms",
            "p99 ms",
            "sent",
            "acked",
            "backend received",
            "backend duplicates",
            "server CPU µs/msg",
            "vs no other device",
        ],
    );
    t.setting(format!("{np} publisher devices, each keeping {} QoS 1 PUBLISHes of {} bytes unacknowledged on `devices/{PRODUCT}/pub-{{i}}/telemetry` for {} s; msgs/s acked = PUBACKs received within the window / the window; latency: PUBLISH written → PUBACK read; {client}", settings.inflight, settings.payload, settings.window.as_secs()));
    t.setting(format!("backend subscribed: a backend account (`{BACKEND}`, accounts listener) subscribed to `{BACKEND_FILTER}` at QoS 1 acknowledges and counts every message by its payload's run, publisher and sequence number; after the window the bench waits for the last PUBACKs and until the backend has every message sent (or nothing arrives for {} s). Without: the same on a broker with no account and no subscriber matching the telemetry topics", settings.drain.as_secs()));
    t.setting(format!("held devices: connected (first activations, {c} in flight) and subscribed to `devices/{PRODUCT}/{{DK}}/command` with the publishers connected, then idle"));
    t.setting("each of the two rows pairs runs on its own freshly started broker");
    if let Some(r) = runs.first() {
        t.setting(r.spec.describe());
    }
    for r in &runs {
        for (m, held) in [(&r.none, 0), (&r.with, r.devices.accepted)] {
            t.row(vec![
                if r.backend { "yes" } else { "no" }.into(),
                held.to_string(),
                m.publishers.to_string(),
                m.settings.inflight.to_string(),
                format!("{:.2}", m.settings.window.as_secs_f64()),
                format!("{:.0}", m.rate()),
                format!("{:.2}", m.ms(0.5)),
                format!("{:.2}", m.ms(0.99)),
                m.sent.to_string(),
                m.acked.to_string(),
                if r.backend {
                    m.received.to_string()
                } else {
                    "no backend".into()
                },
                if r.backend {
                    m.duplicates.to_string()
                } else {
                    "no backend".into()
                },
                format!("{:.1}", m.server_us()),
                ratio(Some(m.rate()), Some(r.none.rate())),
            ]);
        }
    }
    for r in &runs {
        let x = r.with.rate() / r.none.rate().max(1e-9);
        let tag = if r.backend {
            "backend subscribed"
        } else {
            "no backend"
        };
        t.note(format!(
            "{tag}: with {} idle subscribed devices held / with none ≥ 0.9: {x:.2}, {}",
            r.devices.accepted,
            if x >= 0.9 { "met" } else { "MISSED" }
        ));
        t.note(format!(
            "{tag}: the {} held devices connected and subscribed in {:.2} s ({:.0}/s, p99 {:.2} ms).",
            r.devices.accepted,
            r.devices.elapsed.as_secs_f64(),
            r.devices.rate(),
            r.devices.ms(0.99)
        ));
        for m in [&r.none, &r.with] {
            if r.backend {
                let every = m.received == m.sent && m.duplicates == 0;
                t.note(format!(
                    "{}: the backend received {} of {} messages sent ({} acked), {} duplicates — {}",
                    m.label,
                    m.received,
                    m.sent,
                    m.acked,
                    m.duplicates,
                    if every { "every message" } else { "NOT every message" }
                ));
            }
            let wall = m.elapsed.as_secs_f64().max(1e-9);
            t.note(format!(
                "{}: the server used {:.0} % and the client {:.0} % of one core over the {:.1} s of window and drain.",
                m.label,
                100.0 * m.server_cpu / wall,
                100.0 * m.client_cpu / wall,
                m.elapsed.as_secs_f64()
            ));
            if let Some(e) = &m.first_error {
                t.note(format!(
                    "{}: {} publishers failed (first: {e})",
                    m.label, m.errors
                ));
            }
        }
        for p in [&r.publishers, &r.devices] {
            if let Some(n) = p.failure_note() {
                t.note(n);
            }
        }
        t.note(format!(
            "{tag}: the store reopened after the broker stopped holds {} consumed codes ({} publishers + {} devices activated).",
            r.consumed, r.publishers.accepted, r.devices.accepted
        ));
    }
    t.print();
    Ok(())
}
