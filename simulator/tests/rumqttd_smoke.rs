//! Smoke tests against a real MQTT broker: rumqttd's stock broker, started
//! in-process with an auth handler that checks the simulator's signed
//! credentials (user name `{PK}&{DK}&{ts}`, password HMAC-SHA256). It has no
//! activation gate, so it accepts every correctly signed device; a device
//! with a wrong signature is dropped without CONNACK (rumqttd's behaviour),
//! which the simulator counts as an error.
//!
//! Each test starts its own broker: rumqttd 0.20 can panic (and poison its
//! listener) when a client id reconnects right after its previous
//! connection ended, so the tests that reconnect devices (storm, churn) send
//! empty client ids, and one test's broker cannot break another's.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use activation_broker::credentials::{parse_user_name, verify};
use activation_simulator::{parse_args, run, Report};

const SECRET: &str = "smoke-secret";

struct Ports {
    v4: u16,
    v5: u16,
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Starts a rumqttd broker with MQTT 3.1.1 and 5 listeners on free ports.
fn broker() -> Ports {
    let (v4, v5) = (free_port(), free_port());
    let text = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 10010
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "127.0.0.1:{v4}"
next_connection_delay_ms = 0
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 20480
max_inflight_count = 100
dynamic_filters = true

[v5.1]
name = "v5-1"
listen = "127.0.0.1:{v5}"
next_connection_delay_ms = 0
[v5.1.connections]
connection_timeout_ms = 60000
max_payload_size = 20480
max_inflight_count = 100
"#
    );
    let mut config: rumqttd::Config = toml::from_str(&text).expect("rumqttd config");
    let check = |_client_id: String, user: String, pass: String| async move {
        // Accounts for the setup test.
        if (user == "admin" || user == "responder") && pass == "pw" {
            return true;
        }
        let Ok(u) = parse_user_name(&user) else {
            return false;
        };
        let now = chrono::Utc::now().timestamp_millis();
        verify(SECRET, &user, u.timestamp_ms, pass.as_bytes(), now, 300_000).is_ok()
    };
    for servers in [config.v4.as_mut(), config.v5.as_mut()]
        .into_iter()
        .flatten()
    {
        for s in servers.values_mut() {
            s.set_auth_handler(check);
        }
    }
    std::thread::spawn(move || {
        let mut broker = rumqttd::Broker::new(config);
        let _ = broker.start();
    });
    for port in [v4, v5] {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut up = false;
        for _ in 0..200 {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                up = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        assert!(up, "rumqttd did not start on {port}");
    }
    Ports { v4, v5 }
}

impl Ports {
    fn port(&self, protocol: u8) -> String {
        if protocol == 5 { self.v5 } else { self.v4 }.to_string()
    }
}

async fn sim(args: &[&str]) -> Report {
    let mut argv = vec!["activation-sim"];
    argv.extend_from_slice(args);
    let cmd = parse_args(argv).expect("args");
    run(cmd).await.expect("run")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_connects_and_counts() {
    let ports = broker();
    for protocol in [4u8, 5] {
        for engine in ["rumqttc", "socket"] {
            let dir = tempfile::tempdir().expect("tempdir");
            let accepted = dir.path().join("accepted.txt");
            let p = ports.port(protocol);
            let proto = protocol.to_string();
            let prefix = format!("flood-{protocol}-{engine}-");
            let r = sim(&[
                "flood",
                "--port",
                &p,
                "--protocol",
                &proto,
                "--product-key",
                "pk1",
                "--product-secret",
                SECRET,
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
async fn wrong_secret_is_not_accepted() {
    let ports = broker();
    let p = ports.port(4);
    let r = sim(&[
        "flood",
        "--port",
        &p,
        "--protocol",
        "4",
        "--product-key",
        "pk1",
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
    assert_eq!(r.attempted, 5);
    assert_eq!(r.accepted, 0);
    // rumqttd closes the socket instead of sending a refusing CONNACK.
    assert_eq!(r.errors + r.timeouts + r.refused_total(), 5, "{r:?}");

    // A timestamp ten minutes old is outside the 300 s window.
    let r = sim(&[
        "flood",
        "--port",
        &p,
        "--protocol",
        "4",
        "--product-key",
        "pk1",
        "--product-secret",
        SECRET,
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_reconnects_everyone() {
    let ports = broker();
    let p = ports.port(5);
    let r = sim(&[
        "storm",
        "--port",
        &p,
        "--protocol",
        "5",
        "--product-key",
        "pk1",
        "--product-secret",
        SECRET,
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
    let ports = broker();
    for protocol in [4u8, 5] {
        let p = ports.port(protocol);
        let proto = protocol.to_string();
        let prefix = format!("pub-{protocol}-");
        // From a second loopback address through the bound-socket client.
        let r = sim(&[
            "publish",
            "--port",
            &p,
            "--protocol",
            &proto,
            "--product-key",
            "pk1",
            "--product-secret",
            SECRET,
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
    let p = ports.port(5);
    let r = sim(&[
        "publish",
        "--port",
        &p,
        "--product-key",
        "pk1",
        "--product-secret",
        SECRET,
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
    let ports = broker();
    let p = ports.port(4);
    let started = std::time::Instant::now();
    let r = sim(&[
        "churn",
        "--port",
        &p,
        "--protocol",
        "4",
        "--product-key",
        "pk1",
        "--product-secret",
        SECRET,
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

#[test]
fn workers_merge_their_reports() {
    let ports = broker();
    let p = ports.port(4);
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("report.json");
    let accepted = dir.path().join("accepted.txt");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_activation-sim"))
        .args([
            "flood",
            "--port",
            &p,
            "--protocol",
            "4",
            "--product-key",
            "pk1",
            "--product-secret",
            SECRET,
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
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_activation-sim"))
        .args([
            "flood",
            "--port",
            &p,
            "--protocol",
            "4",
            "--product-key",
            "pk1",
            "--product-secret",
            SECRET,
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
        .expect("run activation-sim");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("expected refused:0x05=3, got 0"));
}

/// A stand-in for the admin plane's request/response contract (SPEC §4),
/// which is being built elsewhere: answers CreateProduct, RegisterDevices
/// and CreateOrder on `admin/v1/{account}/response`, with `Conflict` for a
/// ProductKey it has seen. Only the wire contract matters to `setup`.
fn spawn_admin_responder(port: u16) -> tokio::task::JoinHandle<()> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    use serde_json::{json, Value};
    let mut opts = MqttOptions::new("admin-responder", "127.0.0.1", port);
    opts.set_credentials("responder", "pw");
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    tokio::spawn(async move {
        let mut products = std::collections::HashSet::new();
        let mut subscribed = false;
        loop {
            let event = match eventloop.poll().await {
                Ok(e) => e,
                Err(_) => return,
            };
            match event {
                Event::Incoming(Packet::ConnAck(_)) if !subscribed => {
                    subscribed = true;
                    let _ = client
                        .subscribe("admin/v1/+/request", QoS::AtLeastOnce)
                        .await;
                }
                Event::Incoming(Packet::Publish(p)) => {
                    let account = p.topic.split('/').nth(2).unwrap_or("").to_owned();
                    let Ok(req) = serde_json::from_slice::<Value>(&p.payload) else {
                        continue;
                    };
                    let rid = req["RequestId"].clone();
                    let pk = req["ProductKey"].as_str().unwrap_or("").to_owned();
                    let resp = match req["Action"].as_str() {
                        Some("CreateProduct") if products.contains(&pk) => json!({
                            "RequestId": rid, "Code": "Conflict",
                            "Message": format!("product {pk} exists")}),
                        Some("CreateProduct") => {
                            products.insert(pk);
                            json!({"RequestId": rid, "Code": "OK", "Message": "",
                                   "ProductSecret": SECRET})
                        }
                        Some("RegisterDevices") => {
                            let secrets: Vec<Value> = req["DeviceKeys"]
                                .as_array()
                                .cloned()
                                .unwrap_or_default()
                                .into_iter()
                                .map(|k| json!({"DeviceKey": k, "DeviceSecret": SECRET}))
                                .collect();
                            json!({"RequestId": rid, "Code": "OK", "Message": "",
                                   "DeviceSecrets": secrets})
                        }
                        Some("CreateOrder") => json!({
                            "RequestId": rid, "Code": "OK", "Message": "",
                            "OrderId": "order-1", "Quantity": req["Quantity"],
                            "ProductKey": req["ProductKey"]}),
                        _ => json!({"RequestId": rid, "Code": "InvalidParameter",
                                    "Message": "unknown action"}),
                    };
                    // An unrelated response first: setup must match RequestIds.
                    let _ = client
                        .publish(
                            format!("admin/v1/{account}/response"),
                            QoS::AtLeastOnce,
                            false,
                            json!({"RequestId": "someone-else", "Code": "OK"}).to_string(),
                        )
                        .await;
                    let _ = client
                        .publish(
                            format!("admin/v1/{account}/response"),
                            QoS::AtLeastOnce,
                            false,
                            resp.to_string(),
                        )
                        .await;
                }
                _ => {}
            }
        }
    })
}

async fn run_setup(port: &str, product_key: &str, extra: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_activation-sim"))
        .args([
            "setup",
            "--port",
            port,
            "--account",
            "admin",
            "--password",
            "pw",
            "--product-key",
            product_key,
            "--devices",
            "12",
            "--device-port",
            port,
            "--timeout",
            "5",
        ])
        .args(extra)
        .output()
        .await
        .expect("run setup")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_creates_product_and_order_and_prints_a_working_flood() {
    let ports = broker();
    let responder = spawn_admin_responder(ports.v4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let exe = env!("CARGO_BIN_EXE_activation-sim");
    let v4 = ports.port(4);
    let out = run_setup(&v4, "prodA", &[]).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("product secret: {SECRET}")),
        "{stdout}"
    );
    assert!(stdout.contains("order-1"), "{stdout}");
    let run_line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("run: "))
        .expect("flood command line");
    // The printed command works as printed.
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
    let flood = std::process::Command::new(exe)
        .args(&argv)
        .output()
        .expect("run flood");
    assert!(
        flood.status.success(),
        "{}",
        String::from_utf8_lossy(&flood.stdout)
    );

    // The same ProductKey again: the error code and message come through.
    let out = run_setup(&v4, "prodA", &[]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("CreateProduct failed: Conflict"),
        "{stderr}"
    );

    // device-secret: RegisterDevices secrets land in a file flood can use.
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = dir.path().join("secrets.json");
    let secrets_arg = secrets.display().to_string();
    let out = run_setup(
        &v4,
        "prodB",
        &[
            "--auth-mode",
            "device-secret",
            "--secrets-out",
            &secrets_arg,
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = sim(&[
        "flood",
        "--port",
        &v4,
        "--protocol",
        "4",
        "--product-key",
        "prodB",
        "--secrets",
        &secrets_arg,
        "--hold",
        "0",
        "--quiet",
    ])
    .await;
    assert_eq!((r.attempted, r.accepted), (12, 12), "{r:?}");
    responder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_ends_a_run_early_with_a_report() {
    let ports = broker();
    let p = ports.port(5);
    let cmd = parse_args([
        "activation-sim",
        "flood",
        "--port",
        &p,
        "--product-key",
        "pk1",
        "--product-secret",
        SECRET,
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
