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

use crate::common;

use std::collections::HashSet;
use std::time::Instant;

use common::child::{broker_bin, prepare_store, write_config, ChildBroker};
use common::flood::{accepted, check_store, env_u64, flood_name, print_setup, sim_bin, Cycles};

const PK: &str = "crash";
const CODES: u64 = 1_000_000;
/// One year: no code expires during the run, so one code per device.
const VALIDITY: u64 = 365 * 24 * 3600;

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
    print_setup(&bin, sim.as_deref());
    let mut rng = rand::thread_rng();
    let mut acked: HashSet<String> = HashSet::new();
    let mut kill_ms = Vec::new();
    let started = Instant::now();
    let mut next = 1u64;
    let mut last_consumed = 0u64;
    let cycles_spec = Cycles {
        dir: dir.path(),
        pk: PK,
        secret: &secret,
        prefix: "c-",
        per_cycle,
        rate,
        sim: sim.as_deref(),
    };
    for cycle in 0..cycles {
        let broker = ChildBroker::start(&bin, &config, &data, None);
        // Kill at a random moment of the flood.
        let cf = cycles_spec.flood(&broker, cycle, &mut next, &mut rng);
        let delay = cf.delay_ms;
        kill_ms.push(delay);
        broker.kill9();
        cf.flood.finish();
        let this_cycle = accepted(&cf.file);
        acked.extend(this_cycle.iter().cloned());
        // Offline: invariants, and every acknowledged device holds its code.
        let what = format!("cycle {cycle}");
        let consumed = check_store(&data, PK, CODES, &acked, &what);
        assert!(
            consumed >= last_consumed,
            "{what}: consumption went back from {last_consumed} to {consumed}"
        );
        last_consumed = consumed;
        eprintln!(
            "cycle {cycle}: killed {delay} ms after the first CONNACK; {} acknowledged this cycle, {} in all, {} consumed",
            this_cycle.len(),
            acked.len(),
            consumed
        );
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
        "flood": flood_name(sim.as_deref()),
        "broker": bin.display().to_string(),
        "failures": 0,
    });
    eprintln!("{report}");
    if let Ok(out) = std::env::var("CRASH_REPORT") {
        let _ = std::fs::write(out, report.to_string());
    }
    assert!(!acked.is_empty());
}
