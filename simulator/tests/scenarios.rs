//! Every scenario of the simulator against the real activation broker,
//! in process on port 0 with plenty of codes: flood (both engines, both
//! protocols), wrong and stale credentials, storm, publish (rumqttc and
//! the bound-socket client from other loopback addresses), churn, worker
//! processes merging their reports, `setup` as printed, and a stopped run.

use std::time::Duration;

use activation_broker::admin::accounts::{hash_password, AccountConfig, RoleConfig};
use activation_broker::clock::Clock;
use activation_broker::config::Config;
use activation_broker::ledger::{AuthMode, Command, Outcome};
use activation_broker::server::Broker;
use activation_simulator::{parse_args, run, Report};

const PK: &str = "pk1";

struct Fixture {
    broker: Broker,
    secret: String,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn port(&self) -> String {
        self.broker.device_addr().port().to_string()
    }
}

/// A broker on the system clock (the simulator signs with real time), rate
/// limits and bans off, an admin account `ops`, and product `pk1` holding
/// 10,000 codes.
async fn broker() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::on_loopback(dir.path());
    config.gate.source_rate = 0.0;
    config.gate.device_rate = 0.0;
    config.gate.ban_after_failures = 0;
    config.accounts = vec![AccountConfig {
        name: "ops".into(),
        password_hash: hash_password("ops-pw"),
        role: RoleConfig::Named("admin".into()),
        publish: Vec::new(),
        subscribe: Vec::new(),
        deny_publish: Vec::new(),
        deny_subscribe: Vec::new(),
        events: false,
    }];
    let broker = Broker::start(config, Clock::system())
        .await
        .expect("broker");
    let Ok(Outcome::ProductCreated(p)) = broker
        .ledger
        .execute(
            Command::CreateProduct {
                product_key: PK.into(),
                name: PK.into(),
                auth_mode: AuthMode::ProductSecret,
            },
            None,
        )
        .await
    else {
        panic!("product");
    };
    broker
        .ledger
        .execute(
            Command::CreateOrder {
                order_id: None,
                quantity: 10_000,
                validity_secs: 86_400,
                product_key: Some(PK.into()),
            },
            None,
        )
        .await
        .expect("order");
    Fixture {
        broker,
        secret: p.secret,
        _dir: dir,
    }
}

async fn sim(args: &[&str]) -> Report {
    let mut argv = vec!["activation-sim"];
    argv.extend_from_slice(args);
    let cmd = parse_args(argv).expect("args");
    tokio::time::timeout(Duration::from_secs(120), run(cmd))
        .await
        .expect("simulator finishes")
        .expect("run")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_connects_and_counts() {
    let f = broker().await;
    let p = f.port();
    for protocol in [4u8, 5] {
        for engine in ["rumqttc", "socket"] {
            let dir = tempfile::tempdir().expect("tempdir");
            let accepted = dir.path().join("accepted.txt");
            let proto = protocol.to_string();
            let prefix = format!("flood-{protocol}-{engine}-");
            let r = sim(&[
                "flood",
                "--port",
                &p,
                "--protocol",
                &proto,
                "--product-key",
                PK,
                "--product-secret",
                &f.secret,
                "--devices",
                "40",
                "--prefix",
                &prefix,
                "--rate",
                "400",
                "--hold",
                "0.3",
                "--engine",
                engine,
                "--accepted-file",
                accepted.to_str().expect("path"),
                "--quiet",
            ])
            .await;
            assert_eq!(r.attempted, 40, "{protocol} {engine}: {r:?}");
            assert_eq!(r.accepted, 40, "{protocol} {engine}: {r:?}");
            assert_eq!(r.refused_total(), 0);
            assert_eq!((r.errors, r.timeouts), (0, 0), "{r:?}");
            assert_eq!(r.protocol, protocol);
            assert!(r.latency_ms.max > 0.0 && r.latency_ms.p50 <= r.latency_ms.max);
            // 40 connects at 400/s take about 0.1 s.
            assert!(r.duration_s > 0.05, "{r:?}");
            let lines = std::fs::read_to_string(&accepted).expect("accepted file");
            let mut keys: Vec<&str> = lines.lines().collect();
            keys.sort_unstable();
            keys.dedup();
            assert_eq!(keys.len(), 40);
            assert!(keys.iter().all(|k| k.starts_with(&prefix)));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_and_stale_credentials_are_refused() {
    let f = broker().await;
    let p = f.port();
    let r = sim(&[
        "flood",
        "--port",
        &p,
        "--protocol",
        "4",
        "--product-key",
        PK,
        "--product-secret",
        "wrong",
        "--devices",
        "5",
        "--prefix",
        "wrong-",
        "--hold",
        "0",
        "--timeout",
        "5",
        "--quiet",
    ])
    .await;
    assert_eq!((r.attempted, r.accepted), (5, 0), "{r:?}");
    // CONNACK 0x04: bad user name or password.
    assert_eq!(r.refused.get("0x04"), Some(&5), "{r:?}");

    // A timestamp ten minutes old is outside the 300 s window.
    let r = sim(&[
        "flood",
        "--port",
        &p,
        "--protocol",
        "4",
        "--product-key",
        PK,
        "--product-secret",
        &f.secret,
        "--devices",
        "3",
        "--prefix",
        "stale-",
        "--clock-skew",
        "-600",
        "--hold",
        "0",
        "--quiet",
    ])
    .await;
    assert_eq!((r.attempted, r.accepted), (3, 0), "{r:?}");
    assert_eq!(f.broker.ledger.counters().consumed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_reconnects_everyone() {
    let f = broker().await;
    let p = f.port();
    let r = sim(&[
        "storm",
        "--port",
        &p,
        "--protocol",
        "5",
        "--product-key",
        PK,
        "--product-secret",
        &f.secret,
        "--devices",
        "30",
        "--prefix",
        "storm-",
        "--client-id",
        "empty",
        "--settle",
        "0.2",
        "--hold",
        "0.2",
        "--quiet",
    ])
    .await;
    let initial = r.initial_phase.as_ref().expect("initial phase");
    assert_eq!(initial.accepted, 30, "{initial:?}");
    assert_eq!(r.attempted, 30, "{r:?}");
    assert_eq!(r.accepted, 30, "{r:?}");
    assert_eq!(r.errors + r.timeouts, 0);
    assert!(r.table().contains("reconnect phase"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_counts_acked_telemetry() {
    let f = broker().await;
    let p = f.port();
    for protocol in [4u8, 5] {
        let proto = protocol.to_string();
        let prefix = format!("pub-{protocol}-");
        // From other loopback addresses through the bound-socket client.
        let r = sim(&[
            "publish",
            "--port",
            &p,
            "--protocol",
            &proto,
            "--product-key",
            PK,
            "--product-secret",
            &f.secret,
            "--devices",
            "10",
            "--prefix",
            &prefix,
            "--messages",
            "5",
            "--interval",
            "20",
            "--source-ip",
            "127.0.0.2",
            "--source-ip",
            "127.0.0.3",
            "--quiet",
        ])
        .await;
        assert_eq!(r.accepted, 10, "{r:?}");
        let m = r.messages.as_ref().expect("messages");
        assert_eq!(m.sent, 50, "{m:?}");
        assert_eq!(m.acked, 50, "{m:?}");
        assert_eq!(m.failed, 0, "{m:?}");
        assert!(m.sent_per_sec > 0.0);
    }
    // And through rumqttc's client.
    let r = sim(&[
        "publish",
        "--port",
        &p,
        "--product-key",
        PK,
        "--product-secret",
        &f.secret,
        "--devices",
        "5",
        "--prefix",
        "pub-r-",
        "--messages",
        "4",
        "--interval",
        "10",
        "--quiet",
    ])
    .await;
    let m = r.messages.as_ref().expect("messages");
    assert_eq!((m.sent, m.acked), (20, 20), "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_runs_for_its_duration() {
    let f = broker().await;
    let p = f.port();
    let started = std::time::Instant::now();
    let r = sim(&[
        "churn",
        "--port",
        &p,
        "--protocol",
        "4",
        "--product-key",
        PK,
        "--product-secret",
        &f.secret,
        "--devices",
        "10",
        "--prefix",
        "churn-",
        "--client-id",
        "empty",
        "--duration",
        "1.5",
        "--online",
        "0.2",
        "--offline",
        "0.1",
        "--quiet",
    ])
    .await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "{took:?}");
    // Each device reconnects several times in 1.5 s.
    assert!(r.attempted > 20, "{r:?}");
    assert_eq!(r.accepted, r.attempted, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_merge_their_reports() {
    let f = broker().await;
    let p = f.port();
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("report.json");
    let accepted = dir.path().join("accepted.txt");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_activation-sim"))
        .args([
            "flood",
            "--port",
            &p,
            "--protocol",
            "4",
            "--product-key",
            PK,
            "--product-secret",
            &f.secret,
            "--devices",
            "30",
            "--prefix",
            "workers-",
            "--hold",
            "0",
            "--workers",
            "3",
            "--json",
            json.to_str().expect("path"),
            "--accepted-file",
            accepted.to_str().expect("path"),
            "--expect",
            "accepted=30",
            "--expect",
            "errors=0",
        ])
        .output()
        .await
        .expect("run activation-sim");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("expectations: all 2 met"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parse");
    assert_eq!(report["accepted"], 30);
    assert_eq!(report["scenario"], "flood");
    assert!(report.get("latency_histogram_us").is_none());
    let lines = std::fs::read_to_string(&accepted).expect("accepted");
    assert_eq!(lines.lines().count(), 30);

    // A failed expectation makes the exit code 2.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_activation-sim"))
        .args([
            "flood",
            "--port",
            &p,
            "--protocol",
            "4",
            "--product-key",
            PK,
            "--product-secret",
            &f.secret,
            "--devices",
            "3",
            "--prefix",
            "expect-",
            "--hold",
            "0",
            "--expect",
            "refused:0x05=3",
        ])
        .output()
        .await
        .expect("run activation-sim");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("expected refused:0x05=3, got 0"));
}

async fn run_setup(f: &Fixture, product_key: &str) -> std::process::Output {
    let port = f.broker.accounts_addr().port().to_string();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_activation-sim"))
        .args([
            "setup",
            "--port",
            &port,
            "--account",
            "ops",
            "--password",
            "ops-pw",
            "--product-key",
            product_key,
            "--devices",
            "12",
            "--device-port",
            &f.port(),
            "--timeout",
            "5",
        ])
        .output()
        .await
        .expect("run setup")
}

/// `setup` (product-secret) prints a flood command line that works as
/// printed; a ProductKey that exists comes back as the admin's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_prints_a_working_flood_and_the_admin_error() {
    let f = broker().await;
    let out = run_setup(&f, "prodA").await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secret = f.broker.ledger.product("prodA").expect("product").secret;
    assert!(
        stdout.contains(&format!("product secret: {secret}")),
        "{stdout}"
    );
    assert!(stdout.contains("order: "), "{stdout}");
    let run_line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("run: "))
        .expect("flood command line");
    let mut argv: Vec<&str> = run_line.split(' ').collect();
    assert_eq!(argv.remove(0), "activation-sim");
    argv.extend([
        "--protocol",
        "4",
        "--hold",
        "0",
        "--quiet",
        "--expect",
        "accepted=12",
    ]);
    let flood = tokio::process::Command::new(env!("CARGO_BIN_EXE_activation-sim"))
        .args(&argv)
        .output()
        .await
        .expect("run flood");
    assert!(
        flood.status.success(),
        "{}",
        String::from_utf8_lossy(&flood.stdout)
    );

    // The same ProductKey again: the error code and message come through.
    let out = run_setup(&f, "prodA").await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("CreateProduct failed: Conflict"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_ends_a_run_early_with_a_report() {
    let f = broker().await;
    let p = f.port();
    let cmd = parse_args([
        "activation-sim",
        "flood",
        "--port",
        &p,
        "--product-key",
        PK,
        "--product-secret",
        &f.secret,
        "--devices",
        "1000",
        "--rate",
        "100",
        "--hold",
        "60",
        "--prefix",
        "stop-",
        "--quiet",
    ])
    .expect("args");
    let stop = activation_simulator::Stop::new();
    let trigger = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        trigger.stop();
    });
    let started = std::time::Instant::now();
    let r = activation_simulator::run_until(cmd, stop)
        .await
        .expect("run");
    assert!(started.elapsed() < Duration::from_secs(10));
    // About 50 connects in 0.5 s at 100/s, all then disconnected cleanly.
    assert!((20..=100).contains(&r.attempted), "{r:?}");
    assert_eq!(r.accepted, r.attempted, "{r:?}");
}
