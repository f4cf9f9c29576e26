//! The simulator against the real activation broker, in-process on port 0
//! (gate, ledger and connection layer included).

use std::time::Duration;

use activation_broker::clock::Clock;
use activation_broker::config::Config;
use activation_broker::ledger::{AuthMode, Command, Outcome};
use activation_broker::server::Broker;
use activation_simulator::{parse_args, run, write_json, Report};

struct Fixture {
    broker: Broker,
    _dir: tempfile::TempDir,
}

/// A broker on the system clock (the simulator signs with real time) with
/// product `pk` holding `codes` codes.
async fn broker_with(pk: &str, codes: u64) -> (Fixture, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::on_loopback(dir.path());
    let broker = Broker::start(config, Clock::system())
        .await
        .expect("broker");
    let secret = add_product(&broker, pk, codes).await;
    (Fixture { broker, _dir: dir }, secret)
}

async fn add_product(broker: &Broker, pk: &str, codes: u64) -> String {
    let Ok(Outcome::ProductCreated(p)) = broker
        .ledger
        .execute(
            Command::CreateProduct {
                product_key: pk.into(),
                name: pk.into(),
                auth_mode: AuthMode::ProductSecret,
            },
            None,
        )
        .await
    else {
        panic!("product")
    };
    broker
        .ledger
        .execute(
            Command::CreateOrder {
                order_id: None,
                quantity: codes,
                validity_secs: 3600,
                product_key: Some(pk.into()),
            },
            None,
        )
        .await
        .expect("order");
    p.secret
}

/// Runs a scenario as the binary does (including writing `--json`).
async fn sim(args: &[&str]) -> Report {
    let mut v = vec!["activation-sim"];
    v.extend_from_slice(args);
    let cmd = parse_args(v).expect("valid arguments");
    let report = tokio::time::timeout(Duration::from_secs(120), run(cmd.clone()))
        .await
        .expect("simulator finishes")
        .expect("simulator runs");
    write_json(&report, &cmd).expect("JSON report written");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_of_2000_at_1500_codes_accepts_1500_and_refuses_500_with_the_quota_code() {
    let (f, secret) = broker_with("flood5", 1500).await;
    let port = f.broker.device_addr().port().to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("flood.json");
    let r = sim(&[
        "flood",
        "--port",
        &port,
        "--protocol",
        "5",
        "--product-key",
        "flood5",
        "--product-secret",
        &secret,
        "--devices",
        "2000",
        "--rate",
        "4000",
        "--concurrency",
        "256",
        "--hold",
        "0",
        "--quiet",
        "--json",
        json.to_str().expect("utf-8 path"),
    ])
    .await;
    assert_eq!(
        (r.attempted, r.accepted, r.errors, r.timeouts),
        (2000, 1500, 0, 0),
        "{r:?}"
    );
    assert_eq!(r.refused.get("0x97"), Some(&500), "{:?}", r.refused);
    assert_eq!(f.broker.ledger.counters().consumed, 1500);
    // The JSON report parses and says the same.
    let parsed: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("json written")).expect("valid JSON");
    assert_eq!(parsed["accepted"], 1500);
    assert_eq!(parsed["refused"]["0x97"], 500);
    assert!(parsed["latency_ms"]["p99"].as_f64().is_some());

    // MQTT 3.1.1 devices get 0x05 for the same refusal.
    add_product(&f.broker, "flood4", 1500).await;
    let secret4 = f.broker.ledger.product("flood4").expect("product").secret;
    let r = sim(&[
        "flood",
        "--port",
        &port,
        "--protocol",
        "4",
        "--product-key",
        "flood4",
        "--product-secret",
        &secret4,
        "--devices",
        "2000",
        "--rate",
        "4000",
        "--concurrency",
        "256",
        "--hold",
        "0",
        "--quiet",
    ])
    .await;
    assert_eq!(
        (r.accepted, r.refused.get("0x05").copied()),
        (1500, Some(500)),
        "{r:?}"
    );

    // A storm over the same 2,000 devices: which 1,500 got codes was up to
    // the race, so all of them connect; the 1,500 active ones reconnect at
    // once and nothing is consumed.
    let before = f.broker.ledger.counters().consumed;
    let r = sim(&[
        "storm",
        "--port",
        &port,
        "--protocol",
        "5",
        "--product-key",
        "flood5",
        "--product-secret",
        &secret,
        "--devices",
        "2000",
        "--rate",
        "4000",
        "--concurrency",
        "512",
        "--settle",
        "0",
        "--quiet",
    ])
    .await;
    let initial = r.initial_phase.as_deref().expect("initial phase");
    assert_eq!(
        (initial.accepted, initial.refused.get("0x97").copied()),
        (1500, Some(500)),
        "{initial:?}"
    );
    assert_eq!((r.attempted, r.accepted), (1500, 1500), "{r:?}");
    assert_eq!(
        f.broker.ledger.counters().consumed,
        before,
        "reconnects consume nothing"
    );
    f.broker.ledger.check_invariants().expect("invariants");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_keeps_the_counters_consistent() {
    let (f, secret) = broker_with("churn", 150).await;
    let port = f.broker.device_addr().port().to_string();
    let r = sim(&[
        "churn",
        "--port",
        &port,
        "--protocol",
        "5",
        "--product-key",
        "churn",
        "--product-secret",
        &secret,
        "--devices",
        "200",
        "--rate",
        "300",
        "--duration",
        "3",
        "--online",
        "0.3",
        "--offline",
        "0.1",
        "--quiet",
    ])
    .await;
    assert!(r.accepted > 0, "{r:?}");
    let c = f.broker.ledger.counters();
    assert!(c.consumed <= 150);
    assert_eq!(c.total, c.consumed + c.available + c.forfeited);
    // Every refusal is the quota code: devices beyond the 150 codes.
    assert!(r.refused.keys().all(|k| k == "0x97"), "{:?}", r.refused);
    f.broker.ledger.check_invariants().expect("invariants");
}

/// `setup` speaks the admin contract through the real accounts listener and
/// admin service (device-secret product, RegisterDevices in chunks,
/// CreateOrder assigned at purchase), and the devices it registered then
/// flood in with their own secrets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_over_the_admin_topics_then_flood_with_device_secrets() {
    use activation_broker::admin::accounts::{hash_password, AccountConfig, RoleConfig};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::on_loopback(dir.path());
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
    let accounts_port = broker.accounts_addr().port().to_string();
    let device_port = broker.device_addr().port().to_string();
    let secrets = dir.path().join("secrets.json");
    let secrets = secrets.to_str().expect("utf-8 path");
    let cmd = parse_args([
        "activation-sim",
        "setup",
        "--port",
        &accounts_port,
        "--account",
        "ops",
        "--password",
        "ops-pw",
        "--product-key",
        "setupdev",
        "--auth-mode",
        "device-secret",
        "--devices",
        "150",
        "--codes",
        "120",
        "--validity",
        "3600",
        "--secrets-out",
        secrets,
        "--device-port",
        &device_port,
    ])
    .expect("setup arguments");
    let activation_simulator::cli::Command::Setup(args) = cmd else {
        panic!("setup command");
    };
    let result = tokio::time::timeout(
        Duration::from_secs(60),
        activation_simulator::scenarios::setup::run(&args),
    )
    .await
    .expect("setup finishes")
    .expect("setup succeeds");
    assert_eq!(result.device_secrets.len(), 150);
    assert!(
        result.product_secret.is_some(),
        "CreateProduct returns it in both modes"
    );
    let p = broker.ledger.product("setupdev").expect("product");
    assert_eq!((p.total, p.available()), (120, 120));
    // The follow-up command uses the secrets file, never the ProductSecret
    // (which device-secret devices do not sign with); the file is 0600.
    assert!(
        result
            .flood_command
            .contains(&format!("--secrets {secrets}"))
            && !result.flood_command.contains("--product-secret"),
        "{}",
        result.flood_command
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(secrets)
            .expect("secrets file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "secrets file mode {mode:o}");
    }

    let r = sim(&[
        "flood",
        "--port",
        &device_port,
        "--product-key",
        "setupdev",
        "--secrets",
        secrets,
        "--devices",
        "150",
        "--rate",
        "2000",
        "--hold",
        "0",
        "--quiet",
    ])
    .await;
    assert_eq!((r.attempted, r.accepted), (150, 120), "{r:?}");
    assert_eq!(r.refused.get("0x97"), Some(&30), "{:?}", r.refused);
}
