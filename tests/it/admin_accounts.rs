//! Accounts (password hashing, config, first-start bootstrap, topic rules)
//! and the operator CLI against the whole broker's accounts listener.

use crate::common;

use std::time::Duration;

use activation_broker::admin::accounts::{
    hash_password, verify_password, AccountConfig, Accounts, RoleConfig, GENERATED_FILE,
};
use activation_broker::admin::cli::{self, AdminCliArgs, EXIT_FAILURE, EXIT_NOT_OK};
use common::broker::*;
use serde_json::{json, Map};

#[test]
fn passwords_hash_and_verify() {
    let h = hash_password("correct horse");
    assert!(h.starts_with("$argon2id$"), "{h}");
    assert!(verify_password(&h, "correct horse"));
    assert!(!verify_password(&h, "correct horse "));
    assert!(!verify_password(&h, ""));
    assert_ne!(h, hash_password("correct horse"), "salted");
    // Malformed hashes verify nothing and never panic.
    for bad in [
        "",
        "plain",
        "$argon2id$",
        "$argon2id$v=19$m=1,t=1,p=1$$",
        "$$$$$$",
    ] {
        assert!(!verify_password(bad, "x"), "{bad:?}");
    }
}

fn config(name: &str, role: RoleConfig) -> AccountConfig {
    AccountConfig {
        name: name.into(),
        password_hash: hash_password("pw"),
        role,
        publish: Vec::new(),
        subscribe: Vec::new(),
        deny_publish: Vec::new(),
        deny_subscribe: Vec::new(),
        events: false,
    }
}

#[test]
fn accounts_load_from_config_toml() {
    let hash = hash_password("s3cret");
    let text = format!(
        r#"
data_dir = "./data"

[[accounts]]
name = "ops"
password_hash = "{hash}"
role = "admin"
events = true
subscribe = ["devices/#"]
publish = ["devices/+/+/command/#"]

[[accounts]]
name = "dash"
password_hash = "{hash}"
role = "viewer"

[[accounts]]
name = "billing"
password_hash = "{hash}"
role = ["CreateOrder", "DescribeOrders"]
"#
    );
    let configs = Accounts::configs_from_toml(&text).expect("parses");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut out = Vec::new();
    let accounts = Accounts::load_with_output(&configs, dir.path(), &mut out).expect("loads");
    assert!(
        out.is_empty(),
        "nothing printed when accounts are configured"
    );
    assert!(!dir.path().join(GENERATED_FILE).exists());
    assert_eq!(accounts.len(), 3);
    let ops = accounts.authenticate("ops", "s3cret").expect("ops logs in");
    assert!(accounts.authenticate("ops", "wrong").is_none());
    assert!(accounts.authenticate("nobody", "s3cret").is_none());
    let rules = ops.topic_rules();
    assert_eq!(
        rules.publish,
        vec!["admin/v1/ops/request", "devices/+/+/command/#"]
    );
    assert_eq!(
        rules.subscribe,
        vec![
            "admin/v1/ops/response",
            "admin/v1/ops/response/#",
            "admin/v1/events/#",
            "devices/#"
        ]
    );
    let dash = accounts.get("dash").expect("dash");
    assert!(dash.may("DescribeDevices") && !dash.may("DeleteDevice"));
    assert!(!dash
        .topic_rules()
        .subscribe
        .iter()
        .any(|f| f.contains("events")));
    let billing = accounts.get("billing").expect("billing");
    assert!(billing.may("CreateOrder") && !billing.may("CreateProduct"));
}

#[test]
fn bad_account_configs_name_the_key() {
    let cases: Vec<(AccountConfig, &str)> = vec![
        (
            config("bad name", RoleConfig::Named("admin".into())),
            "accounts.name",
        ),
        (
            config("events", RoleConfig::Named("admin".into())),
            "accounts.name",
        ),
        (
            config("ops", RoleConfig::Named("root".into())),
            "accounts.role",
        ),
        (
            config("ops", RoleConfig::Actions(vec!["DropTables".into()])),
            "accounts.role",
        ),
        (
            AccountConfig {
                password_hash: "hunter2".into(),
                ..config("ops", RoleConfig::Named("admin".into()))
            },
            "accounts.password_hash",
        ),
        (
            AccountConfig {
                subscribe: vec!["admin/#".into()],
                ..config("ops", RoleConfig::Named("admin".into()))
            },
            "accounts.subscribe",
        ),
        (
            AccountConfig {
                publish: vec!["admin/v1/other/request".into()],
                ..config("ops", RoleConfig::Named("admin".into()))
            },
            "accounts.publish",
        ),
        (
            AccountConfig {
                publish: vec!["a/#/b".into()],
                ..config("ops", RoleConfig::Named("admin".into()))
            },
            "accounts.publish",
        ),
    ];
    for (c, key) in cases {
        let err = Accounts::from_configs(std::slice::from_ref(&c)).expect_err("refused");
        assert!(err.to_string().contains(key), "{c:?}: {err}");
    }
    let twice = vec![
        config("ops", RoleConfig::Named("admin".into())),
        config("ops", RoleConfig::Named("viewer".into())),
    ];
    assert!(Accounts::from_configs(&twice).is_err());
    let err = Accounts::configs_from_toml("[[accounts]]\nname = \"x\"\n").expect_err("no hash");
    assert!(err.to_string().contains("accounts"), "{err}");
    let err = Accounts::configs_from_toml(
        "[[accounts]]\nname = \"x\"\npassword_hash = \"h\"\nrole = \"admin\"\ncolour = 1\n",
    )
    .expect_err("unknown key");
    assert!(err.to_string().contains("colour"), "{err}");
}

#[test]
fn first_start_creates_admin_once_and_keeps_only_the_hash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut out = Vec::new();
    let accounts = Accounts::load_with_output(&[], &data, &mut out).expect("bootstraps");
    let printed = String::from_utf8(out).expect("utf8");
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 1, "{printed:?}");
    let password = lines[0]
        .strip_prefix("admin password: ")
        .expect("the announced line");
    assert!(password.len() >= 20, "strong password");
    let admin = accounts
        .authenticate("admin", password)
        .expect("admin logs in");
    assert!(admin.may("DeleteProduct"));
    assert!(admin.events);

    let file = std::fs::read_to_string(data.join(GENERATED_FILE)).expect("accounts file");
    assert!(!file.contains(password), "the password is never stored");
    assert!(file.contains("$argon2id$"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join(GENERATED_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "owner only");
    }

    // Later starts load it and print nothing.
    let mut out = Vec::new();
    let again = Accounts::load_with_output(&[], &data, &mut out).expect("loads");
    assert!(out.is_empty());
    assert!(again.authenticate("admin", password).is_some());

    // Two fresh data dirs never share a password.
    let other = dir.path().join("other");
    let mut out2 = Vec::new();
    Accounts::load_with_output(&[], &other, &mut out2).expect("bootstraps");
    assert_ne!(String::from_utf8_lossy(&out2), printed);
}

// ---------------------------------------------------------------------------
// The CLI over a real MQTT 5 listener.

/// A port nothing listens on (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct Listener {
    port: u16,
    t: TestBroker,
}

/// The whole broker, with one admin account `ops`; the CLI talks to its
/// accounts listener.
async fn listener(password: &str) -> Listener {
    let cfg = AccountConfig {
        name: "ops".into(),
        password_hash: hash_password(password),
        role: RoleConfig::Named("admin".into()),
        publish: Vec::new(),
        subscribe: Vec::new(),
        deny_publish: Vec::new(),
        deny_subscribe: Vec::new(),
        events: true,
    };
    let t = start_broker(|c| c.accounts = vec![cfg]).await;
    Listener {
        port: t.broker.accounts_addr().port(),
        t,
    }
}

fn args(port: u16, password: &str, action: &str, params: &[&str]) -> AdminCliArgs {
    AdminCliArgs {
        host: "127.0.0.1".into(),
        port,
        account: "ops".into(),
        password: Some(password.into()),
        timeout: 10,
        action: action.into(),
        params: params.iter().map(|s| (*s).to_owned()).collect(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_requests_over_mqtt5() {
    let l = listener("pw-1").await;
    let a = args(l.port, "pw-1", "CreateProduct", &["--ProductKey", "p1"]);
    let mut params = cli::parse_params(&a.params).expect("params");
    params.insert("Action".into(), json!("CreateProduct"));
    let r = cli::request(&a, params).await.expect("response");
    assert_eq!(r["Code"], "OK", "{r}");
    assert_eq!(r["ProductKey"], "p1");

    let a = args(l.port, "pw-1", "DescribeActivationSummary", &[]);
    let mut params = Map::new();
    params.insert("Action".into(), json!("DescribeActivationSummary"));
    params.insert("RequestId".into(), json!("cli-test"));
    let r = cli::request(&a, params).await.expect("response");
    assert_eq!(r["RequestId"], "cli-test");
    assert_eq!(r["Products"], 1);

    // Exit codes: OK → 0, another Code → 1, no response → 2.
    let code = cli::run(args(
        l.port,
        "pw-1",
        "CreateOrder",
        &[
            "--Quantity",
            "5",
            "--ValiditySeconds",
            "3600",
            "--ProductKey",
            "p1",
        ],
    ))
    .await
    .expect("runs");
    assert_eq!(code, 0);
    assert_eq!(l.t.broker.ledger.counters().total, 5);
    let code = cli::run(args(
        l.port,
        "pw-1",
        "DescribeDevice",
        &["--ProductKey", "p1", "--DeviceKey", "x"],
    ))
    .await
    .expect("runs");
    assert_eq!(code, EXIT_NOT_OK);
    let code = cli::run(args(l.port, "wrong", "DescribeProducts", &[]))
        .await
        .expect("runs");
    assert_eq!(code, EXIT_FAILURE, "login refused");
    let code = cli::run(args(free_port(), "pw-1", "DescribeProducts", &[]))
        .await
        .expect("runs");
    assert_eq!(code, EXIT_FAILURE, "nothing listening");
    let code = cli::run(args(l.port, "pw-1", "describe", &[]))
        .await
        .expect("runs");
    assert_eq!(code, EXIT_FAILURE, "not an action");
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_events_prints_relayed_events() {
    use activation_broker::events::{Event, EventKind};
    let l = listener("pw-2").await;
    let mut watcher = tokio::spawn(cli::run(args(
        l.port,
        "pw-2",
        "events",
        &["--kind", "pool/low", "--count", "1"],
    )));
    // The watcher subscribes at some point; publish until it has seen one.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let code = loop {
        l.t.broker.events.publish(
            Event::new(EventKind::PoolLow, l.t.clock.now())
                .with("ProductKey", "p1")
                .with("Available", 1),
        );
        match tokio::time::timeout(Duration::from_millis(50), &mut watcher).await {
            Ok(joined) => break joined.expect("joined").expect("runs"),
            Err(_) => assert!(tokio::time::Instant::now() < deadline, "no event seen"),
        }
    };
    assert_eq!(code, 0);
    let code = cli::run(args(l.port, "pw-2", "events", &["--kind", "nope"]))
        .await
        .expect("runs");
    assert_eq!(code, EXIT_FAILURE);
}
