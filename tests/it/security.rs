//! Security over the wire: forged, stale, future and replayed credentials
//! never consume a code; device-secret products admit only registered
//! devices signing with their own secret; a device cannot reach another
//! namespace, `admin/#` or `$SYS/#` (live or retained), not even through
//! the router's reuse of connection slots.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use activation_broker::credentials::{device_credentials, sign, user_name};
use activation_broker::ledger::{AuthMode, Command, Outcome};
use common::broker::{start_broker, v4, v5, TestBroker, WAIT};
use common::wire::{raise_nofile, raw_connack, snapshot};
use rumqttc::v5::mqttbytes::v5::{PubAckReason, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::{Event, Packet, QoS};

const PK: &str = "sec";

fn unlimited(c: &mut activation_broker::config::Config) {
    c.gate.source_rate = 0.0;
    c.gate.device_rate = 0.0;
    c.gate.ban_after_failures = 0;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_forged_stale_future_and_replayed_connects_consume_nothing() {
    const ATTEMPTS: usize = 10_000;
    const CONCURRENCY: usize = 64;
    raise_nofile();
    let t = Arc::new(start_broker(unlimited).await);
    let secret = t.product(PK, 100, 86_400).await;
    // A device that connected once: its credentials are then replayed from
    // outside the window.
    let (u, p) = t.creds(PK, "victim", &secret);
    let (c, _el) = v4::connect(t.addr(), "sec.victim", &u, &p)
        .await
        .expect("victim connects");
    drop(c);
    let replayed = (u.clone(), p.clone());
    let before = snapshot(&t.broker.ledger);
    // Move the broker's clock beyond the window: the victim's credentials
    // are now stale, and every fresh DeviceKey's too.
    t.advance(301);
    let now = t.clock.now();
    let addr = t.addr();
    let sem = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = Vec::new();
    for n in 0..ATTEMPTS {
        let secret = secret.clone();
        let replayed = replayed.clone();
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.expect("semaphore");
            let dk = format!("forged{n}");
            let id = format!("{PK}.{dk}");
            let (kind, id, user, pass) = match n % 5 {
                // Wrong signature: signed with another secret.
                0 => {
                    let u = user_name(PK, &dk, now);
                    ("wrong-signature", id, u.clone(), sign("guessed", &u))
                }
                // Stale: 301 s old.
                1 => {
                    let (u, p) = device_credentials(PK, &dk, &secret, now - 301_000);
                    ("stale", id, u, p)
                }
                // Future: 301 s ahead.
                2 => {
                    let (u, p) = device_credentials(PK, &dk, &secret, now + 301_000);
                    ("future", id, u, p)
                }
                // Replayed, outside the window.
                3 => (
                    "replayed",
                    "sec.victim".to_owned(),
                    replayed.0.clone(),
                    replayed.1.clone(),
                ),
                // Valid signature over another device's user name.
                _ => {
                    let (u, p) = device_credentials(PK, "victim", &secret, now);
                    ("borrowed", id, u, p)
                }
            };
            let level = if n % 2 == 0 { 4 } else { 5 };
            (
                kind,
                level,
                raw_connack(addr, level, &id, &user, &pass).await,
            )
        }));
    }
    let mut by_outcome = std::collections::BTreeMap::new();
    for task in tasks {
        let (kind, level, code) = task.await.expect("task");
        *by_outcome.entry((kind, level, code)).or_insert(0) += 1;
    }
    eprintln!(
        "RELIABILITY: {ATTEMPTS} connects (wrong signature, stale, future, replayed, borrowed; v4+v5; {CONCURRENCY} at a time): {}",
        by_outcome
            .iter()
            .map(|((k, l, c), n)| format!("{n} {k}/v{l}->0x{:02x}", c.unwrap_or(0xff)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for ((kind, level, code), n) in &by_outcome {
        let expected = match (*kind, *level) {
            ("borrowed", 4) => Some(0x02), // client id is not the user name's device
            ("borrowed", _) => Some(0x85),
            (_, 4) => Some(0x04),
            _ => Some(0x86),
        };
        assert_eq!(*code, expected, "{n} × {kind} (v{level})");
    }
    assert_eq!(snapshot(&t.broker.ledger), before, "nothing consumed");
    assert!(t.broker.ledger.device(PK, "forged0").is_err());
    eprintln!("RELIABILITY: codes consumed by them: 0");
}

#[tokio::test]
async fn device_secret_products_refuse_unregistered_and_product_signed_devices() {
    let t = start_broker(unlimited).await;
    let Outcome::ProductCreated(p) = t
        .run(Command::CreateProduct {
            product_key: "ds".into(),
            name: "DS".into(),
            auth_mode: AuthMode::DeviceSecret,
        })
        .await
    else {
        panic!("product")
    };
    t.run(Command::CreateOrder {
        order_id: None,
        quantity: 10,
        validity_secs: 86_400,
        product_key: Some("ds".into()),
    })
    .await;
    let Outcome::DevicesRegistered { devices, .. } = t
        .run(Command::RegisterDevices {
            product_key: "ds".into(),
            device_keys: vec!["reg".into()],
        })
        .await
    else {
        panic!("register")
    };
    let reg_secret = devices[0].1.clone().expect("device secret");
    let before = snapshot(&t.broker.ledger);
    let addr = t.addr();
    for level in [4u8, 5] {
        let bad = if level == 4 { 0x04 } else { 0x86 };
        // Unregistered DeviceKey signing with the product secret.
        let (u, pw) = device_credentials("ds", "unreg", &p.secret, t.clock.now());
        assert_eq!(
            raw_connack(addr, level, "ds.unreg", &u, &pw).await,
            Some(bad)
        );
        // Unregistered DeviceKey signing with a registered device's secret.
        let (u, pw) = device_credentials("ds", "unreg", &reg_secret, t.clock.now());
        assert_eq!(
            raw_connack(addr, level, "ds.unreg", &u, &pw).await,
            Some(bad)
        );
        // The registered device signing with the product secret.
        let (u, pw) = device_credentials("ds", "reg", &p.secret, t.clock.now());
        assert_eq!(raw_connack(addr, level, "ds.reg", &u, &pw).await, Some(bad));
    }
    assert_eq!(snapshot(&t.broker.ledger), before, "nothing consumed");
    // Its own secret admits it (one code).
    let (u, pw) = device_credentials("ds", "reg", &reg_secret, t.clock.now());
    assert_eq!(raw_connack(addr, 5, "ds.reg", &u, &pw).await, Some(0));
    assert_eq!(snapshot(&t.broker.ledger).counters.1, before.counters.1 + 1);
    eprintln!(
        "RELIABILITY: 6 CONNECTs (v4, v5: an unregistered device signing with the product secret or a registered device's secret; the registered device signing with the product secret) refused 0x04/0x86, codes consumed by them 0; the registered device with its own secret: CONNACK 0, {} code consumed",
        snapshot(&t.broker.ledger).counters.1 - before.counters.1
    );
}

async fn connected(
    t: &TestBroker,
    secret: &str,
    dk: &str,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let (u, p) = t.creds(PK, dk, secret);
    v4::connect(t.addr(), &format!("{PK}.{dk}"), &u, &p)
        .await
        .unwrap_or_else(|c| panic!("{dk}: CONNACK {c}"))
}

/// Polls `el` until a SUBACK arrives; returns its codes.
async fn suback(el: &mut rumqttc::EventLoop) -> Vec<rumqttc::SubscribeReasonCode> {
    tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(a))) => return a.return_codes,
                Ok(_) => {}
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
    .expect("SUBACK")
}

/// Every PUBLISH `el` receives until `marker` (a topic) arrives.
async fn publishes_until(el: &mut rumqttc::EventLoop, marker: &str) -> Vec<String> {
    tokio::time::timeout(WAIT, async {
        let mut got = Vec::new();
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if p.topic == marker {
                        return got;
                    }
                    got.push(p.topic.clone());
                }
                Ok(_) => {}
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("marker {marker} never arrived"))
}

#[tokio::test]
async fn a_device_cannot_write_into_or_read_from_other_namespaces_live_or_retained() {
    let t = start_broker(unlimited).await;
    let secret = t.product(PK, 10, 86_400).await;
    // B listens to its own namespace.
    let (b, mut bel) = connected(&t, &secret, "b").await;
    b.subscribe("devices/sec/b/#", QoS::AtLeastOnce)
        .await
        .expect("queue");
    assert_eq!(
        suback(&mut bel).await,
        vec![rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    // A writes into B's namespace, admin and $SYS, live and retained.
    let (a, mut ael) = connected(&t, &secret, "a").await;
    for topic in [
        "devices/sec/b/cmd",
        "devices/sec/b/telemetry",
        "admin/v1/admin/request",
        "admin/v1/events/device/activated",
        "$SYS/broker/x",
    ] {
        for retain in [false, true] {
            a.publish(topic, QoS::AtLeastOnce, retain, "spoof")
                .await
                .expect("queue");
        }
    }
    // A's own marker tells when A's packets have all been through the
    // broker (same connection, in order).
    a.subscribe("devices/sec/a/#", QoS::AtLeastOnce)
        .await
        .expect("queue");
    a.publish("devices/sec/a/marker", QoS::AtLeastOnce, false, "m")
        .await
        .expect("queue");
    let leaked_to_a = publishes_until(&mut ael, "devices/sec/a/marker").await;
    assert!(leaked_to_a.is_empty(), "{leaked_to_a:?}");
    // B's own marker: everything before it in B's stream came from A.
    b.publish("devices/sec/b/marker", QoS::AtLeastOnce, false, "m")
        .await
        .expect("queue");
    let seen_by_b = publishes_until(&mut bel, "devices/sec/b/marker").await;
    assert!(seen_by_b.is_empty(), "A reached B: {seen_by_b:?}");
    // Nothing retained either: a new subscriber of B's namespace gets only
    // B's own retained marker.
    b.publish("devices/sec/b/rmarker", QoS::AtLeastOnce, true, "m")
        .await
        .expect("queue");
    let _ = publishes_until(&mut bel, "devices/sec/b/rmarker").await;
    let (b2, mut b2el) = connected(&t, &secret, "b").await;
    b2.subscribe("devices/sec/b/#", QoS::AtLeastOnce)
        .await
        .expect("queue");
    let retained = publishes_until(&mut b2el, "devices/sec/b/rmarker").await;
    assert!(
        retained.is_empty(),
        "retained spoof reached B: {retained:?}"
    );
    // And A cannot subscribe to B, admin, $SYS, or wildcards reaching past
    // its own namespace.
    let outside = [
        "devices/sec/b/#",
        "admin/#",
        "$SYS/#",
        "#",
        "devices/+/b/#",
        "+/#",
        "devices/sec/#",
        "devices/+/a/#",
    ];
    for f in outside {
        a.subscribe(f, QoS::AtLeastOnce).await.expect("queue");
        assert_eq!(
            suback(&mut ael).await,
            vec![rumqttc::SubscribeReasonCode::Failure],
            "{f}"
        );
    }
    // MQTT 5: 0x87 on SUBACK and PUBACK outside the namespace, and B never
    // sees the publish.
    let (u, p) = t.creds(PK, "c", &secret);
    let (c5, mut c5el) = v5::connect(t.addr(), "sec.c", &u, &p)
        .await
        .unwrap_or_else(|c| panic!("c: CONNACK {c}"));
    c5.subscribe("devices/sec/b/#", Q5::AtLeastOnce)
        .await
        .expect("queue");
    assert_eq!(
        v5::suback(&mut c5el).await,
        SubscribeReasonCode::NotAuthorized
    );
    c5.publish("devices/sec/b/cmd/x", Q5::AtLeastOnce, false, "spoof")
        .await
        .expect("queue");
    assert_eq!(v5::puback(&mut c5el).await, PubAckReason::NotAuthorized);
    // (B's second connection took over from the first.)
    b2.publish("devices/sec/b/marker5", QoS::AtLeastOnce, false, "m")
        .await
        .expect("queue");
    let seen_by_b5 = publishes_until(&mut b2el, "devices/sec/b/marker5").await;
    assert!(seen_by_b5.is_empty(), "C reached B: {seen_by_b5:?}");
    eprintln!(
        "RELIABILITY: 10 publishes (live and retained) into another device's namespace, admin/ and $SYS/: {} delivered live to either device, {} retained for a new subscriber; {} subscriptions outside its namespace: SUBACK failure each",
        leaked_to_a.len() + seen_by_b.len(),
        retained.len(),
        outside.len()
    );
}

/// The router reuses connection slots. A subscriber that leaves while it
/// waits for data must not hand its subscription to whoever gets its slot
/// next: device D (never subscribed to anything) must not receive
/// messages for A's namespace.
#[tokio::test]
async fn a_recycled_router_slot_does_not_inherit_another_devices_subscription() {
    let t = start_broker(unlimited).await;
    let secret = t.product(PK, 50, 86_400).await;
    for round in 0..5 {
        // A subscribes, is parked waiting for data, and leaves.
        let (a, mut ael) = connected(&t, &secret, "a").await;
        a.subscribe("devices/sec/a/#", QoS::AtLeastOnce)
            .await
            .expect("queue");
        let _ = suback(&mut ael).await;
        a.publish("devices/sec/a/warm", QoS::AtLeastOnce, false, "w")
            .await
            .expect("queue");
        let _ = publishes_until(&mut ael, "devices/sec/a/warm").await;
        a.disconnect().await.expect("queue");
        let _ = tokio::time::timeout(WAIT, async { while ael.poll().await.is_ok() {} }).await;
        t.wait_online(PK, "a", false).await;
        // D takes the freed slot and subscribes only to its own namespace.
        let dk = format!("d{round}");
        let (d, mut del) = connected(&t, &secret, &dk).await;
        d.subscribe(format!("devices/sec/{dk}/#"), QoS::AtLeastOnce)
            .await
            .expect("queue");
        let _ = suback(&mut del).await;
        // A comes back (another slot) and publishes in its namespace.
        let (a2, mut a2el) = connected(&t, &secret, "a").await;
        a2.publish("devices/sec/a/secret", QoS::AtLeastOnce, false, "s")
            .await
            .expect("queue");
        a2.subscribe("devices/sec/a/#", QoS::AtLeastOnce)
            .await
            .expect("queue");
        a2.publish("devices/sec/a/done", QoS::AtLeastOnce, false, "x")
            .await
            .expect("queue");
        let _ = publishes_until(&mut a2el, "devices/sec/a/done").await;
        d.publish(
            format!("devices/sec/{dk}/marker"),
            QoS::AtLeastOnce,
            false,
            "m",
        )
        .await
        .expect("queue");
        let leaked = publishes_until(&mut del, &format!("devices/sec/{dk}/marker")).await;
        assert!(leaked.is_empty(), "round {round}: {dk} received {leaked:?}");
        let _ = a2.disconnect().await;
        let _ = d.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while a2el.poll().await.is_ok() {}
        })
        .await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while del.poll().await.is_ok() {}
        })
        .await;
    }
    eprintln!(
        "RELIABILITY: 5 rounds of a subscriber leaving while parked and another device taking its router slot: 0 messages of the old subscription reached the new device"
    );
    let _ = v5::code;
}
