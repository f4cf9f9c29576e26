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
use std::time::{Duration, Instant};

use common::child::{broker_bin, open_offline, prepare_store, write_config, ChildBroker};
use common::flood::{accepted, sim_bin, wait_first_ack, Flood, FloodSpec};
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
        let flood = Flood::start(
            &FloodSpec {
                addr: broker.addr,
                pk: PK,
                secret: &secret,
                prefix: "c-",
                start,
                devices: per_cycle,
                rate,
                protocol,
                accepted_file: &file,
            },
            sim.as_deref(),
        );
        // Wait (bounded) for the first acknowledgement, then kill at a
        // random moment of the flood.
        assert!(
            wait_first_ack(&file),
            "cycle {cycle}: no device was admitted\n{}",
            broker.log_tail()
        );
        let delay = rng.gen_range(0..1_500u64);
        std::thread::sleep(Duration::from_millis(delay));
        kill_ms.push(delay);
        broker.kill9();
        flood.finish();
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
