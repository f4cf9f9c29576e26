//! Connection benchmark: connects/s and CONNACK
//! latency p50/p99 of (a) first activations through the gate (durable),
//! (b) reconnects of active devices, (c) rumqttd's stock `Server` listener
//! on the same router configuration with no auth, (d) Mosquitto with a
//! password file and Mosquitto anonymous (if `/usr/sbin/mosquitto` is
//! installed), plus RSS per idle connected device. Every target runs as a
//! child process on loopback, one at a time, measured by the same client
//! (`activation_bench::load`). The whole comparison runs once per
//! `--concurrency` level: the first (below Mosquitto's fixed listen backlog
//! of 100) is the headline, the next ones show what overflowing that
//! backlog does. Prints markdown tables with their settings.
//!
//! ```sh
//! cargo build --release --bins
//! target/release/connect-bench [--devices 10000] [--concurrency 64,500] [--skip-mosquitto]
//! ```

use std::net::SocketAddr;
use std::path::Path;

use activation_bench::check_stop;
use activation_bench::child::TempDir;
use activation_bench::cli::CommonArgs;
use activation_bench::load::{Held, Load, Phase};
use activation_bench::procfs::cpus;
use activation_bench::report::{
    phase_cells, phase_notes, ratio, rss_table, Rss, Table, PHASE_HEADERS,
};
use activation_bench::targets::{
    broker_bin, mosquitto_name, mosquitto_settings, serve_stock_rumqttd, ActivationBroker,
    BrokerSpec, Mosquitto, StockRumqttd,
};
use anyhow::bail;
use clap::Parser;

#[derive(Parser)]
#[command(
    about = "Benchmark device connections: the activation broker against rumqttd and Mosquitto"
)]
struct Args {
    /// Devices connected in every phase (and held, for RSS).
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Connections in flight at once (client workers); one full run per
    /// value, the first is the headline.
    #[arg(long, value_delimiter = ',', default_value = "64,500")]
    concurrency: Vec<usize>,
    #[command(flatten)]
    common: CommonArgs,
    /// Skip (c).
    #[arg(long)]
    skip_rumqttd: bool,
    /// Skip (d) and Mosquitto anonymous.
    #[arg(long)]
    skip_mosquitto: bool,
    /// Seconds allowed for one connection to get its CONNACK.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
    /// Internal: run rumqttd's stock v4 `Server` (no auth) on this address
    /// and nothing else; the bench starts itself with it for target (c)
    /// (`targets::STOCK_RUMQTTD_FLAG`).
    #[arg(long = "serve-stock-rumqttd", hide = true)]
    serve_stock_rumqttd: Option<SocketAddr>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(addr) = args.serve_stock_rumqttd {
        return serve_stock_rumqttd(addr);
    }
    let rt = args.common.runtime()?;
    let result = run(&args, &rt);
    // Held sockets are closed before the runtime goes.
    drop(rt);
    result
}

/// Everything measured at one concurrency level.
struct Level {
    in_flight: usize,
    phases: Vec<Phase>,
    rss: Vec<Rss>,
    notes: Vec<String>,
}

impl Level {
    fn find(&self, prefix: &str) -> Option<&Phase> {
        self.phases.iter().find(|p| p.label.starts_with(prefix))
    }

    fn anonymous(&self) -> Option<&Phase> {
        self.phases.iter().find(|p| p.label.ends_with("anonymous"))
    }
}

fn run(args: &Args, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--concurrency needs values of at least 1");
    }
    let bin = broker_bin(args.common.broker_bin.as_deref())?;
    let tmp = TempDir::new("connect-bench")?;
    let load = args.common.load(rt, args.timeout_secs);
    let spec = BrokerSpec {
        codes: args.devices as u64,
        io_threads: args.common.io_threads,
        account: None,
        router: None,
    };
    let mosquitto = if args.skip_mosquitto {
        Err("skipped: --skip-mosquitto".to_owned())
    } else if !args.common.mosquitto_bin.is_file() {
        Err(format!(
            "skipped: {} is not installed (apt-get install mosquitto)",
            args.common.mosquitto_bin.display()
        ))
    } else {
        Ok(mosquitto_name(&args.common.mosquitto_bin))
    };
    let mut levels = Vec::new();
    for (k, &c) in args.concurrency.iter().enumerate() {
        let dir = tmp.path().join(format!("level-{k}"));
        let mut level = Level {
            in_flight: c,
            phases: Vec::new(),
            rss: Vec::new(),
            notes: Vec::new(),
        };
        activation_broker_phases(&load, &bin, &dir, &spec, c, &mut level)?;
        check_stop()?;
        if args.skip_rumqttd {
            level.notes.push("(c) skipped: --skip-rumqttd".into());
        } else {
            stock_rumqttd_phase(&load, &dir, args.devices, c, &mut level)?;
        }
        check_stop()?;
        match &mosquitto {
            Ok(name) => mosquitto_phases(&load, args, name, &dir, c, &mut level)?,
            Err(why) => level.notes.push(format!("(d) {why}")),
        }
        levels.push(level);
    }
    let settings = [
        format!(
            "{} devices per phase, MQTT 3.1.1 clean sessions, loopback, {} CPUs shared by the client and the server, client on {} thread(s); latency: socket open → CONNACK",
            args.devices,
            cpus(),
            args.common.client_threads.max(1)
        ),
        spec.describe(),
        match &mosquitto {
            Ok(name) => mosquitto_settings(name),
            Err(why) => format!("Mosquitto {why}"),
        },
    ];
    for (k, level) in levels.iter().enumerate() {
        print_level(level, k == 0, &settings);
    }
    print_backlog_note(&levels, mosquitto.as_deref().unwrap_or("Mosquitto"));
    Ok(())
}

/// (a) and (b) on one broker, then a check of its store.
fn activation_broker_phases(
    load: &Load,
    bin: &Path,
    dir: &Path,
    spec: &BrokerSpec,
    c: usize,
    level: &mut Level,
) -> anyhow::Result<()> {
    let n = spec.codes as usize;
    let broker = ActivationBroker::start(bin, &dir.join("activation-broker"), spec)?;
    let pid = broker.pid();
    let (idle_kb, fds_idle) = load.settle(pid)?;
    let (a, held) = load.phase(
        "(a) first activations, durable",
        c,
        pid,
        broker.addr,
        broker.devices("dev-", 0..n, false)?,
    )?;
    let (loaded_a, _) = load.settle(pid)?;
    level.rss.push(Rss {
        label: "activation broker, after (a)".into(),
        devices: held.len() as u64,
        before_kb: idle_kb,
        after_kb: loaded_a,
    });
    let devices_a = held.len() as u64;
    load.release(held, pid, fds_idle);
    // The same devices, activated but disconnected: what stays is the
    // ledger's share (and whatever the allocator keeps).
    let (released_kb, _) = load.settle(pid)?;
    level.rss.push(Rss {
        label: "activation broker, (a) devices disconnected again".into(),
        devices: devices_a,
        before_kb: idle_kb,
        after_kb: released_kb,
    });
    let (b, held) = load.phase(
        "(b) reconnects of active devices",
        c,
        pid,
        broker.addr,
        broker.devices("dev-", 0..n, false)?,
    )?;
    let (loaded_b, _) = load.settle(pid)?;
    level.rss.push(Rss {
        label: "activation broker, after (b)".into(),
        devices: held.len() as u64,
        before_kb: idle_kb,
        after_kb: loaded_b,
    });
    level.rss.push(Rss {
        label: "activation broker, connections only: after (b) − disconnected".into(),
        devices: held.len() as u64,
        before_kb: released_kb,
        after_kb: loaded_b,
    });
    load.release(held, pid, fds_idle);
    // Durability: the stopped broker's store holds exactly the
    // activations it acknowledged, and (b) consumed nothing.
    let (consumed, available) = broker.stop_and_check()?;
    if consumed != a.accepted {
        bail!(
            "store has {consumed} consumed codes but (a) saw {} CONNACK 0",
            a.accepted
        );
    }
    level.notes.push(format!(
        "(a) consumed {} codes, durable: the store reopened after the broker stopped holds {consumed} consumed, {available} available; (b) consumed none.",
        a.accepted
    ));
    level.phases.push(a);
    level.phases.push(b);
    Ok(())
}

/// (c): rumqttd's stock listener.
fn stock_rumqttd_phase(
    load: &Load,
    dir: &Path,
    n: usize,
    c: usize,
    level: &mut Level,
) -> anyhow::Result<()> {
    let mut server = StockRumqttd::start(&dir.join("rumqttd"))?;
    let pid = server.child.pid();
    let (idle_kb, _) = load.settle(pid)?;
    let (phase, held) = load.phase(
        "(c) rumqttd stock Server, no auth",
        c,
        pid,
        server.addr,
        server.devices("dev-", 0..n)?,
    )?;
    let (loaded, _) = load.settle(pid)?;
    level.rss.push(Rss {
        label: "(c) rumqttd stock Server".into(),
        devices: held.len() as u64,
        before_kb: idle_kb,
        after_kb: loaded,
    });
    server.child.check_alive()?;
    drop(held);
    server.child.kill();
    level.phases.push(phase);
    Ok(())
}

/// (d) Mosquitto with a password file, then Mosquitto anonymous.
fn mosquitto_phases(
    load: &Load,
    args: &Args,
    name: &str,
    dir: &Path,
    c: usize,
    level: &mut Level,
) -> anyhow::Result<()> {
    let n = args.devices;
    let dir = dir.join("mosquitto");
    let passwd = Mosquitto::write_passwd(&args.common.mosquitto_bin, &dir, "dev-", 0..n)?;
    for (label, passwd) in [
        (format!("(d) {name}, password file"), Some(passwd.as_path())),
        (format!("{name}, anonymous"), None),
    ] {
        check_stop()?;
        let mut m = Mosquitto::start(&args.common.mosquitto_bin, &dir, passwd)?;
        let pid = m.pid();
        let (idle_kb, _) = load.settle(pid)?;
        let (phase, held): (Phase, Held) =
            load.phase(&label, c, pid, m.addr, m.devices("dev-", 0..n, false)?)?;
        let (loaded, _) = load.settle(pid)?;
        level.rss.push(Rss {
            label: label.clone(),
            devices: held.len() as u64,
            before_kb: idle_kb,
            after_kb: loaded,
        });
        m.child.check_alive()?;
        drop(held);
        m.child.kill();
        level.phases.push(phase);
    }
    Ok(())
}

fn print_level(level: &Level, headline: bool, settings: &[String]) {
    let c = level.in_flight;
    let title = if headline {
        format!("Connections, {c} in flight (headline)")
    } else {
        format!("Connections, {c} in flight")
    };
    let mut headers = PHASE_HEADERS.to_vec();
    headers.extend(["vs (c)", "vs Mosquitto"]);
    let mut t = Table::new(&title, &headers);
    for s in settings {
        t.setting(s.clone());
    }
    let rate = |p: Option<&Phase>| p.map(Phase::rate);
    let (a, b, cc, d, anon) = (
        level.find("(a)"),
        level.find("(b)"),
        level.find("(c)"),
        level.find("(d)"),
        level.anonymous(),
    );
    for p in &level.phases {
        let vs_m = if p.label.starts_with("(a)") {
            with_suffix(ratio(Some(p.rate()), rate(d)), " (d)")
        } else if p.label.starts_with("(b)") {
            with_suffix(ratio(Some(p.rate()), rate(anon)), " (anon)")
        } else {
            String::new()
        };
        let mut cells = phase_cells(p);
        cells.push(ratio(Some(p.rate()), rate(cc)));
        cells.push(vs_m);
        t.row(cells);
    }
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    if let (Some(a), Some(cc)) = (a, cc) {
        let x = a.rate() / cc.rate().max(1e-9);
        t.note(format!("(a) ≥ 10x (c): {x:.2}x, {}", verdict(x >= 10.0)));
    }
    if let (Some(a), Some(d)) = (a, d) {
        let x = a.rate() / d.rate().max(1e-9);
        t.note(format!("(a) ≥ 1.0x (d): {x:.2}x, {}", verdict(x >= 1.0)));
    }
    if let (Some(b), Some(m)) = (b, anon) {
        let x = b.rate() / m.rate().max(1e-9);
        t.note(format!(
            "(b) ≥ 1.0x Mosquitto anonymous: {x:.2}x, {}",
            verdict(x >= 1.0)
        ));
    }
    for n in &level.notes {
        t.note(n.clone());
    }
    let phases: Vec<&Phase> = level.phases.iter().collect();
    phase_notes(&mut t, &phases);
    t.print();

    let mut r = rss_table(
        &format!("RSS per idle connected device, after the {c}-in-flight phases"),
        "RSS",
        &level.rss,
    );
    r.setting("RSS per device = (VmRSS with the devices connected and idle − VmRSS before) / devices, each read once stable (three readings 1 s apart within 0.5 %); for the activation broker \"before\" is before the first connect, so its rows include the devices' ledger records, except \"connections only\", whose \"before\" is the same devices activated but disconnected.");
    if let Some(s) = level.rss.first() {
        let kb = s.per_device();
        r.note(format!(
            "RSS per idle connected device ≤ 25 KB: {kb:.1} KB with its ledger records, {}",
            verdict(kb <= 25.0)
        ));
    }
    r.print();
}

fn with_suffix(s: String, suffix: &str) -> String {
    if s.is_empty() {
        s
    } else {
        s + suffix
    }
}

/// Why the levels differ: Mosquitto's fixed listen backlog, with the
/// listen drops each level measured.
fn print_backlog_note(levels: &[Level], mosquitto: &str) {
    if levels.len() < 2 {
        return;
    }
    let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    let drops: Vec<String> = levels
        .iter()
        .map(|l| {
            let m: Vec<String> = l
                .phases
                .iter()
                .filter(|p| p.label.contains("Mosquitto"))
                .map(|p| p.listen_drops.to_string())
                .collect();
            if m.is_empty() {
                format!("{} in flight: no Mosquitto phase", l.in_flight)
            } else {
                format!("{} in flight: {}", l.in_flight, m.join(" and "))
            }
        })
        .collect();
    println!();
    println!(
        "Why the levels differ: {mosquitto} listens with a fixed backlog of 100 (listen(2) in its src/net.c), the activation broker with `[devices] backlog = 8192` (the kernel caps any backlog at net.core.somaxconn = {somaxconn} here). With more connections in flight than Mosquitto's backlog, its accept queue overflows, the kernel drops the SYN and the client retransmits it after 1 s, so above 100 in flight the Mosquitto rows measure those retries as much as Mosquitto's work. Listen drops during Mosquitto's two phases — {}. The headline is the first table, below 100 in flight.",
        drops.join("; ")
    );
}
