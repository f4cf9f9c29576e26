//! The bench binaries run end to end at a tiny scale against the real
//! broker binary (child processes on loopback). Not a performance test:
//! nothing here looks at a rate or a latency, only that every phase
//! completed without a failure and what the benches check themselves (the
//! store holds exactly the acknowledged activations, the backend account
//! received every telemetry message). Mosquitto is left out (CI installs
//! only its clients).

use std::path::PathBuf;
use std::process::Command;

/// The broker binary: `ACTIVATION_BROKER_BIN`, else the one in this
/// build's target directory (`cargo test --workspace` builds it for the
/// broker's own tests).
fn broker_bin() -> PathBuf {
    let bin = std::env::var_os("ACTIVATION_BROKER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_BIN_EXE_connect-bench")).with_file_name("activation-broker")
        });
    assert!(
        bin.is_file(),
        "{} not found: build it first (cargo build -p activation-broker) or set ACTIVATION_BROKER_BIN",
        bin.display()
    );
    bin
}

fn run(bin: &str, args: &[&str]) -> String {
    let out = Command::new(bin)
        .args(args)
        .arg("--broker-bin")
        .arg(broker_bin())
        .output()
        .expect("the bench starts");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{bin} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The "failed" cell (the 4th) of every row of a connect-phase table of
/// `columns` columns whose first cell starts with `label`.
fn failed_cells<'a>(out: &'a str, label: &str, columns: usize) -> Vec<&'a str> {
    out.lines()
        .filter(|l| l.starts_with(&format!("| {label}")))
        .map(|l| l.split('|').map(str::trim).collect::<Vec<_>>())
        .filter(|cells| cells.len() == columns + 2)
        .map(|cells| cells[4])
        .collect()
}

#[test]
fn dataplane_bench_completes_and_the_backend_gets_every_message() {
    let out = run(
        env!("CARGO_BIN_EXE_dataplane-bench"),
        &[
            "--devices",
            "150",
            "--publishers",
            "5",
            "--publish-secs",
            "1",
            "--timeout-secs",
            "20",
            "--rounds",
            "2",
            "--skip-mosquitto",
        ],
    );
    for title in [
        "Benchmark 1",
        "Benchmark 1, every round",
        "Benchmark 2",
        "Benchmark 3",
    ] {
        assert!(out.contains(&format!("#### {title}")), "{title}:\n{out}");
    }
    let failed = failed_cells(&out, "activation broker:", 14);
    assert_eq!(failed.len(), 3, "3 phases in benchmark 1:\n{out}");
    assert!(failed.iter().all(|f| *f == "0"), "{out}");
    assert!(out.contains("holds 150 consumed"), "{out}");
    assert_eq!(out.matches("holds 155 consumed codes").count(), 2, "{out}");
    // Two rounds of a window with no other device and one with the
    // devices held, with the backend subscribed.
    assert_eq!(out.matches(" — every message").count(), 4, "{out}");
}

#[test]
fn connect_bench_runs_each_concurrency_level() {
    let out = run(
        env!("CARGO_BIN_EXE_connect-bench"),
        &[
            "--devices",
            "150",
            "--concurrency",
            "8,32",
            "--timeout-secs",
            "20",
            "--skip-mosquitto",
        ],
    );
    assert!(
        out.contains("#### Connections, 8 in flight (headline)"),
        "{out}"
    );
    assert!(out.contains("#### Connections, 32 in flight\n"), "{out}");
    assert!(out.contains("rate limits and bans off"), "{out}");
    assert!(out.contains("Why the levels differ"), "{out}");
    // (c), rumqttd's stock listener, is measured as it is, resets included.
    assert_eq!(failed_cells(&out, "(c)", 12).len(), 2, "{out}");
    let failed = [failed_cells(&out, "(a)", 12), failed_cells(&out, "(b)", 12)].concat();
    assert_eq!(failed.len(), 4, "(a) and (b) at two levels:\n{out}");
    assert!(failed.iter().all(|f| *f == "0"), "{out}");
    assert_eq!(out.matches("(a) consumed 150 codes").count(), 2, "{out}");
}

/// `router-bench` (the router in process, no broker binary) at 300 and 600
/// devices: a row per size, and the wildcard subscriber received every
/// telemetry message (the bench fails otherwise; the cell says how many).
#[test]
fn router_bench_measures_each_fleet_size() {
    let out = Command::new(env!("CARGO_BIN_EXE_router-bench"))
        .args([
            "--devices",
            "300,600",
            "--publishes",
            "400",
            "--threads",
            "2",
        ])
        .output()
        .expect("router-bench starts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "router-bench failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for devices in ["300", "600"] {
        let row: Vec<&str> = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {devices} |")))
            .unwrap_or_else(|| panic!("no row for {devices} devices:\n{stdout}"))
            .split('|')
            .map(str::trim)
            .collect();
        // | devices | link | subscribe | command | unsubscribed | wildcard (received) | …
        assert!(row[6].ends_with("(400)"), "{devices} devices: {}", row[6]);
    }
    assert!(stdout.contains("page_reporting") || stdout.contains("No free page reporting"));
}
