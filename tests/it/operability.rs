//! Operability, black-box against the broker binary: signals,
//! a second broker on the same port, TLS by IP address, bans listed and
//! lifted, configuration printing and action help.

use crate::common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use common::child::{broker_bin, cli, prepare_store, write_config, ChildBroker};

const STOP: Duration = Duration::from_secs(30);

/// SIGTERM (systemd, Docker, Kubernetes) and SIGINT (Ctrl-C) both stop the
/// broker gracefully: `shutting down` in its log, exit status 0, and the
/// store opens again offline.
#[test]
fn sigterm_and_sigint_stop_gracefully() {
    for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        prepare_store(&data, "p", 1, 3600);
        let config = write_config(dir.path(), 10);
        let mut broker = ChildBroker::start(&broker_bin(), &config, &data, None);
        let status = broker.signal(sig, STOP);
        let log = broker.log_tail();
        let status =
            status.unwrap_or_else(|| panic!("{name}: still running after {STOP:?}:\n{log}"));
        assert!(status.success(), "{name}: exit {status:?}:\n{log}");
        assert!(
            log.contains("shutting down"),
            "{name}: no `shutting down`:\n{log}"
        );
        assert!(
            log.contains(name),
            "{name}: the signal is not named:\n{log}"
        );
        drop(broker);
        let ledger = common::child::open_offline(&data);
        assert!(ledger.product("p").is_ok(), "{name}: the store reopens");
    }
}

/// A config for a child broker on the given ports (0: any free one), two
/// I/O threads each (so its own sockets share the port), rate limits off.
fn fixed_port_config(dir: &std::path::Path, name: &str, devices: u16, accounts: u16) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "[devices]\nbind = \"127.0.0.1:{devices}\"\nio_threads = 2\n\
             [accounts_listener]\nbind = \"127.0.0.1:{accounts}\"\nio_threads = 2\n\
             [http]\nbind = \"127.0.0.1:0\"\n\
             [gate]\nsource_rate = 0.0\ndevice_rate = 0.0\nban_after_failures = 0\n"
        ),
    )
    .expect("write config");
    path
}

/// Runs `activation-broker serve` expecting it to refuse to start; its
/// exit status and stderr.
fn serve_refused(config: &Path, data: &Path) -> (std::process::ExitStatus, String) {
    let mut child = Process::new(broker_bin())
        .args(["serve", "--config"])
        .arg(config)
        .arg("--data")
        .arg(data)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + STOP;
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the second broker did not refuse to start within {STOP:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err).expect("stderr");
    }
    (status, err)
}

/// A second broker on a port the first one listens on (with two
/// `SO_REUSEPORT` sockets) refuses to start with an error naming the
/// address; so does a broker on a port another program holds. Once the
/// first broker stopped, the port is free again.
#[test]
fn a_second_broker_on_the_same_port_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first_cfg = fixed_port_config(dir.path(), "first.toml", 0, 0);
    let mut first = ChildBroker::start(&broker_bin(), &first_cfg, &dir.path().join("a"), None);
    let dev = first.addr.port();

    // Same devices port, another data directory and accounts port.
    let second_cfg = fixed_port_config(dir.path(), "second.toml", dev, 0);
    let (status, err) = serve_refused(&second_cfg, &dir.path().join("b"));
    assert!(!status.success(), "the second broker started:\n{err}");
    let needle = format!(
        "error: cannot listen on 127.0.0.1:{dev}: the address is already in use by another \
         process (another broker?)\n"
    );
    assert!(err.contains(&needle), "no `{needle}` in:\n{err}");
    assert!(first.alive(), "the first broker is still serving");

    // A port held by another program (no SO_REUSEPORT).
    let other = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let held = other.local_addr().expect("addr").port();
    let third_cfg = fixed_port_config(dir.path(), "third.toml", held, 0);
    let (status, err) = serve_refused(&third_cfg, &dir.path().join("c"));
    assert!(!status.success(), "a broker started on a held port:\n{err}");
    assert!(
        err.contains(&format!("127.0.0.1:{held}")),
        "the address is named:\n{err}"
    );

    // After the first broker stopped, a broker starts on its port.
    let status = first
        .signal(libc::SIGTERM, STOP)
        .expect("the first broker stops");
    assert!(status.success());
    drop(first);
    let again = ChildBroker::start(&broker_bin(), &second_cfg, &dir.path().join("b"), None);
    assert_eq!(again.addr.port(), dev);
}

/// A child broker with a TLS device listener (port 0, read back from its
/// log); its certificate (tests/data) names `localhost` and `127.0.0.1`.
fn tls_broker(dir: &Path) -> (ChildBroker, u16, String, PathBuf) {
    let data = dir.join("data");
    let secret = prepare_store(&data, "p", 10, 3600);
    let certs = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let config = dir.join("tls.toml");
    std::fs::write(
        &config,
        format!(
            "[devices]\nbind = \"127.0.0.1:0\"\n\
             tls = {{ bind = \"127.0.0.1:0\", cert = \"{}\", key = \"{}\" }}\n\
             [accounts_listener]\nbind = \"127.0.0.1:0\"\n\
             [http]\nbind = \"127.0.0.1:0\"\n\
             [gate]\nsource_rate = 0.0\ndevice_rate = 0.0\nban_after_failures = 0\n",
            certs.join("server.pem").display(),
            certs.join("server.key").display()
        ),
    )
    .expect("write config");
    let broker = ChildBroker::start(&broker_bin(), &config, &data, None);
    let tls_port = broker.listener("devices-tls").port();
    (broker, tls_port, secret, certs.join("ca.pem"))
}

/// `mosquitto_pub -h 127.0.0.1 --cafile …` (SNI "127.0.0.1", which TLS
/// forbids and clients send anyway) and a client sending no SNI at all
/// complete the handshake; by name it works as before.
#[test]
fn tls_clients_by_ip_address_or_without_sni_are_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (broker, port, secret, ca) = tls_broker(dir.path());
    for (dk, host) in [("by-ip", "127.0.0.1"), ("by-name", "localhost")] {
        let (user, pass) = activation_broker::credentials::device_credentials(
            "p",
            dk,
            &secret,
            activation_broker::clock::Clock::system().now(),
        );
        let out = Process::new("mosquitto_pub")
            .args(["-h", host, "-p", &port.to_string(), "-V", "mqttv311"])
            .arg("--cafile")
            .arg(&ca)
            .args(["-i", &format!("p.{dk}"), "-u", &user, "-P", &pass])
            .args(["-t", &format!("devices/p/{dk}/t"), "-m", "hello", "-q", "1"])
            .output()
            .expect("mosquitto_pub (apt-get install mosquitto-clients)");
        assert!(
            out.status.success(),
            "mosquitto_pub -h {host}: {:?} {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            broker.log_tail()
        );
    }
    // No SNI extension at all.
    let mut s_client = Process::new("openssl")
        .args(["s_client", "-noservername", "-brief", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-CAfile")
        .arg(&ca)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl");
    let mut err = String::new();
    if let Some(mut e) = s_client.stderr.take() {
        e.read_to_string(&mut err).expect("stderr");
    }
    let _ = s_client.wait();
    assert!(
        err.contains("CONNECTION ESTABLISHED") && err.contains("Verification: OK"),
        "openssl s_client -noservername:\n{err}\n{}",
        broker.log_tail()
    );
}

/// Device `p.d` logs in from 127.0.0.1 with `user`/`pass` (MQTT 3.1.1)
/// and publishes one message with mosquitto_pub, which fails on any
/// refusal.
fn device_login(port: u16, user: &str, pass: &str) -> std::process::Output {
    Process::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv311"])
        .args([
            "-i",
            "p.d",
            "-u",
            user,
            "-P",
            pass,
            "-t",
            "devices/p/d/t",
            "-m",
            "x",
        ])
        .output()
        .expect("mosquitto_pub (apt-get install mosquitto-clients)")
}

/// A device CONNECT with a wrong password from 127.0.0.1; the CLI's exit
/// status.
fn bad_login(port: u16) -> bool {
    let user = format!("p&d&{}", activation_broker::clock::Clock::system().now());
    device_login(port, &user, "wrong").status.success()
}

/// Three failed logins ban 127.0.0.1: the ban is logged (source, reason,
/// until), listed by `admin DescribeBans`, lifted by `admin RemoveBan
/// --Source 127.0.0.1` (logged, in the audit log) and a device then
/// connects; a viewer may list bans but not lift them.
#[test]
fn bans_are_logged_listed_and_lifted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let secret = prepare_store(&data, "p", 10, 3600);
    let (_, hash, _) = cli(&["hash-password", "--password", "ops-pw"]);
    let config = dir.path().join("bans.toml");
    std::fs::write(
        &config,
        format!(
            "[devices]\nbind = \"127.0.0.1:0\"\n[accounts_listener]\nbind = \"127.0.0.1:0\"\n\
             [http]\nbind = \"127.0.0.1:0\"\n\
             [gate]\nsource_rate = 0.0\ndevice_rate = 0.0\nban_after_failures = 3\n\
             ban_window_secs = 600\nban_secs = 3600\n\
             [[accounts]]\nname = \"ops\"\npassword_hash = \"{h}\"\nrole = \"admin\"\n\
             [[accounts]]\nname = \"look\"\npassword_hash = \"{h}\"\nrole = \"viewer\"\n",
            h = hash.trim()
        ),
    )
    .expect("write config");
    let broker = ChildBroker::start(&broker_bin(), &config, &data, None);
    let port = broker.addr.port();
    let acc = broker.listener("accounts").port().to_string();
    let admin = |account: &str, action: &[&str]| {
        let mut args = vec![
            "admin",
            "--port",
            &acc,
            "--account",
            account,
            "--password",
            "ops-pw",
        ];
        args.extend_from_slice(action);
        cli(&args)
    };
    for _ in 0..3 {
        assert!(!bad_login(port), "a wrong password is refused");
    }
    let (user, pass) = activation_broker::credentials::device_credentials(
        "p",
        "d",
        &secret,
        activation_broker::clock::Clock::system().now(),
    );
    let good_login = || device_login(port, &user, &pass);
    let out = good_login();
    assert!(
        !out.status.success(),
        "banned: even good credentials are refused"
    );

    let (status, out, err) = admin("look", &["DescribeBans"]);
    assert!(status.success(), "viewer DescribeBans: {out}{err}");
    let list: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(list["TotalCount"], 1, "{list}");
    let ban = &list["Items"][0];
    assert_eq!(ban["Source"], "127.0.0.1", "{list}");
    assert_eq!(ban["Failures"], 3, "{list}");
    assert_eq!(ban["Reason"], "signature does not match", "{list}");
    assert!(
        ban["Until"].as_str().is_some_and(|u| u.len() == 19),
        "{list}"
    );

    let (status, out, _) = admin("look", &["RemoveBan", "--Source", "127.0.0.1"]);
    assert!(
        !status.success() && out.contains("Forbidden"),
        "viewer RemoveBan: {out}"
    );
    let (status, out, _) = admin("ops", &["RemoveBan", "--Source", "not-an-ip"]);
    assert!(
        !status.success() && out.contains("is not an IP address"),
        "{out}"
    );
    let (status, out, err) = admin("ops", &["RemoveBan", "--Source", "127.0.0.1"]);
    assert!(status.success(), "RemoveBan: {out}{err}");
    let lifted: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(lifted["Ban"]["Source"], "127.0.0.1", "{out}");
    let out = good_login();
    assert!(
        out.status.success(),
        "connects once the ban is lifted: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        broker.log_tail()
    );
    let (status, out, _) = admin("ops", &["RemoveBan", "--Source", "127.0.0.1"]);
    assert!(!status.success() && out.contains("BanNotFound"), "{out}");
    let (_, out, _) = admin("ops", &["DescribeBans"]);
    let list: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(list["TotalCount"], 0, "{out}");

    let (status, out, err) = admin("ops", &["DescribeAuditLog", "--ActionName", "RemoveBan"]);
    assert!(status.success(), "{out}{err}");
    let audit: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let codes: Vec<&str> = audit["Items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["Code"].as_str())
        .collect();
    assert_eq!(codes, ["BanNotFound", "OK"], "newest first: {audit}");

    let log = broker.log_tail();
    assert!(
        log.contains("source banned") && log.contains("source=127.0.0.1"),
        "the ban is logged:\n{log}"
    );
    assert!(log.contains("reason=signature does not match"), "{log}");
    assert!(
        log.contains("ban ended") && log.contains("lifted by account ops"),
        "{log}"
    );
}

/// `config --print-default` prints exactly the embedded default, which
/// parses; a missing config file is one clear line.
#[test]
fn config_print_default_and_a_missing_file() {
    let (status, out, err) = cli(&["config", "--print-default"]);
    assert!(status.success(), "{err}");
    assert_eq!(out, activation_broker::config::DEFAULT_CONFIG);
    activation_broker::config::Config::parse(&out, "printed").expect("the printed default parses");
    assert!(
        out.contains("[log]") && out.contains("RUST_LOG"),
        "the log section is documented"
    );

    let (status, _, err) = cli(&["serve", "--config", "/nonexistent/broker.toml"]);
    assert!(!status.success());
    assert_eq!(
        err.trim(),
        "error: cannot read /nonexistent/broker.toml: No such file or directory (os error 2)"
    );
}

/// `admin <Action> --help` shows the action's parameters with their format
/// and limits (not the general help); `admin actions` lists every action
/// with its access level and summary. No broker is needed.
#[test]
fn action_help_lists_parameters() {
    let (status, out, err) = cli(&["admin", "CreateOrder", "--help"]);
    assert!(status.success(), "{err}");
    assert!(out.starts_with("CreateOrder [create]"), "{out}");
    assert!(
        out.contains("--Quantity") && out.contains("1 to 100000000"),
        "{out}"
    );
    assert!(
        out.contains("--ValiditySeconds") && out.contains("--ProductKey"),
        "{out}"
    );
    assert!(out.contains("--ClientToken"), "{out}");
    assert!(out.contains("Access: create (role admin)"), "{out}");

    let (status, out, _) = cli(&["admin", "--port", "1", "DescribeAuditLog", "-h"]);
    assert!(status.success());
    for p in ["--Account", "--ActionName", "--From", "--To", "--PageSize"] {
        assert!(out.contains(p), "{p} in:\n{out}");
    }
    assert!(out.contains("UTC"), "times are documented as UTC:\n{out}");
    assert!(out.contains("role admin or viewer"), "{out}");

    let (_, out, _) = cli(&["admin", "RemoveBan", "--help"]);
    assert!(
        out.contains("--Source") && out.contains("IP address"),
        "{out}"
    );

    let (status, out, _) = cli(&["admin", "actions"]);
    assert!(status.success());
    for (name, access) in activation_broker::admin::ACTIONS {
        assert!(
            out.contains(&format!("{name} [{}]", access.as_str())),
            "{name} in:\n{out}"
        );
    }
    assert!(out.contains("DescribeBans [list]") && out.contains("RemoveBan [delete]"));

    let (_, out, _) = cli(&["admin", "Nope", "--help"]);
    assert!(out.contains("unknown action \"Nope\""), "{out}");
}

/// Starts `serve` with stderr piped (not a terminal, NO_COLOR unset) and
/// returns the lines it logged up to `devices listener ready`.
fn startup_log(config: &Path, data: &Path) -> (std::process::Child, Vec<String>) {
    let mut child = Process::new(broker_bin())
        .args(["serve", "--config"])
        .arg(config)
        .arg("--data")
        .arg(data)
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + STOP;
    while !lines
        .iter()
        .any(|l: &String| l.contains("devices listener ready"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the broker did not start:\n{}", lines.join("\n"));
            }
        }
    }
    (child, lines)
}

fn stop_child(mut child: std::process::Child) {
    // SAFETY: sending a signal to our own child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let _ = child.wait();
}

/// Logs written to a pipe carry no ANSI codes; `[log] format = "json"`
/// gives one JSON object per line; the start-up log names the accounts in
/// force and where they come from, and warns when `[[accounts]]` leave a
/// generated admin unused.
#[test]
fn logs_are_plain_or_json_and_name_the_accounts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let listeners =
        "[devices]\nbind = \"127.0.0.1:0\"\n[accounts_listener]\nbind = \"127.0.0.1:0\"\n\
         [http]\nbind = \"127.0.0.1:0\"\n";

    // Text, generated admin.
    let text = dir.path().join("text.toml");
    std::fs::write(&text, listeners).expect("write");
    let (child, lines) = startup_log(&text, &data);
    stop_child(child);
    let all = lines.join("\n");
    assert!(!all.contains('\x1b'), "no ANSI codes in a pipe:\n{all}");
    let accounts = lines
        .iter()
        .find(|l| l.contains("accounts in force"))
        .unwrap_or_else(|| panic!("no accounts line:\n{all}"));
    assert!(accounts.contains("admin (admin)"), "{accounts}");
    assert!(accounts.contains("accounts.toml"), "{accounts}");

    // JSON, configured accounts beside the generated file.
    let (_, hash, _) = cli(&["hash-password", "--password", "pw"]);
    let json = dir.path().join("json.toml");
    std::fs::write(
        &json,
        format!(
            "{listeners}[log]\nformat = \"json\"\nlevel = \"info\"\n\
             [[accounts]]\nname = \"ops\"\npassword_hash = \"{}\"\nrole = \"viewer\"\n",
            hash.trim()
        ),
    )
    .expect("write");
    let (child, lines) = startup_log(&json, &data);
    stop_child(child);
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string(), "{l}");
    }
    let all = lines.join("\n");
    assert!(all.contains("ops (viewer)"), "{all}");
    assert!(
        all.contains("the generated accounts in this file are not used"),
        "a warning about the unused generated admin:\n{all}"
    );
}
