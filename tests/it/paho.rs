//! The Eclipse Paho MQTT interoperability suite (`tests/paho-interop`,
//! python3) against a real broker started here, on the accounts listener,
//! as account `paho` (`publish = ["#"]`, `subscribe = ["#"]`,
//! `deny_subscribe = ["test/nosubscribe"]`): MQTT 3.1.1 and 5.0, each test
//! alone under `run.sh`'s 40 s timeout. Prints every PASS/FAIL/HANG and the
//! totals; asserts the floor reached so far (a regression fails CI).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use activation_broker::admin::accounts::{hash_password, AccountConfig, RoleConfig};
use activation_broker::clock::Clock;
use activation_broker::config::Config;
use activation_broker::server::Broker;
use tokio::io::{AsyncBufReadExt, BufReader};

const USER: &str = "paho";
const PASSWORD: &str = "paho-pw";

/// The whole run of one version: 10 or 27 tests, 40 s at most each.
const RUN_TIMEOUT: Duration = Duration::from_secs(30 * 40);

fn paho_account() -> AccountConfig {
    AccountConfig {
        name: USER.into(),
        password_hash: hash_password(PASSWORD),
        role: RoleConfig::Named("none".into()),
        publish: vec!["#".into()],
        subscribe: vec!["#".into()],
        deny_publish: Vec::new(),
        deny_subscribe: vec!["test/nosubscribe".into()],
        events: false,
    }
}

struct Outcome {
    passed: Vec<String>,
    failed: Vec<String>,
}

/// One suite at a time: the suite's clients give the CONNACK 0.5 s, and
/// two suites at once (each login an argon2 verification) on a loaded CI
/// machine miss it now and then.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts a broker and runs the suite for `version` (`v311` or `v5`).
async fn run_suite(version: &str) -> Outcome {
    let _one = ONE_AT_A_TIME.lock().await;
    if std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_err()
    {
        // scripts/test installs python3; say so loudly rather than pass.
        panic!("python3 is needed for the Paho suite (scripts/test installs it)");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::on_loopback(dir.path());
    config.accounts = vec![paho_account()];
    // MQTT 5 Server Keep Alive (the suite expects 60 for a keepalive of
    // 120) and a Receive Maximum the suite can exceed in a few seconds.
    config.accounts_listener.max_keep_alive_secs = 60;
    config.accounts_listener.receive_maximum = 100;
    let broker = Broker::start(config, Clock::system())
        .await
        .expect("broker starts");
    let port = broker.accounts_addr().port();
    println!(
        "paho {version}: accounts listener 127.0.0.1:{port} (max_keep_alive_secs 60, \
         receive_maximum 100), account paho: publish [#], subscribe [#], \
         deny_subscribe [test/nosubscribe]; run.sh, 40 s per test"
    );
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/paho-interop/run.sh");
    let mut child = tokio::process::Command::new("bash")
        .arg(&script)
        .arg(port.to_string())
        .arg(version)
        .arg(USER)
        .arg(PASSWORD)
        .env("PAHO_VERBOSE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("run.sh starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut outcome = Outcome {
        passed: Vec::new(),
        failed: Vec::new(),
    };
    let read = async {
        while let Ok(Some(line)) = lines.next_line().await {
            println!("[paho {version}] {line}");
            if let Some(t) = line.strip_prefix("PASS ") {
                outcome.passed.push(t.to_owned());
            } else if let Some(t) = line
                .strip_prefix("FAIL ")
                .or_else(|| line.strip_prefix("HANG "))
            {
                outcome.failed.push(t.to_owned());
            }
        }
    };
    if tokio::time::timeout(RUN_TIMEOUT, read).await.is_err() {
        let _ = child.kill().await;
        panic!("the Paho {version} suite did not finish in {RUN_TIMEOUT:?}");
    }
    let status = child.wait().await.expect("run.sh exits");
    assert!(status.success(), "run.sh {version}: {status}");
    broker.shutdown();
    outcome
}

fn report(version: &str, o: &Outcome) -> usize {
    let total = o.passed.len() + o.failed.len();
    println!(
        "paho {version}: {}/{total} passed; failing: {:?}",
        o.passed.len(),
        o.failed
    );
    o.passed.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_v311() {
    let o = run_suite("v311").await;
    let passed = report("v311", &o);
    assert_eq!(
        o.passed.len() + o.failed.len(),
        10,
        "the 3.1.1 suite has 10 tests"
    );
    assert!(
        passed >= V311_FLOOR,
        "3.1.1: {passed}/10, floor {V311_FLOOR}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_v5() {
    let o = run_suite("v5").await;
    let passed = report("v5", &o);
    assert_eq!(
        o.passed.len() + o.failed.len(),
        27,
        "the 5.0 suite has 27 tests"
    );
    assert!(passed >= V5_FLOOR, "5.0: {passed}/27, floor {V5_FLOOR}");
}

/// The floors: 3.1.1 passes 10/10; 5.0 passes 25/27 when the machine is
/// quiet (fails `subscribe_failure`, which wants SUBACK 0x80 where this
/// broker answers 0x87 Not authorized, and `subscribe_identifiers`, which
/// wants one delivery for overlapping subscriptions); one or two timing-
/// sensitive tests (3 s waits, a 0.5 s CONNACK deadline) may miss on a
/// loaded machine, hence the margin.
const V311_FLOOR: usize = 10;
const V5_FLOOR: usize = 23;
