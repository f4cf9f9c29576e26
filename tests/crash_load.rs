//! Crash under load: the broker binary serves a flood of devices from the
//! simulator (`activation-sim flood --accepted-file`, which records every
//! DeviceKey that got CONNACK 0), is killed with SIGKILL at a random
//! moment, and its store is opened offline: the SPEC invariants hold,
//! every acknowledged device holds its consumed code, and no device has
//! two codes for one validity period (`Ledger::check_invariants`). Then it
//! is restarted for the next cycle.
//!
//! `CRASH_CYCLES` (default 5: the CI variant) sets the cycles;
//! tests/crash/run.sh runs 50 against the release binary.
//! `ACTIVATION_BROKER_BIN` / `ACTIVATION_SIM_BIN` pick the binaries (by
//! default the ones built beside this test); without a simulator binary a
//! small rumqttc flood in this process stands in.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use activation_broker::clock::Clock;
use activation_broker::credentials::device_credentials;
use common::child::{broker_bin, open_offline, prepare_store, write_config, ChildBroker};
use rand::Rng;

const PK: &str = "crash";
const CODES: u64 = 1_000_000;
/// One year: no code expires during the run, so one code per device.
const VALIDITY: u64 = 365 * 24 * 3600;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `activation-sim` beside the broker binary (same target directory), if built.
fn sim_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ACTIVATION_SIM_BIN") {
        return Some(PathBuf::from(p));
    }
    let dir = broker_bin().parent()?.to_owned();
    let p = dir.join("activation-sim");
    p.exists().then_some(p)
}

/// Complete lines of the accepted file (a line cut by the end of the
/// writer is not an acknowledgement).
fn accepted(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete.lines().map(str::to_owned).collect()
}

enum Flood {
    Sim(Child),
    InProcess(std::thread::JoinHandle<()>),
}

/// The fallback flood: devices `prefix{start..start+n}` connect (rumqttc
/// v4, 64 at a time) and each CONNACK 0 is appended to `file`.
fn in_process_flood(
    addr: std::net::SocketAddr,
    secret: String,
    start: u64,
    n: u64,
    file: PathBuf,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            use std::io::Write;
            let log = std::sync::Arc::new(std::sync::Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&file)
                    .expect("accepted file"),
            ));
            let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
            let mut tasks = Vec::new();
            for i in start..start + n {
                let permit = sem.clone().acquire_owned().await.expect("sem");
                let secret = secret.clone();
                let log = log.clone();
                tasks.push(tokio::spawn(async move {
                    let _permit = permit;
                    let dk = format!("c-{i}");
                    let (u, p) = device_credentials(PK, &dk, &secret, Clock::system().now());
                    let mut o = rumqttc::MqttOptions::new(
                        format!("{PK}.{dk}"),
                        addr.ip().to_string(),
                        addr.port(),
                    );
                    o.set_credentials(u, p);
                    let (_c, mut el) = rumqttc::AsyncClient::new(o, 4);
                    if let Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a)))) =
                        tokio::time::timeout(Duration::from_secs(5), el.poll()).await
                    {
                        if a.code == rumqttc::ConnectReturnCode::Success {
                            let _ = log
                                .lock()
                                .map(|mut f| f.write_all(format!("{dk}\n").as_bytes()));
                        }
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        });
    })
}

#[test]
fn crash_under_load_keeps_every_acknowledged_activation() {
    let cycles = env_u64("CRASH_CYCLES", 5);
    let per_cycle = env_u64("CRASH_DEVICES", 3_000);
    let rate = env_u64("CRASH_RATE", 1_500);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let secret = prepare_store(&data, PK, CODES, VALIDITY);
    let config = write_config(dir.path(), 10);
    let bin = broker_bin();
    let sim = sim_bin();
    eprintln!(
        "broker {}, flood by {}",
        bin.display(),
        sim.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the in-process rumqttc loop".into())
    );
    let mut rng = rand::thread_rng();
    let mut acked: HashSet<String> = HashSet::new();
    let mut kill_ms = Vec::new();
    let started = Instant::now();
    let mut next = 1u64;
    let mut last_consumed = 0u64;
    for cycle in 0..cycles {
        let broker = ChildBroker::start(&bin, &config, &data, None);
        let file = dir.path().join(format!("accepted-{cycle}.txt"));
        // Half the range was used before (reconnects: must consume
        // nothing), half is new.
        let start = next.saturating_sub(per_cycle / 2).max(1);
        next = start + per_cycle;
        let protocol = if cycle % 2 == 0 { "5" } else { "4" };
        let mut flood = match &sim {
            Some(sim) => Flood::Sim(
                Process::new(sim)
                    .args(["flood", "--host", "127.0.0.1", "--port"])
                    .arg(broker.addr.port().to_string())
                    .args([
                        "--protocol",
                        protocol,
                        "--product-key",
                        PK,
                        "--product-secret",
                    ])
                    .arg(&secret)
                    .args(["--prefix", "c-", "--start"])
                    .arg(start.to_string())
                    .arg("--devices")
                    .arg(per_cycle.to_string())
                    .arg("--rate")
                    .arg(rate.to_string())
                    .args([
                        "--concurrency",
                        "200",
                        "--hold",
                        "0",
                        "--timeout",
                        "5",
                        "--quiet",
                    ])
                    .arg("--accepted-file")
                    .arg(&file)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn activation-sim"),
            ),
            None => Flood::InProcess(in_process_flood(
                broker.addr,
                secret.clone(),
                start,
                per_cycle,
                file.clone(),
            )),
        };
        // Wait (bounded) for the first acknowledgement, then kill at a
        // random moment of the flood.
        let deadline = Instant::now() + Duration::from_secs(30);
        while accepted(&file).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            !accepted(&file).is_empty(),
            "cycle {cycle}: no device was admitted\n{}",
            broker.log_tail()
        );
        let delay = rng.gen_range(0..1_500u64);
        std::thread::sleep(Duration::from_millis(delay));
        kill_ms.push(delay);
        broker.kill9();
        // The flood ends on its own once the broker is gone.
        match &mut flood {
            Flood::Sim(child) => {
                let deadline = Instant::now() + Duration::from_secs(30);
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
            Flood::InProcess(_) => {}
        }
        if let Flood::InProcess(h) = flood {
            let _ = h.join();
        }
        let this_cycle = accepted(&file);
        acked.extend(this_cycle.iter().cloned());
        // Offline: invariants, and every acknowledged device holds its code.
        let ledger = open_offline(&data);
        ledger
            .check_invariants()
            .unwrap_or_else(|e| panic!("cycle {cycle}: {e}"));
        let c = ledger.counters();
        for dk in &acked {
            let d = ledger
                .device(PK, dk)
                .unwrap_or_else(|e| panic!("cycle {cycle}: acknowledged {dk} lost: {e}"));
            assert_eq!(
                d.codes.len(),
                1,
                "cycle {cycle}: {dk} holds exactly one code"
            );
        }
        assert!(c.consumed >= acked.len() as u64, "cycle {cycle}");
        assert!(
            c.consumed >= last_consumed,
            "cycle {cycle}: consumption went back"
        );
        assert_eq!(c.total, CODES);
        assert_eq!(c.total, c.consumed + c.available + c.forfeited);
        last_consumed = c.consumed;
        eprintln!(
            "cycle {cycle}: killed {delay} ms after the first CONNACK; {} acknowledged this cycle, {} in all, {} consumed",
            this_cycle.len(),
            acked.len(),
            c.consumed
        );
        drop(ledger);
    }
    let secs = started.elapsed().as_secs_f64();
    let report = serde_json::json!({
        "cycles": cycles,
        "devices_per_cycle": per_cycle,
        "rate": rate,
        "acknowledged": acked.len(),
        "consumed": last_consumed,
        "kill_ms_min": kill_ms.iter().min(),
        "kill_ms_max": kill_ms.iter().max(),
        "seconds": (secs * 10.0).round() / 10.0,
        "flood": if sim.is_some() { "activation-sim" } else { "in-process rumqttc" },
        "broker": bin.display().to_string(),
        "failures": 0,
    });
    eprintln!("{report}");
    if let Ok(out) = std::env::var("CRASH_REPORT") {
        let _ = std::fs::write(out, report.to_string());
    }
    assert!(!acked.is_empty());
}
