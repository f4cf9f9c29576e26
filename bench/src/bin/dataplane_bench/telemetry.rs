//! Benchmark 2: telemetry QoS 1 from the publishers with no other device,
//! then with the idle subscribed devices held; with a backend account
//! subscribed to every telemetry topic, and without.

use std::path::Path;
use std::time::Duration;

use activation_bench::check_stop;
use activation_bench::load::{source_ip, telemetry_topic, Load, Phase};
use activation_bench::report::{median, ratio, Table};
use activation_bench::targets::{Account, ActivationBroker, BrokerSpec, PRODUCT};
use activation_bench::telemetry::{self, Backend, Publisher, Settings, Telemetry};
use anyhow::bail;

use crate::Args;

const BACKEND: &str = "backend";
const BACKEND_FILTER: &str = "devices/+/+/telemetry";

/// One broker's telemetry measurements: rounds of a window with no other
/// device, then one with the idle subscribed devices held (connected
/// before it, released after it).
struct TelemetryRun {
    /// Which binary: "this build" or the baseline.
    broker: String,
    backend: bool,
    publishers: Phase,
    /// Each round's connection of the held devices (first activations,
    /// then reconnects).
    devices: Vec<Phase>,
    none: Vec<Telemetry>,
    with: Vec<Telemetry>,
    consumed: u64,
    spec: BrokerSpec,
}

impl TelemetryRun {
    fn tag(&self) -> String {
        if self.backend {
            format!("{}, backend subscribed", self.broker)
        } else {
            format!("{}, no backend", self.broker)
        }
    }

    /// Each round's msgs/s acked with the devices held over that with
    /// none (measured back to back on one broker).
    fn held_over_none(&self) -> Vec<f64> {
        self.with
            .iter()
            .zip(&self.none)
            .map(|(w, n)| w.rate() / n.rate().max(1e-9))
            .collect()
    }
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
    broker_label: &str,
) -> anyhow::Result<TelemetryRun> {
    let (n, np, c) = (args.devices, args.publishers, args.concurrency);
    let password = format!("bench-{}", std::process::id());
    let spec = BrokerSpec {
        codes: (n + np) as u64,
        io_threads: args.common.io_threads,
        account: with_backend.then(|| Account {
            name: BACKEND.into(),
            password: password.clone(),
            subscribe: vec![BACKEND_FILTER.into()],
        }),
        // The baseline may not know the setting
        router: args
            .router_inflight
            .filter(|_| broker_label == "this build")
            .map(|n| format!("max_inflight_per_session = {n}")),
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
        format!("{broker_label}, backend")
    } else {
        format!("{broker_label}, no backend")
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
    let (_, fds_idle) = load.settle(pid)?;
    let (mut none, mut with, mut devices) = (Vec::new(), Vec::new(), Vec::new());
    let mut publishers = publishers;
    let rounds = args.rounds.max(1);
    for round in 1..=rounds {
        // Each window's messages carry their own run number.
        let run = u16::try_from(2 * round).unwrap_or(u16::MAX);
        let (m, p) = telemetry::measure(
            load.rt,
            &format!("{tag}, round {round}, no other device"),
            run - 1,
            pid,
            publishers,
            backend.as_ref(),
            settings,
        )?;
        none.push(m);
        check_stop()?;
        let how = if round == 1 {
            "first activations"
        } else {
            "reconnects"
        };
        let (phase, held) = load.phase(
            &format!("{tag}, round {round}: idle devices, {how} + SUBSCRIBE"),
            c,
            pid,
            addr,
            broker.devices("dev-", 0..n, true)?,
        )?;
        load.settle(pid)?;
        let (m, p) = telemetry::measure(
            load.rt,
            &format!(
                "{tag}, round {round}, {} idle subscribed devices held",
                held.len()
            ),
            run,
            pid,
            p,
            backend.as_ref(),
            settings,
        )?;
        publishers = p;
        with.push(m);
        devices.push(phase);
        check_stop()?;
        if round < rounds {
            load.release(held, pid, fds_idle);
            load.settle(pid)?;
        }
    }
    drop(backend);
    drop(publishers);
    let (consumed, _) = broker.stop_and_check()?;
    Ok(TelemetryRun {
        broker: broker_label.to_owned(),
        backend: with_backend,
        publishers: pub_phase,
        devices,
        none,
        with,
        consumed,
        spec,
    })
}

/// Benchmark 2: with the backend account subscribed (every message must
/// reach it), and without (no subscriber matches the telemetry topics).
pub fn bench(args: &Args, load: &Load, bin: &Path, tmp: &Path, client: &str) -> anyhow::Result<()> {
    let (n, np, c) = (args.devices, args.publishers, args.concurrency);
    let settings = Settings {
        inflight: args.inflight,
        payload: args.payload,
        window: Duration::from_secs(args.publish_secs.max(1)),
        drain: Duration::from_secs(args.timeout_secs),
    };
    let mut passes = vec![(bin, "this build", true), (bin, "this build", false)];
    if let Some(baseline) = &args.baseline_bin {
        passes.push((baseline.as_path(), "baseline", true));
    }
    let mut runs = Vec::new();
    for (k, (bin, label, with_backend)) in passes.into_iter().enumerate() {
        check_stop()?;
        let dir = tmp.join(format!("broker-telemetry-{k}"));
        runs.push(telemetry_run(
            args,
            load,
            bin,
            &dir,
            with_backend,
            settings,
            label,
        )?);
    }

    let mut t = Table::new(
        &format!("Benchmark 2: telemetry QoS 1 from {np} publishers, with and without {n} idle subscribed devices"),
        &[
            "broker",
            "backend subscribed",
            "round",
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
            "backend msgs/s",
            "backend duplicates",
            "server CPU µs/msg",
            "vs no other device (this round)",
        ],
    );
    t.setting(format!("{np} publisher devices, each keeping {} QoS 1 PUBLISHes of {} bytes unacknowledged on `devices/{PRODUCT}/pub-{{i}}/telemetry` for {} s; msgs/s acked = PUBACKs received within the window / the window; latency: PUBLISH written → PUBACK read; {client}", settings.inflight, settings.payload, settings.window.as_secs()));
    t.setting(format!("backend subscribed: a backend account (`{BACKEND}`, accounts listener) subscribed to `{BACKEND_FILTER}` at QoS 1 acknowledges and counts every message by its payload's run, publisher and sequence number; after the window the bench waits for the last PUBACKs and until the backend has every message sent (or nothing arrives for {} s). Without: the same on a broker with no account and no subscriber matching the telemetry topics", settings.drain.as_secs()));
    t.setting(format!("held devices: connected (first activations, {c} in flight) and subscribed to `devices/{PRODUCT}/{{DK}}/command` with the publishers connected, then idle"));
    t.setting(format!("each broker and backend setting runs on its own freshly started broker, in {} rounds: a window with no other device, then the held devices connect (first activations in round 1, reconnects after) and a window with them held; they disconnect before the next round's first window. The verdict is the median of the rounds' ratios (each round's two windows back to back on one broker)", args.rounds.max(1)));
    t.setting("backend msgs/s = messages the backend received / the time from the window's start until it had every message sent (or gave up)");
    t.setting(format!("broker: \"this build\" is {}", bin.display()));
    if let Some(b) = &args.baseline_bin {
        t.setting(format!(
            "broker: \"baseline\" is {} (the same settings; measured in the same run, after this build)",
            b.display()
        ));
    }
    if let Some(r) = runs.first() {
        t.setting(r.spec.describe());
    }
    for r in &runs {
        let rounds = r.none.iter().zip(&r.with).zip(&r.devices);
        for (round, ((none, with), devices)) in rounds.enumerate() {
            for (m, held) in [(none, 0), (with, devices.accepted)] {
                t.row(vec![
                    r.broker.clone(),
                    if r.backend { "yes" } else { "no" }.into(),
                    (round + 1).to_string(),
                    held.to_string(),
                    m.publishers.to_string(),
                    m.settings.inflight.to_string(),
                    format!("{:.2}", m.settings.window.as_secs_f64()),
                    format!("{:.0}", m.rate()),
                    format!("{:.2}", m.ms(0.5)),
                    format!("{:.2}", m.ms(0.99)),
                    m.sent.to_string(),
                    m.acked.to_string(),
                    backend_cell(r.backend, || m.received.to_string()),
                    backend_cell(r.backend, || {
                        format!(
                            "{:.0}",
                            m.received as f64 / m.elapsed.as_secs_f64().max(1e-9)
                        )
                    }),
                    backend_cell(r.backend, || m.duplicates.to_string()),
                    format!("{:.1}", m.server_us()),
                    ratio(Some(m.rate()), Some(none.rate())),
                ]);
            }
        }
    }
    let this = |backend: bool| {
        runs.iter()
            .find(|r| r.broker == "this build" && r.backend == backend)
    };
    let med = |ts: &[Telemetry]| median(ts.iter().map(Telemetry::rate)).unwrap_or(0.0);
    if let (Some(yes), Some(no)) = (this(true), this(false)) {
        for (what, m_yes, m_no) in [
            ("no other device", &yes.none, &no.none),
            ("the devices held", &yes.with, &no.with),
        ] {
            t.note(format!(
                "this build, {what}: median msgs/s acked with the backend / without: {:.0} / {:.0} = {:.2}",
                med(m_yes),
                med(m_no),
                med(m_yes) / med(m_no).max(1e-9),
            ));
        }
    }
    for r in &runs {
        let tag = r.tag();
        let rates = |ts: &[Telemetry]| {
            ts.iter()
                .map(|m| format!("{:.0}", m.rate()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let ratios = r.held_over_none();
        let x = median(ratios.iter().copied()).unwrap_or(0.0);
        let held = r.devices.first().map_or(0, |p| p.accepted);
        t.note(format!(
            "{tag}: with {held} idle subscribed devices held / with none ≥ 0.9: median of the {} rounds' ratios {x:.2}, {} (ratios: {}; msgs/s held: {}; none: {})",
            ratios.len(),
            if x >= 0.9 { "met" } else { "MISSED" },
            ratios
                .iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
            rates(&r.with),
            rates(&r.none),
        ));
        for (round, p) in r.devices.iter().enumerate() {
            t.note(format!(
                "{tag}, round {}: the {} held devices connected and subscribed in {:.2} s ({:.0}/s, p99 {:.2} ms).",
                round + 1,
                p.accepted,
                p.elapsed.as_secs_f64(),
                p.rate(),
                p.ms(0.99)
            ));
        }
        for m in r.none.iter().chain(&r.with) {
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
        for p in std::iter::once(&r.publishers).chain(&r.devices) {
            if let Some(n) = p.failure_note() {
                t.note(n);
            }
        }
        t.note(format!(
            "{tag}: the store reopened after the broker stopped holds {} consumed codes ({} publishers + {held} devices activated).",
            r.consumed, r.publishers.accepted
        ));
    }
    t.print();
    Ok(())
}

/// A cell of a backend column: `no backend` in the rows without one.
fn backend_cell(backend: bool, cell: impl FnOnce() -> String) -> String {
    if backend {
        cell()
    } else {
        "no backend".into()
    }
}
