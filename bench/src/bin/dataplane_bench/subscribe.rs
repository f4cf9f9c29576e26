//! Benchmarks 1 (connect + SUBSCRIBE against Mosquitto) and 3 (RSS per
//! idle device with and without a subscription), from the same phases.

use std::path::Path;

use activation_bench::check_stop;
use activation_bench::load::{Device, Held, Load, Phase};
use activation_bench::report::{
    median, phase_cells, phase_notes, ratio, rss_table, Rss, Table, PHASE_HEADERS,
};
use activation_bench::targets::{
    mosquitto_name, mosquitto_settings, ActivationBroker, BrokerSpec, Mosquitto, PRODUCT,
};
use anyhow::bail;

use crate::Args;

/// The activation broker's row compared with Mosquitto.
const SUBSCRIBE_ROW: &str = "activation broker: reconnects + SUBSCRIBE";

/// Mosquitto's two configurations.
const MOSQUITTO_AUTH: [&str; 2] = ["password file", "anonymous"];

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
        (SUBSCRIBE_ROW, true),
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
    broker.stop()?;
    let mosquitto = if args.skip_mosquitto {
        None
    } else if !args.common.mosquitto_bin.is_file() {
        eprintln!(
            "Mosquitto skipped: {} is not installed (apt-get install mosquitto)",
            args.common.mosquitto_bin.display()
        );
        None
    } else {
        let name = mosquitto_name(&args.common.mosquitto_bin);
        let dir = tmp.join("mosquitto");
        let passwd = Mosquitto::write_passwd(&args.common.mosquitto_bin, &dir, "dev-", 0..n)?;
        Some((name, dir, passwd))
    };
    let mosquitto_phase = |auth: &str, subscribe: bool| -> anyhow::Result<(Phase, Rss)> {
        let Some((name, dir, passwd)) = &mosquitto else {
            bail!("no Mosquitto");
        };
        let passwd = (auth == "password file").then_some(passwd.as_path());
        let what = if subscribe {
            "connect + SUBSCRIBE"
        } else {
            "connect only"
        };
        let mut m = Mosquitto::start(&args.common.mosquitto_bin, dir, passwd)?;
        let label = format!("{name}, {auth}: {what}");
        let devices = m.devices("dev-", 0..n, subscribe)?;
        let r = measured_phase(load, &label, c, m.pid(), m.addr, devices)?;
        m.child.check_alive()?;
        check_stop()?;
        Ok(r)
    };
    if mosquitto.is_some() {
        for auth in MOSQUITTO_AUTH {
            for subscribe in [false, true] {
                let (p, r) = mosquitto_phase(auth, subscribe)?;
                phases.push(p);
                rss.push(r);
            }
        }
    }
    // The compared rows again, interleaved: each verdict is the median of
    // the rounds' ratios.
    let mut rounds: Vec<Vec<&Phase>> = Vec::new();
    let mut again = Vec::new();
    for _ in 2..=args.rounds.max(1) {
        broker.restart()?;
        let devices = broker.devices("dev-", 0..n, true)?;
        let (p, _) = measured_phase(load, SUBSCRIBE_ROW, c, broker.pid(), broker.addr, devices)?;
        broker.stop()?;
        check_stop()?;
        again.push(p);
        if mosquitto.is_some() {
            for auth in MOSQUITTO_AUTH {
                again.push(mosquitto_phase(auth, true)?.0);
            }
        }
    }
    let (consumed, _) = broker.stop_and_check()?;
    if consumed != first {
        bail!(
            "the store has {consumed} consumed codes but {first} first activations got CONNACK 0"
        );
    }
    let mosquitto = mosquitto.map(|(name, _, _)| name);
    let compared =
        |p: &&Phase| p.label == SUBSCRIBE_ROW || p.label.ends_with(": connect + SUBSCRIBE");
    rounds.push(phases.iter().filter(compared).collect());
    let per_round = rounds[0].len().max(1);
    rounds.extend(again.chunks(per_round).map(|r| r.iter().collect()));

    // Benchmark 1.
    let mut headers = PHASE_HEADERS.to_vec();
    headers.extend([
        "SUBSCRIBE → SUBACK p50 ms",
        "SUBSCRIBE → SUBACK p99 ms",
        "vs Mosquitto password file (this round)",
        "vs Mosquitto anonymous (this round)",
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
    let sub = phases.iter().find(|p| p.label == SUBSCRIBE_ROW);
    let conn = phases
        .iter()
        .find(|p| p.label == "activation broker: reconnects, connect only");
    if let (Some(sub), Some(conn)) = (sub, conn) {
        t.note(format!(
            "activation broker, reconnects: connect + SUBSCRIBE at {:.2}x the rate of connect alone.",
            sub.rate() / conn.rate().max(1e-9)
        ));
    }
    t.note(format!(
        "the first activations consumed {first} codes; the store reopened after the broker stopped holds {consumed} consumed."
    ));
    let refs: Vec<&Phase> = phases.iter().collect();
    phase_notes(&mut t, &refs);
    t.print();
    rounds_table(&rounds, n, c).print();

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

/// Benchmark 1's compared rows in every round, their medians and the
/// verdicts on them.
fn rounds_table(rounds: &[Vec<&Phase>], n: usize, c: usize) -> Table {
    let targets: Vec<&str> = rounds
        .first()
        .map(|r| r.iter().map(|p| p.label.as_str()).collect())
        .unwrap_or_default();
    let mut headers = vec!["target".to_owned()];
    headers.extend((1..=rounds.len()).map(|k| format!("round {k} per second")));
    headers.extend(
        [
            "median per second",
            "server CPU µs each, median",
            "vs Mosquitto password file, median of the rounds' ratios",
            "vs Mosquitto anonymous, median of the rounds' ratios",
        ]
        .map(String::from),
    );
    let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
    let mut t = Table::new(
        &format!("Benchmark 1, every round: connect + SUBSCRIBE of {n} devices, {c} in flight"),
        &headers,
    );
    t.setting(format!("the rows of benchmark 1 compared with Mosquitto, measured in {} rounds; each round runs them in this order, each on a freshly started server (round 1 is the table above)", rounds.len()));
    let of = |j: usize| rounds.iter().filter_map(move |r| r.get(j).copied());
    let column = |label: &str| targets.iter().position(|t| t.ends_with(label));
    // Each round's rate of ours over Mosquitto's `auth`.
    let ratios = |auth: &str| -> Vec<f64> {
        let (Some(i), Some(j)) = (
            column(SUBSCRIBE_ROW),
            column(&format!("{auth}: connect + SUBSCRIBE")),
        ) else {
            return Vec::new();
        };
        of(i)
            .zip(of(j))
            .map(|(a, b)| a.rate() / b.rate().max(1e-9))
            .collect()
    };
    for (j, label) in targets.iter().enumerate() {
        let mut cells = vec![(*label).to_owned()];
        cells.extend(of(j).map(|p| format!("{:.0}", p.rate())));
        cells.push(median(of(j).map(Phase::rate)).map_or_else(String::new, |r| format!("{r:.0}")));
        cells.push(
            median(of(j).map(Phase::server_us)).map_or_else(String::new, |u| format!("{u:.0}")),
        );
        for auth in MOSQUITTO_AUTH {
            cells.push(if *label == SUBSCRIBE_ROW {
                median(ratios(auth)).map_or_else(String::new, |x| format!("{x:.2}x"))
            } else {
                String::new()
            });
        }
        t.row(cells);
    }
    for auth in MOSQUITTO_AUTH {
        let r = ratios(auth);
        if let Some(x) = median(r.iter().copied()) {
            t.note(format!(
                "connect + SUBSCRIBE ≥ 1.0x Mosquitto {auth}: median of the {} rounds' ratios {x:.2}x, {} (ratios: {})",
                r.len(),
                if x >= 1.0 { "met" } else { "MISSED" },
                r.iter()
                    .map(|x| format!("{x:.2}x"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    let later: Vec<&Phase> = rounds.iter().skip(1).flatten().copied().collect();
    phase_notes(&mut t, &later);
    t
}
