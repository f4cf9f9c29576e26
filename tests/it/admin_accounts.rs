//! Accounts: password hashing, config and first-start bootstrap (the
//! operator CLI against the whole broker is in `admin_broker`).

use activation_broker::admin::accounts::{
    hash_password, verify_password, AccountConfig, Accounts, RoleConfig, GENERATED_FILE,
};

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
