//! Operability, black-box against the broker binary (issue 17): signals,
//! a second broker on the same port, TLS by IP address, bans listed and
//! lifted, configuration printing and action help.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use common::child::{broker_bin, prepare_store, write_config, ChildBroker};

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

/// A free TCP port on 127.0.0.1 (bound, read and released).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A config for a child broker on fixed ports, two I/O threads each (so
/// its own sockets share the port), rate limits off.
fn fixed_port_config(dir: &std::path::Path, name: &str, devices: u16, accounts: u16) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "[devices]\nbind = \"127.0.0.1:{devices}\"\nio_threads = 2\n\
             [accounts_listener]\nbind = \"127.0.0.1:{accounts}\"\nio_threads = 2\n\
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
    let (dev, acc) = (free_port(), free_port());
    let first_cfg = fixed_port_config(dir.path(), "first.toml", dev, acc);
    let mut first = ChildBroker::start(&broker_bin(), &first_cfg, &dir.path().join("a"), None);
    assert_eq!(first.addr.port(), dev);

    // Same devices port, another data directory and accounts port.
    let second_cfg = fixed_port_config(dir.path(), "second.toml", dev, free_port());
    let (status, err) = serve_refused(&second_cfg, &dir.path().join("b"));
    assert!(!status.success(), "the second broker started:\n{err}");
    let needle = format!("127.0.0.1:{dev} is already in use by another process");
    assert!(err.contains(&needle), "no `{needle}` in:\n{err}");
    assert!(first.alive(), "the first broker is still serving");

    // A port held by another program (no SO_REUSEPORT).
    let other = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let held = other.local_addr().expect("addr").port();
    let third_cfg = fixed_port_config(dir.path(), "third.toml", held, free_port());
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

/// A child broker with a TLS device listener on a fixed port; its
/// certificate (tests/data) names `localhost` and `127.0.0.1`.
fn tls_broker(dir: &Path) -> (ChildBroker, u16, String, PathBuf) {
    let data = dir.join("data");
    let secret = prepare_store(&data, "p", 10, 3600);
    let certs = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let tls_port = free_port();
    let config = dir.join("tls.toml");
    std::fs::write(
        &config,
        format!(
            "[devices]\nbind = \"127.0.0.1:0\"\n\
             tls = {{ bind = \"127.0.0.1:{tls_port}\", cert = \"{}\", key = \"{}\" }}\n\
             [accounts_listener]\nbind = \"127.0.0.1:0\"\n\
             [gate]\nsource_rate = 0.0\ndevice_rate = 0.0\nban_after_failures = 0\n",
            certs.join("server.pem").display(),
            certs.join("server.key").display()
        ),
    )
    .expect("write config");
    let broker = ChildBroker::start(&broker_bin(), &config, &data, None);
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

/// Runs `activation-broker ARGS…`; its status, stdout and stderr.
fn cli(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let out = Process::new(broker_bin())
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("ACTIVATION_ADMIN_PASSWORD")
        .stdin(Stdio::null())
        .output()
        .expect("run activation-broker");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A device CONNECT with a wrong password from 127.0.0.1; the CLI's exit
/// status (mosquitto_pub fails on any refusal).
fn bad_login(port: u16) -> bool {
    let user = format!("p&d&{}", activation_broker::clock::Clock::system().now());
    Process::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv311"])
        .args([
            "-i",
            "p.d",
            "-u",
            &user,
            "-P",
            "wrong",
            "-t",
            "devices/p/d/t",
            "-m",
            "x",
        ])
        .output()
        .expect("mosquitto_pub (apt-get install mosquitto-clients)")
        .status
        .success()
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
    let acc = free_port();
    let config = dir.path().join("bans.toml");
    std::fs::write(
        &config,
        format!(
            "[devices]\nbind = \"127.0.0.1:0\"\n[accounts_listener]\nbind = \"127.0.0.1:{acc}\"\n\
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
    let acc = acc.to_string();
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
    let good_login = || {
        Process::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv311"])
            .args([
                "-i",
                "p.d",
                "-u",
                &user,
                "-P",
                &pass,
                "-t",
                "devices/p/d/t",
                "-m",
                "x",
            ])
            .output()
            .expect("mosquitto_pub")
    };
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
