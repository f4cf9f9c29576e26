//! Benchmark harness shared by `connect-bench` and `dataplane-bench`: the
//! servers under test as child processes (`child.rs`, `targets.rs`), what
//! `/proc` says about them (`procfs.rs`), the MQTT load client (`load.rs`
//! connections and subscriptions, `telemetry.rs` QoS 1 publishers and a
//! backend subscriber), the markdown report (`report.rs`) and the shared
//! command-line settings (`cli.rs`).
//!
//! A crate of its own (`activation-bench`), beside the broker: the broker
//! does not depend on it. `ledger-bench` and `router-bench` measure the
//! broker's ledger and router in process.

pub mod child;
pub mod cli;
pub mod load;
pub mod procfs;
pub mod report;
pub mod targets;
pub mod telemetry;

use std::sync::atomic::{AtomicBool, Ordering};

/// Set by Ctrl-C ([`stop_on_ctrl_c`]): phases stop, and every child and
/// temp dir is cleaned up.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// Whether Ctrl-C was pressed.
pub fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// An error once Ctrl-C was pressed.
pub fn check_stop() -> anyhow::Result<()> {
    if stopped() {
        anyhow::bail!("interrupted");
    }
    Ok(())
}

/// Sets [`STOP`] on Ctrl-C (spawned on `rt`).
pub fn stop_on_ctrl_c(rt: &tokio::runtime::Runtime) {
    rt.spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            STOP.store(true, Ordering::SeqCst);
            eprintln!("interrupted: cleaning up");
        }
    });
}
