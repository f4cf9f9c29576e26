//! Devices against the real broker (gate + ledger + connection layer) over
//! real sockets, with rumqttc v4 and v5 clients: SPEC §3 end to end.

use crate::common;

use std::time::Duration;

use activation_broker::events::EventKind;
use activation_broker::ledger::Command;
use common::broker::*;
use rumqttc::v5::mqttbytes::v5::Packet as P5;
use rumqttc::{Event, Packet, QoS};

const PK: &str = "p1";

/// Connects `dk` in both protocol versions and returns the two codes.
async fn both_codes(t: &TestBroker, id: &str, user: &str, pass: &str) -> (u8, u8) {
    let v5 = match v5::connect(t.addr(), id, user, pass).await {
        Ok(_) => 0,
        Err(c) => c,
    };
    let v4 = match v4::connect(t.addr(), id, user, pass).await {
        Ok(_) => 0,
        Err(c) => c,
    };
    (v5, v4)
}

#[tokio::test]
async fn a_device_with_valid_credentials_is_accepted_in_both_versions() {
    let t = start_broker(|_| {}).await;
    let secret = t.product(PK, 10, 3600).await;
    let (u, p) = t.creds(PK, "d4", &secret);
    v4::connect(t.addr(), "p1.d4", &u, &p)
        .await
        .expect("v4 accepted");
    let (u, p) = t.creds(PK, "d5", &secret);
    v5::connect(t.addr(), "p1.d5", &u, &p)
        .await
        .expect("v5 accepted");
    assert_eq!(t.consumed(), 2);
}

#[tokio::test]
async fn malformed_identifiers_get_0x85_and_0x02() {
    let t = start_broker(|_| {}).await;
    let secret = t.product(PK, 10, 3600).await;
    let (u, p) = t.creds(PK, "d1", &secret);
    assert_eq!(
        both_codes(&t, "p1.someone-else", &u, &p).await,
        (0x85, 0x02)
    );
    assert_eq!(both_codes(&t, "x", "p/1&d1&1", "00").await, (0x85, 0x02));
    assert_eq!(t.consumed(), 0);
}

#[tokio::test]
async fn bad_signature_stale_timestamp_and_unknown_product_get_0x86_and_0x04() {
    let t = start_broker(|_| {}).await;
    let secret = t.product(PK, 10, 3600).await;
    let (u, _) = t.creds(PK, "d1", &secret);
    assert_eq!(
        both_codes(&t, "p1.d1", &u, &"0".repeat(64)).await,
        (0x86, 0x04)
    );
    let stale = activation_broker::credentials::device_credentials(
        PK,
        "d1",
        &secret,
        t.clock.now() - 301_000,
    );
    assert_eq!(
        both_codes(&t, "p1.d1", &stale.0, &stale.1).await,
        (0x86, 0x04)
    );
    let (u, p) = t.creds("nope", "d1", &secret);
    assert_eq!(both_codes(&t, "nope.d1", &u, &p).await, (0x86, 0x04));
    let (code, reason) = raw_v5_connack(t.addr(), "nope.d1", &u, &p).await;
    assert_eq!(code, 0x86);
    assert_eq!(reason.as_deref(), Some("unknown product nope"));
    assert_eq!(t.consumed(), 0);
}

#[tokio::test]
async fn a_banned_source_gets_0x8a_and_0x05() {
    let t = start_broker(|c| c.gate.ban_after_failures = 3).await;
    let secret = t.product(PK, 10, 3600).await;
    let (u, _) = t.creds(PK, "d1", &secret);
    for _ in 0..3 {
        assert!(v4::connect(t.addr(), "p1.d1", &u, "00").await.is_err());
    }
    let (u, p) = t.creds(PK, "d1", &secret);
    assert_eq!(both_codes(&t, "p1.d1", &u, &p).await, (0x8A, 0x05));
    let (code, reason) = raw_v5_connack(t.addr(), "p1.d1", &u, &p).await;
    assert_eq!(code, 0x8A);
    assert!(reason.expect("reason").contains("banned"));
    assert_eq!(t.consumed(), 0);
}

#[tokio::test]
async fn too_many_attempts_get_0x9f_and_0x05() {
    let t = start_broker(|c| {
        c.gate.device_rate = 0.001;
        c.gate.device_burst = 1.0;
    })
    .await;
    let secret = t.product(PK, 10, 3600).await;
    let (u, p) = t.creds(PK, "d1", &secret);
    v5::connect(t.addr(), "p1.d1", &u, &p)
        .await
        .expect("first attempt");
    assert_eq!(both_codes(&t, "p1.d1", &u, &p).await, (0x9F, 0x05));
}

#[tokio::test]
async fn no_available_code_gets_0x97_and_0x05_with_a_reason_string() {
    let t = start_broker(|_| {}).await;
    let secret = t.product(PK, 1, 3600).await;
    let (u, p) = t.creds(PK, "d1", &secret);
    let _first = v5::connect(t.addr(), "p1.d1", &u, &p)
        .await
        .expect("takes the only code");
    let (u, p) = t.creds(PK, "d2", &secret);
    assert_eq!(both_codes(&t, "p1.d2", &u, &p).await, (0x97, 0x05));
    let (code, reason) = raw_v5_connack(t.addr(), "p1.d2", &u, &p).await;
    assert_eq!(
        (code, reason.as_deref()),
        (0x97, Some("no activation code available for product p1"))
    );
}

#[tokio::test]
async fn expired_code_with_renewal_off_or_blacklisted_gets_0x87_and_0x05() {
    let t = start_broker(|_| {}).await;
    let secret = t.product(PK, 10, 60).await;
    for dk in ["d1", "d2"] {
        let (u, p) = t.creds(PK, dk, &secret);
        let (c, mut el) = v4::connect(t.addr(), &format!("p1.{dk}"), &u, &p)
            .await
            .expect("first");
        c.disconnect().await.expect("disconnect");
        while el.poll().await.is_ok() {}
    }
    t.run(Command::SetAutoRenewal {
        product_key: PK.into(),
        enabled: false,
    })
    .await;
    t.run(Command::AddBlacklist {
        product_key: PK.into(),
        device_keys: vec!["d2".into()],
    })
    .await;
    t.advance(61);
    let (u, p) = t.creds(PK, "d1", &secret);
    assert_eq!(both_codes(&t, "p1.d1", &u, &p).await, (0x87, 0x05));
    t.run(Command::SetAutoRenewal {
        product_key: PK.into(),
        enabled: true,
    })
    .await;
    let (u, p) = t.creds(PK, "d2", &secret);
    assert_eq!(both_codes(&t, "p1.d2", &u, &p).await, (0x87, 0x05));
    let (u, p) = t.creds(PK, "d1", &secret);
    v5::connect(t.addr(), "p1.d1", &u, &p)
        .await
        .expect("renewal allowed again");
    assert_eq!(t.consumed(), 3);
}

#[tokio::test]
async fn store_unavailable_gets_0x88_and_0x03() {
    let t = start_broker(|_| {}).await;
    let secret = t.product(PK, 10, 3600).await;
    t.broker.ledger.set_read_only(true);
    let (u, p) = t.creds(PK, "d1", &secret);
    assert_eq!(both_codes(&t, "p1.d1", &u, &p).await, (0x88, 0x03));
    assert_eq!(t.consumed(), 0);
}

#[tokio::test]
async fn a_refused_client_leaves_no_state_and_burns_no_code() {
    let t = start_broker(|_| {}).await;
    let secret = t.product(PK, 1, 3600).await;
    let (u, p) = t.creds(PK, "d1", &secret);
    let _holder = v4::connect(t.addr(), "p1.d1", &u, &p)
        .await
        .expect("takes the code");
    let mut rejected = t.broker.events.subscribe();
    let (u2, p2) = t.creds(PK, "d2", &secret);
    assert_eq!(
        v4::connect(t.addr(), "p1.d2", &u2, &p2).await.err(),
        Some(0x05)
    );
    let ev = next_event(&mut rejected, EventKind::DeviceRejected).await;
    assert_eq!(ev.to_json()["ReasonCode"], "0x97");
    assert!(!t.is_online(PK, "d2"));
    assert!(
        t.broker.ledger.device(PK, "d2").is_err(),
        "no device record"
    );
    assert_eq!(t.broker.gateway.online().len(), 1);
    assert_eq!(t.consumed(), 1);
}

#[tokio::test]
async fn reconnect_while_valid_consumes_nothing_and_renews_after_expiry() {
    let t = start_broker(|_| {}).await;
    let secret = t.product(PK, 10, 5).await;
    for _ in 0..3 {
        let (u, p) = t.creds(PK, "d1", &secret);
        let (c, mut el) = v5::connect(t.addr(), "p1.d1", &u, &p)
            .await
            .expect("admitted");
        c.disconnect().await.expect("bye");
        while el.poll().await.is_ok() {}
        t.wait_online(PK, "d1", false).await;
    }
    assert_eq!(
        t.consumed(),
        1,
        "reconnects within validity consume nothing"
    );
    t.advance(5);
    let (u, p) = t.creds(PK, "d1", &secret);
    v4::connect(t.addr(), "p1.d1", &u, &p)
        .await
        .expect("renewed on reconnect");
    assert_eq!(t.consumed(), 2);
    let h = t
        .broker
        .ledger
        .history(PK, "d1", Default::default())
        .expect("history");
    assert_eq!(
        h.items[1].kind,
        activation_broker::ledger::CodeKind::Renewal
    );
}

#[tokio::test]
async fn an_online_device_is_renewed_when_its_code_expires() {
    let t = start_broker(|_| {}).await;
    let secret = t.product(PK, 10, 5).await;
    let (u, p) = t.creds(PK, "d1", &secret);
    let (_c, mut el) = v5::connect(t.addr(), "p1.d1", &u, &p)
        .await
        .expect("admitted");
    let pump = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let mut rx = t.broker.events.subscribe();
    t.advance(6);
    next_event(&mut rx, EventKind::DeviceExpired).await;
    let renewed = next_event(&mut rx, EventKind::DeviceRenewed).await;
    assert_eq!(renewed.to_json()["DeviceKey"], "d1");
    assert_eq!(t.consumed(), 2);
    assert!(t.is_online(PK, "d1"), "still connected");
    pump.abort();
}

/// Waits for the server's DISCONNECT on a v5 event loop; returns its reason code and string.
async fn server_disconnect(el: &mut rumqttc::v5::EventLoop) -> (u8, Option<String>) {
    tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(rumqttc::v5::Event::Incoming(P5::Disconnect(d))) => {
                    let code = d.reason_code as u8;
                    return (code, d.properties.and_then(|p| p.reason_string));
                }
                Err(rumqttc::v5::ConnectionError::MqttState(
                    rumqttc::v5::StateError::ServerDisconnect {
                        reason_code,
                        reason_string,
                    },
                )) => {
                    return (reason_code as u8, reason_string);
                }
                Ok(_) => {}
                Err(e) => panic!("closed without DISCONNECT: {e}"),
            }
        }
    })
    .await
    .expect("DISCONNECT in time")
}

#[tokio::test]
async fn an_online_device_that_cannot_renew_is_disconnected_with_0x87() {
    let t = start_broker(|_| {}).await;
    let secret = t.product(PK, 10, 5).await;
    let (u, p) = t.creds(PK, "d1", &secret);
    let (_c1, mut el1) = v5::connect(t.addr(), "p1.d1", &u, &p).await.expect("d1");
    let (u, p) = t.creds(PK, "d2", &secret);
    let (_c2, mut el2) = v5::connect(t.addr(), "p1.d2", &u, &p).await.expect("d2");
    t.run(Command::AddBlacklist {
        product_key: PK.into(),
        device_keys: vec!["d1".into()],
    })
    .await;
    t.run(Command::SetAutoRenewal {
        product_key: "p1".into(),
        enabled: true,
    })
    .await;
    t.advance(6);
    let (code, reason) = server_disconnect(&mut el1).await;
    assert_eq!(code, 0x87);
    assert!(reason.expect("reason string").contains("blacklist"));
    t.wait_online(PK, "d1", false).await;
    // d2 renews and stays.
    let mut rx = t.broker.events.subscribe();
    let pump = tokio::spawn(async move { while el2.poll().await.is_ok() {} });
    t.wait_online(PK, "d2", true).await;
    let _ = tokio::time::timeout(
        Duration::from_millis(200),
        next_event(&mut rx, EventKind::DeviceRenewed),
    )
    .await;
    assert_eq!(t.consumed(), 3);
    pump.abort();
}

#[tokio::test]
async fn deleting_an_online_device_or_its_product_disconnects_it() {
    let t = start_broker(|_| {}).await;
    let secret = t.product(PK, 10, 3600).await;
    let (u, p) = t.creds(PK, "d1", &secret);
    let (_c1, mut el1) = v5::connect(t.addr(), "p1.d1", &u, &p).await.expect("d1");
    let (u, p) = t.creds(PK, "d2", &secret);
    let (_c2, mut el2) = v5::connect(t.addr(), "p1.d2", &u, &p).await.expect("d2");
    t.run(Command::DeleteDevice {
        product_key: PK.into(),
        device_key: "d1".into(),
    })
    .await;
    assert_eq!(server_disconnect(&mut el1).await.0, 0x98);
    t.run(Command::DeleteProduct {
        product_key: PK.into(),
    })
    .await;
    let (code, reason) = server_disconnect(&mut el2).await;
    assert_eq!(code, 0x98);
    assert_eq!(reason.as_deref(), Some("product p1 was deleted"));
}

fn mosquitto_creds(secret: &str, user: &str) -> String {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "printf %s '{user}' | openssl dgst -sha256 -hmac '{secret}' | cut -d' ' -f2"
        ))
        .output()
        .expect("openssl (apt-get install openssl)");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_interoperate_with_openssl_computed_credentials() {
    let t = start_broker(|_| {}).await;
    let secret = t.product(PK, 10, 3600).await;
    let port = t.addr().port().to_string();
    // Real time: mosquitto clients sign with the shell's clock.
    let now = chrono::Utc::now().timestamp_millis();
    t.clock.set(now);
    let sub_user = format!("{PK}&sub&{now}");
    let sub = tokio::process::Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-V",
            "mqttv5",
            "-i",
            "p1.sub",
            "-u",
            &sub_user,
            "-P",
            &mosquitto_creds(&secret, &sub_user),
        ])
        .args(["-t", "devices/p1/sub/#", "-C", "1", "-W", "20"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub (apt-get install mosquitto-clients)");
    t.wait_online(PK, "sub", true).await;
    let pub_user = format!("{PK}&pub&{now}");
    let status = tokio::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-V",
            "mqttv311",
            "-i",
            "p1.pub",
            "-u",
            &pub_user,
            "-P",
            &mosquitto_creds(&secret, &pub_user),
        ])
        .args(["-t", "devices/p1/pub/telemetry", "-m", "21.5", "-q", "1"])
        .status()
        .await
        .expect("mosquitto_pub");
    assert!(status.success(), "mosquitto_pub accepted and published");
    let bad = tokio::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-V",
            "mqttv311",
            "-i",
            "p1.pub",
            "-u",
            &pub_user,
            "-P",
            "00",
            "-t",
            "devices/p1/pub/x",
            "-m",
            "x",
        ])
        .output()
        .await
        .expect("mosquitto_pub");
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("bad user name or password"), "{stderr}");
    // A back-end application (here a router link) sends the subscriber a command.
    let mut link = t
        .broker
        .gateway
        .router()
        .link("test-app", true)
        .await
        .expect("link");
    link.tx()
        .publish("devices/p1/sub/cmd", "on")
        .await
        .expect("publish");
    let out = tokio::time::timeout(WAIT, sub.wait_with_output())
        .await
        .expect("mosquitto_sub exits")
        .expect("output");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "on");
    assert_eq!(t.consumed(), 2, "two devices activated");
}

/// The first answer to a v4 CONNECT of `p1.d1` carrying a will on `will_topic`.
async fn connect_with_will(
    t: &TestBroker,
    user: &str,
    pass: &str,
    will_topic: &str,
) -> Result<Event, rumqttc::ConnectionError> {
    let mut o = rumqttc::MqttOptions::new("p1.d1", "127.0.0.1", t.addr().port());
    o.set_credentials(user, pass);
    o.set_last_will(rumqttc::LastWill::new(
        will_topic,
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    let (_c, mut el) = rumqttc::AsyncClient::new(o, 8);
    tokio::time::timeout(WAIT, el.poll())
        .await
        .expect("CONNACK in time")
}

#[tokio::test]
async fn a_will_outside_the_namespace_is_refused_before_any_code_is_consumed() {
    let t = start_broker(|_| {}).await;
    let secret = t.product(PK, 10, 3600).await;
    let (u, p) = t.creds(PK, "d1", &secret);
    let refused = connect_with_will(&t, &u, &p, "devices/p1/d2/status").await;
    assert!(
        matches!(
            refused,
            Err(rumqttc::ConnectionError::ConnectionRefused(
                rumqttc::ConnectReturnCode::NotAuthorized
            ))
        ),
        "{refused:?}"
    );
    assert_eq!(t.consumed(), 0);
    let ok = connect_with_will(&t, &u, &p, "devices/p1/d1/status").await;
    assert!(
        matches!(ok, Ok(Event::Incoming(Packet::ConnAck(_)))),
        "{ok:?}"
    );
    assert_eq!(t.consumed(), 1);
}

// A CONNECT the broker has no room for is refused before the
// gate runs, so it consumes no code (formerly 0x88 came after the code was
// consumed and the device's validity had started).
#[tokio::test]
async fn a_connect_the_broker_has_no_room_for_consumes_no_code() {
    let t = start_broker(|c| {
        c.router.max_connections = 1;
        c.router.reserved_for_accounts = 0;
    })
    .await;
    let secret = t.product(PK, 10, 3600).await;
    let (u, p) = t.creds(PK, "d1", &secret);
    let _d1 = v4::connect(t.addr(), "p1.d1", &u, &p)
        .await
        .expect("room for one session");
    assert_eq!(t.consumed(), 1);
    let (u2, p2) = t.creds(PK, "d2", &secret);
    assert_eq!(both_codes(&t, "p1.d2", &u2, &p2).await, (0x88, 0x03));
    assert_eq!(
        t.consumed(),
        1,
        "the refused device's code stays unconsumed"
    );
    assert!(!t.is_online(PK, "d2"));
    // A reconnect of the online device is a takeover: it needs no new
    // slot, and it is free.
    let _again = v5::connect(t.addr(), "p1.d1", &u, &p)
        .await
        .expect("takeover at capacity");
    assert_eq!(t.consumed(), 1);
}
