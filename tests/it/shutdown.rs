//! Wills at a graceful stop, black-box against the broker binary: at
//! SIGTERM an MQTT 5 device gets DISCONNECT 0x8B "server shutting
//! down", an MQTT 3.1.1 device's connection is closed, a will still waiting
//! out its MQTT 5 Will Delay Interval goes out at once, and all three wills
//! reach a backend subscriber (mosquitto_sub on the accounts listener)
//! before the broker exits 0.

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Command as Process, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use activation_broker::clock::Clock;
use activation_broker::credentials::device_credentials;
use common::child::{broker_bin, prepare_store, ChildBroker};

const WAIT: Duration = Duration::from_secs(10);
const STOP: Duration = Duration::from_secs(30);

/// A child process killed when the test ends, passed or not.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn sigterm_sends_the_wills_to_subscribers_and_tells_mqtt5_clients() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let secret = prepare_store(&data, "p", 10, 3600);
    let hash = Process::new(broker_bin())
        .args(["hash-password", "--password", "backend-pw"])
        .output()
        .expect("hash-password");
    let hash = String::from_utf8_lossy(&hash.stdout).trim().to_owned();
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "[devices]\nbind = \"127.0.0.1:0\"\n\
             [accounts_listener]\nbind = \"127.0.0.1:0\"\n\
             [http]\nbind = \"127.0.0.1:0\"\n\
             [gate]\nsource_rate = 0.0\ndevice_rate = 0.0\nban_after_failures = 0\n\
             [[accounts]]\nname = \"backend\"\npassword_hash = \"{hash}\"\n\
             subscribe = [\"devices/#\"]\nevents = true\n"
        ),
    )
    .expect("config");
    let mut broker = ChildBroker::start(&broker_bin(), &config, &data, None);
    let addr = broker.addr;
    let acc = broker.listener("accounts").port();

    // The backend: mosquitto_sub, until it is killed at the end of the test
    // (no message count: at the stop, d1's and d2's `device/disconnected`
    // events race their wills). Line-buffered: its lines are read as they
    // come.
    let mut sub = Process::new("stdbuf")
        .args(["-oL", "mosquitto_sub"])
        .args(["-h", "127.0.0.1", "-p", &acc.to_string(), "-V", "mqttv311"])
        .args(["-i", "backend-1", "-u", "backend", "-P", "backend-pw"])
        .args(["-t", "devices/+/+/status", "-q", "1", "-v", "-d"])
        .args(["-t", "admin/v1/events/device/disconnected"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_sub (apt-get install mosquitto-clients)");
    let (lines_tx, lines) = mpsc::channel::<String>();
    let out = sub.stdout.take().expect("stdout");
    let sub = Reaped(sub);
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    // One SUBSCRIBE with both filters.
    loop {
        let line = lines.recv_timeout(WAIT).expect("mosquitto_sub subscribes");
        if line.contains("SUBACK") {
            break;
        }
    }

    // Device d1, MQTT 3.1.1, and device d2, MQTT 5, each with a will.
    let now = Clock::system().now();
    let (u1, p1) = device_credentials("p", "d1", &secret, now);
    let mut o = rumqttc::MqttOptions::new("p.d1", "127.0.0.1", addr.port());
    o.set_credentials(u1, p1);
    o.set_last_will(rumqttc::LastWill::new(
        "devices/p/d1/status",
        "d1 gone",
        rumqttc::QoS::AtLeastOnce,
        false,
    ));
    let (_d1, mut el1) = rumqttc::AsyncClient::new(o, 8);
    let (u2, p2) = device_credentials("p", "d2", &secret, now);
    let mut o = rumqttc::v5::MqttOptions::new("p.d2", "127.0.0.1", addr.port());
    o.set_credentials(u2, p2);
    o.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
        "devices/p/d2/status",
        "d2 gone",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        false,
        None,
    ));
    let (_d2, mut el2) = rumqttc::v5::AsyncClient::new(o, 8);
    rt.block_on(async {
        loop {
            match tokio::time::timeout(WAIT, el1.poll()).await {
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a)))) => {
                    assert_eq!(a.code, rumqttc::ConnectReturnCode::Success);
                    break;
                }
                Ok(Ok(_)) => continue,
                other => panic!("d1 CONNACK: {other:?}"),
            }
        }
        loop {
            use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet};
            match tokio::time::timeout(WAIT, el2.poll()).await {
                Ok(Ok(rumqttc::v5::Event::Incoming(Packet::ConnAck(a)))) => {
                    assert_eq!(a.code, ConnectReturnCode::Success);
                    break;
                }
                Ok(Ok(_)) => continue,
                other => panic!("d2 CONNACK: {other:?}"),
            }
        }
    });

    // Device d3, MQTT 5: its will waits 600 s after its connection is lost,
    // its session 600 s. It is lost; the broker sees it gone (the event).
    let (u3, p3) = device_credentials("p", "d3", &secret, now);
    let mut o = rumqttc::v5::MqttOptions::new("p.d3", "127.0.0.1", addr.port());
    o.set_credentials(u3, p3);
    o.set_session_expiry_interval(Some(600));
    o.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
        "devices/p/d3/status",
        "d3 gone",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        false,
        Some(rumqttc::v5::mqttbytes::v5::LastWillProperties {
            delay_interval: Some(600),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        }),
    ));
    let (d3, mut el3) = rumqttc::v5::AsyncClient::new(o, 8);
    rt.block_on(async {
        loop {
            use rumqttc::v5::mqttbytes::v5::Packet;
            match tokio::time::timeout(WAIT, el3.poll()).await {
                Ok(Ok(rumqttc::v5::Event::Incoming(Packet::ConnAck(_)))) => break,
                Ok(Ok(_)) => continue,
                other => panic!("d3 CONNACK: {other:?}"),
            }
        }
    });
    // The socket closed without DISCONNECT.
    drop((d3, el3));
    loop {
        let line = lines.recv_timeout(WAIT).expect("d3's device/disconnected");
        if line.starts_with("admin/v1/events/device/disconnected") && line.contains("\"d3\"") {
            break;
        }
    }

    // SIGTERM; the devices' event loops see their connections end.
    let pid = broker.pid();
    let (d1_end, d2_end) = rt.block_on(async {
        let d1 = tokio::spawn(async move {
            loop {
                match tokio::time::timeout(STOP, el1.poll()).await {
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => return format!("{e:?}"),
                    Err(_) => return "no end".to_owned(),
                }
            }
        });
        let d2 = tokio::spawn(async move {
            use rumqttc::v5::mqttbytes::v5::Packet;
            loop {
                match tokio::time::timeout(STOP, el2.poll()).await {
                    Ok(Ok(rumqttc::v5::Event::Incoming(Packet::Disconnect(d)))) => {
                        return format!(
                            "DISCONNECT {:?} {:?}",
                            d.reason_code,
                            d.properties.and_then(|p| p.reason_string)
                        )
                    }
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => return format!("{e:?}"),
                    Err(_) => return "no end".to_owned(),
                }
            }
        });
        // SAFETY: a signal to our own child.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
        (d1.await.expect("d1 task"), d2.await.expect("d2 task"))
    });
    let deadline = std::time::Instant::now() + STOP;
    let status = loop {
        if let Ok(Some(s)) = broker.try_wait() {
            break Some(s);
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = broker.log_tail();
    assert!(
        status.is_some_and(|s| s.success()),
        "exit {status:?}:\n{log}"
    );
    // rumqttc reports the DISCONNECT as an error:
    // `MqttState(ServerDisconnect { reason_code, reason_string })`.
    assert!(
        d2_end.contains("ServerShuttingDown") && d2_end.contains("\"server shutting down\""),
        "the MQTT 5 device is told why: {d2_end}"
    );
    assert!(!d1_end.contains("no end"), "d1: {d1_end}");

    let mut got = Vec::new();
    while got.len() < 3 {
        match lines.recv_timeout(WAIT) {
            Ok(line) if line.starts_with("devices/") => got.push(line),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    got.sort();
    assert_eq!(
        got,
        [
            "devices/p/d1/status d1 gone",
            "devices/p/d2/status d2 gone",
            "devices/p/d3/status d3 gone"
        ],
        "the backend received every will:\n{log}"
    );
    drop(sub);
    assert!(
        log.contains("sessions ended") && log.contains("wills=3"),
        "{log}"
    );
}
