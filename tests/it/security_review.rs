//! Regression tests for the findings of a security review, each against a
//! real broker and real clients: no lockout without credentials, devices
//! never reach the admin plane, the enforcer survives a lagging event bus,
//! and unknown account names cost the same argon2 verification as known ones.

use crate::common;

use activation_broker::admin::accounts::RoleConfig;
use activation_broker::config::Config;
use activation_broker::credentials::sign;
use activation_broker::events::{Event as BusEvent, EventKind};
use activation_broker::ledger::Command;
use common::broker::v5::{incoming, puback, suback};
use common::broker::{account, start_broker, v4, v5};
use common::wire::raw_connack;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, MqttOptions};
use serde_json::json;

const PK: &str = "rev";

/// Finding 1: the device's attempt bucket (burst 10 by default) is charged
/// only by attempts that carry its valid signature. Twenty CONNECTs naming
/// the victim with a wrong password cost their source, not the victim.
#[tokio::test]
async fn wrong_passwords_naming_a_device_do_not_lock_it_out() {
    let t = start_broker(|_| {}).await;
    assert_eq!(t.broker.config.gate.device_burst, 10.0, "default burst");
    let secret = t.product(PK, 10, 86_400).await;
    let (u, _) = t.creds(PK, "victim", &secret);
    for n in 0..20 {
        let level = if n % 2 == 0 { 4 } else { 5 };
        let bad = if level == 4 { 0x04 } else { 0x86 };
        let forged = sign("not-the-secret", &u);
        assert_eq!(
            raw_connack(t.addr(), level, "rev.victim", &u, &forged).await,
            Some(bad),
            "attempt {n}"
        );
    }
    let (u, p) = t.creds(PK, "victim", &secret);
    let (c, _el) = v5::connect(t.addr(), "rev.victim", &u, &p)
        .await
        .unwrap_or_else(|code| panic!("victim locked out: CONNACK 0x{code:02X}"));
    drop(c);
    // The device's own authenticated attempts are still limited.
    let mut codes = Vec::new();
    for _ in 0..12 {
        let (u, p) = t.creds(PK, "victim", &secret);
        codes.push(raw_connack(t.addr(), 5, "rev.victim", &u, &p).await);
    }
    assert!(codes.contains(&Some(0x9F)), "{codes:?}");
}

/// Finding 2: a namespace template that could reach the admin topics is a
/// configuration error naming the key; and even a broker built around such
/// templates (bypassing the config file) keeps devices out of `admin/#`.
#[tokio::test]
async fn devices_cannot_drive_the_admin_plane_whatever_the_templates_say() {
    for key in ["publish", "subscribe"] {
        let e = Config::parse(&format!("[namespace]\n{key} = [\"#\"]\n"), "t.toml")
            .expect_err("a template reaching admin/# is refused");
        assert!(e.to_string().contains(&format!("namespace.{key}")), "{e}");
    }
    let t = start_broker(|c| {
        c.namespace.publish = vec!["#".into()];
        c.namespace.subscribe = vec!["#".into()];
        c.accounts = vec![account(
            "admin",
            "admin-pw",
            RoleConfig::Named("admin".into()),
            false,
        )];
    })
    .await;
    let secret = t.product(PK, 10, 86_400).await;
    let (u, p) = t.creds(PK, "d", &secret);
    let (dev, mut del) = v5::connect(t.addr(), "rev.d", &u, &p)
        .await
        .unwrap_or_else(|c| panic!("CONNACK 0x{c:02X}"));
    dev.publish(
        "admin/v1/admin/request",
        QoS::AtLeastOnce,
        false,
        json!({"Action": "CreateProduct", "ProductKey": "evil", "Name": "x"}).to_string(),
    )
    .await
    .expect("queued");
    assert_eq!(puback(&mut del).await, PubAckReason::NotAuthorized);
    for f in ["admin/#", "admin/v1/admin/response", "$share/g/admin/v1/#"] {
        dev.subscribe(f, QoS::AtLeastOnce).await.expect("queued");
        assert_eq!(
            suback(&mut del).await,
            SubscribeReasonCode::NotAuthorized,
            "{f}"
        );
    }
    // Wildcards at the first level are allowed: they never match admin/…
    // (like `$` topics); checked below, the device receives none.
    for f in ["#", "+/v1/+/response"] {
        dev.subscribe(f, QoS::AtLeastOnce).await.expect("queued");
        assert!(
            matches!(suback(&mut del).await, SubscribeReasonCode::Success(_)),
            "{f}"
        );
    }
    // The templates still rule the rest.
    dev.publish("anything/else", QoS::AtLeastOnce, false, "x")
        .await
        .expect("queued");
    let mut acked = false;
    while !acked {
        match incoming(&mut del).await {
            Packet::PubAck(a) => {
                assert_eq!(a.reason, PubAckReason::Success);
                acked = true;
            }
            Packet::Publish(p) => assert_eq!(p.topic, "anything/else".as_bytes()),
            _ => {}
        }
    }
    // The operator's request on the same topic is served after the
    // device's (one commit log); the device's had no effect.
    let addr = t.broker.accounts_addr();
    let mut o = MqttOptions::new("ops", addr.ip().to_string(), addr.port());
    o.set_credentials("admin", "admin-pw");
    let (op, mut oel) = AsyncClient::new(o, 16);
    op.subscribe("admin/v1/admin/response", QoS::AtLeastOnce)
        .await
        .expect("queued");
    assert!(matches!(
        suback(&mut oel).await,
        SubscribeReasonCode::Success(_)
    ));
    op.publish(
        "admin/v1/admin/request",
        QoS::AtLeastOnce,
        false,
        json!({"Action": "DescribeProducts", "RequestId": "r"}).to_string(),
    )
    .await
    .expect("queued");
    loop {
        if let Packet::Publish(p) = incoming(&mut oel).await {
            let v: serde_json::Value = serde_json::from_slice(&p.payload).expect("json");
            if v["RequestId"] == json!("r") {
                break;
            }
        }
    }
    assert!(
        t.broker.ledger.product("evil").is_err(),
        "device created a product"
    );
    // The device's `#` saw neither the request nor the response.
    dev.publish("anything/marker", QoS::AtMostOnce, false, "m")
        .await
        .expect("queued");
    loop {
        if let Packet::Publish(p) = incoming(&mut del).await {
            assert!(!p.topic.starts_with(b"admin/"), "{:?}", p.topic);
            if p.topic == "anything/marker".as_bytes() {
                break;
            }
        }
    }
}

/// Finding 3: the enforcer falls behind a tiny event stream (16 events)
/// exactly while a device is deleted; it must resynchronise from the
/// ledger and disconnect the deleted device anyway.
#[tokio::test]
async fn a_deletion_lost_to_a_lagging_event_stream_still_disconnects() {
    let t = start_broker(|c| c.events.capacity = 16).await;
    let secret = t.product(PK, 10, 86_400).await;
    let (u, p) = t.creds(PK, "gone", &secret);
    let (_c, mut el) = v4::connect(t.addr(), "rev.gone", &u, &p)
        .await
        .unwrap_or_else(|c| panic!("CONNACK {c}"));
    let (u, p) = t.creds(PK, "stays", &secret);
    let (_c2, mut el2) = v4::connect(t.addr(), "rev.stays", &u, &p)
        .await
        .unwrap_or_else(|c| panic!("CONNACK {c}"));
    t.wait_online(PK, "gone", true).await;
    t.wait_online(PK, "stays", true).await;
    // This test runs on a single-threaded runtime, which also runs the
    // enforcer: while this thread waits for the deletion (done on another
    // thread) and then floods the stream, the enforcer cannot read, so the
    // `device/deleted` event is overwritten before it sees it.
    let ledger = t.broker.ledger.clone();
    std::thread::spawn(move || {
        ledger.execute_blocking(
            Command::DeleteDevice {
                product_key: PK.into(),
                device_key: "gone".into(),
            },
            None,
        )
    })
    .join()
    .expect("thread")
    .expect("deleted");
    for _ in 0..64 {
        t.broker
            .events
            .publish(BusEvent::new(EventKind::DeviceRejected, t.clock.now()));
    }
    // Keep both clients' event loops running while waiting.
    let drive = async {
        loop {
            tokio::select! {
                r = el.poll() => if r.is_err() { break },
                r = el2.poll() => if r.is_err() { break },
            }
        }
    };
    tokio::select! {
        _ = drive => {}
        _ = t.wait_online(PK, "gone", false) => {}
    }
    t.wait_online(PK, "gone", false).await;
    assert!(t.is_online(PK, "stays"), "a live device was disconnected");
}

/// Finding 5: a login with an unknown account name goes through the same
/// argon2 verification as one with a known name (against a dummy hash), so
/// its timing tells nothing. Asserted structurally: each attempt is one
/// verification, whatever the name.
#[tokio::test]
async fn unknown_account_names_cost_one_argon2_verification_like_known_ones() {
    let t = start_broker(|c| {
        c.accounts = vec![account(
            "ops",
            "ops-pw",
            RoleConfig::Named("viewer".into()),
            false,
        )];
    })
    .await;
    let addr = t.broker.accounts_addr();
    let accounts = t.broker.accounts.clone();
    let mut seen = accounts.verifications();
    for (level, name, pass, code) in [
        (4u8, "nobody", "x", Some(0x04)),
        (5, "nobody", "ops-pw", Some(0x86)),
        (4, "ops", "wrong", Some(0x04)),
        (5, "ops", "wrong", Some(0x86)),
        (5, "ops", "ops-pw", Some(0x00)),
    ] {
        assert_eq!(
            raw_connack(addr, level, "c", name, pass).await,
            code,
            "{name}"
        );
        let now = accounts.verifications();
        assert_eq!(now, seen + 1, "{name}/{pass}: one argon2 verification");
        seen = now;
    }
}
