//! Benchmarks 1 (connect + SUBSCRIBE against Mosquitto) and 3 (RSS per
//! idle device with and without a subscription), from the same phases.

use std::path::Path;

use activation_bench::check_stop;
use activation_bench::load::{Device, Held, Load, Phase};
use activation_bench::report::{
    phase_cells, phase_notes, ratio, rss_table, Rss, Table, PHASE_HEADERS,
};
use activation_bench::targets::{
    mosquitto_name, mosquitto_settings, ActivationBroker, BrokerSpec, Mosquitto, PRODUCT,
};
use anyhow::bail;

use crate::Args;

/// Runs a phase on a settled server, holds its devices until the server's
/// RSS is stable again, then releases them and waits for the server to
/// settle: returns the phase and the RSS growth it caused.
fn measured_phase(
    load: &Load,
    label: &str,
    concurrency: usize,
    pid: u32,
    addr: std::net::SocketAddr,
    devices: Vec<Device>,
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
pub fn benches(
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
        io_threads: args.common.io_threads,
        account: None,
        router: None,
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
    } else if !args.common.mosquitto_bin.is_file() {
        eprintln!(
            "Mosquitto skipped: {} is not installed (apt-get install mosquitto)",
            args.common.mosquitto_bin.display()
        );
    } else {
        let name = mosquitto_name(&args.common.mosquitto_bin);
        let dir = tmp.join("mosquitto");
        let passwd = Mosquitto::write_passwd(&args.common.mosquitto_bin, &dir, "dev-", 0..n)?;
        for (auth, passwd) in [
            ("password file", Some(passwd.as_path())),
            ("anonymous", None),
        ] {
            for (what, subscribe) in [("connect only", false), ("connect + SUBSCRIBE", true)] {
                let mut m = Mosquitto::start(&args.common.mosquitto_bin, &dir, passwd)?;
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
    headers.extend([
        "SUBSCRIBE → SUBACK p50 ms",
        "SUBSCRIBE → SUBACK p99 ms",
        "vs Mosquitto password file",
        "vs Mosquitto anonymous",
    ]);
    let mut t = Table::new(
        &format!("Benchmark 1: connect + SUBSCRIBE of {n} devices, {c} in flight"),
        &headers,
    );
    t.setting(format!("{n} devices, {c} in flight; {client}"));
    t.setting(format!("each device: socket → CONNECT → CONNACK, and in the SUBSCRIBE rows → SUBSCRIBE `devices/{PRODUCT}/{{DK}}/command` QoS 1 → SUBACK; latency: socket open → CONNACK or SUBACK, and SUBSCRIBE written → SUBACK read; the devices stay connected (idle) until the phase's RSS is read, then DISCONNECT"));
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
        for q in [0.5, 0.99] {
            cells.push(
                p.sub_ms(q)
                    .map_or_else(String::new, |ms| format!("{ms:.2}")),
            );
        }
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
    let mut r = rss_table(
        &format!("Benchmark 3: RSS per idle device, {n} devices"),
        "server and phase",
        &rss,
    );
    r.setting(format!("the phases of benchmark 1; {client}"));
    r.setting("KB per device = (server VmRSS with the phase's devices connected, subscribed if the phase subscribes, and idle − VmRSS of the freshly started server right before the phase) / devices; each reading once stable (three readings 1 s apart within 0.5 %)");
    r.setting("activation broker: the first row's growth includes the devices' ledger records; the reconnect rows start from a broker restarted with the devices already activated (their records loaded)");
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
