//! MQTT 5 between clients, on the device listener inside a device's
//! namespace (rumqttc v5 devices, an application account publishing into
//! the namespace): No Local, Retain As Published, Retain Handling 0/1/2,
//! delivery at the lower of the published and granted QoS, the client's
//! Receive Maximum, Maximum Packet Size and Topic Alias Maximum, and the
//! listener's Server Keep Alive and Receive Maximum.
//!
//! Negative checks need no sleep: the router keeps each filter's messages
//! in order, so "not delivered" is "the next message on that filter is the
//! marker published after it".

use crate::common;

use std::time::Duration;

use activation_broker::admin::accounts::{hash_password, AccountConfig, RoleConfig};
use bytes::Bytes;
use common::broker::v5::incoming;
use common::broker::*;
use common::wire::{packet, read_connack, until_closed, RawConnect};
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Filter, Packet, Publish, RetainForwardRule};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, EventLoop, MqttOptions};
use tokio::io::AsyncWriteExt;

const PK: &str = "m5";

async fn broker() -> TestBroker {
    let t = start_broker(|c| {
        c.accounts = vec![AccountConfig {
            name: "app".into(),
            password_hash: hash_password("app-pw"),
            role: RoleConfig::Named("none".into()),
            publish: vec!["devices/#".into()],
            subscribe: vec!["devices/#".into()],
            deny_publish: Vec::new(),
            deny_subscribe: Vec::new(),
            events: false,
        }];
        c.devices.max_keep_alive_secs = 60;
        c.devices.receive_maximum = 3;
    })
    .await;
    t.product(PK, 10, 86_400).await;
    t
}

async fn connected(o: MqttOptions) -> (AsyncClient, EventLoop, Packet) {
    let (c, mut el) = AsyncClient::new(o, 64);
    let connack = incoming(&mut el).await;
    match &connack {
        Packet::ConnAck(a) => assert_eq!(a.code, ConnectReturnCode::Success),
        other => panic!("{other:?}"),
    }
    (c, el, connack)
}

async fn device(
    t: &TestBroker,
    dk: &str,
    tune: impl FnOnce(&mut MqttOptions),
) -> (AsyncClient, EventLoop, Packet) {
    let secret = t.broker.ledger.product(PK).expect("product").secret.clone();
    let (u, p) = t.creds(PK, dk, &secret);
    let addr = t.addr();
    let mut o = MqttOptions::new(format!("{PK}.{dk}"), addr.ip().to_string(), addr.port());
    o.set_credentials(u, p);
    o.set_keep_alive(Duration::from_secs(30));
    tune(&mut o);
    connected(o).await
}

async fn app(t: &TestBroker) -> (AsyncClient, EventLoop) {
    let addr = t.broker.accounts_addr();
    let mut o = MqttOptions::new("app", addr.ip().to_string(), addr.port());
    o.set_credentials("app", "app-pw");
    let (c, el, _) = connected(o).await;
    (c, el)
}

/// Polls `el` in the background, acknowledging nothing itself.
fn pump(mut el: EventLoop) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move { while el.poll().await.is_ok() {} })
}

async fn subscribe(c: &AsyncClient, el: &mut EventLoop, f: Filter) {
    c.subscribe_many(vec![f]).await.expect("queue");
    loop {
        if let Packet::SubAck(a) = incoming(el).await {
            assert!(
                a.return_codes.iter().all(|r| matches!(
                    r,
                    rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
                )),
                "{a:?}"
            );
            return;
        }
    }
}

async fn next_publish(el: &mut EventLoop) -> Publish {
    loop {
        if let Packet::Publish(p) = incoming(el).await {
            return p;
        }
    }
}

fn filter(path: &str, qos: QoS, tune: impl FnOnce(&mut Filter)) -> Filter {
    let mut f = Filter::new(path, qos);
    tune(&mut f);
    f
}

async fn publish(c: &AsyncClient, topic: &str, qos: QoS, retain: bool, payload: &'static str) {
    c.publish(topic, qos, retain, Bytes::from_static(payload.as_bytes()))
        .await
        .expect("queue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_options_hold_inside_a_device_namespace() {
    let t = broker().await;
    let (d, mut del, _) = device(&t, "d1", |_| {}).await;
    let (a, ael) = app(&t).await;
    let _app = pump(ael);
    let ns = format!("devices/{PK}/d1");

    // No Local: the device's own publish is not sent back to it.
    let own = format!("{ns}/own");
    subscribe(
        &d,
        &mut del,
        filter(&own, QoS::AtLeastOnce, |f| f.nolocal = true),
    )
    .await;
    publish(&d, &own, QoS::AtLeastOnce, false, "mine").await;
    loop {
        if let Packet::PubAck(_) = incoming(&mut del).await {
            break;
        }
    }
    publish(&a, &own, QoS::AtLeastOnce, false, "marker").await;
    assert_eq!(next_publish(&mut del).await.payload, "marker");

    // Retained messages, Retain As Published and Retain Handling.
    let r = format!("{ns}/r");
    publish(&a, &r, QoS::AtLeastOnce, true, "kept").await;
    // RH 2: none on subscribing.
    subscribe(
        &d,
        &mut del,
        filter(&r, QoS::AtLeastOnce, |f| {
            f.retain_forward_rule = RetainForwardRule::Never
        }),
    )
    .await;
    publish(&a, &r, QoS::AtMostOnce, false, "m1").await;
    let p = next_publish(&mut del).await;
    assert_eq!((p.payload.as_ref(), p.retain), (b"m1".as_ref(), false));
    // RH 1 on an existing subscription: none.
    subscribe(
        &d,
        &mut del,
        filter(&r, QoS::AtLeastOnce, |f| {
            f.retain_forward_rule = RetainForwardRule::OnNewSubscribe
        }),
    )
    .await;
    publish(&a, &r, QoS::AtMostOnce, false, "m2").await;
    assert_eq!(next_publish(&mut del).await.payload, "m2");
    // RH 0, now with Retain As Published: the retained message, retain 1,
    // then live ones with their own flag.
    subscribe(
        &d,
        &mut del,
        filter(&r, QoS::AtLeastOnce, |f| {
            f.retain_forward_rule = RetainForwardRule::OnEverySubscribe;
            f.preserve_retain = true;
        }),
    )
    .await;
    let p = next_publish(&mut del).await;
    assert_eq!((p.payload.as_ref(), p.retain), (b"kept".as_ref(), true));
    publish(&a, &r, QoS::AtMostOnce, true, "live-retained").await;
    let p = next_publish(&mut del).await;
    assert_eq!(
        (p.payload.as_ref(), p.retain),
        (b"live-retained".as_ref(), true)
    );
    // Without Retain As Published a live retained publish arrives with retain 0.
    let plain = format!("{ns}/plain");
    subscribe(&d, &mut del, filter(&plain, QoS::AtLeastOnce, |_| {})).await;
    publish(&a, &plain, QoS::AtMostOnce, true, "x").await;
    let p = next_publish(&mut del).await;
    assert_eq!((p.payload.as_ref(), p.retain), (b"x".as_ref(), false));

    // The lower of the published and the granted QoS.
    let q = format!("{ns}/q");
    subscribe(&d, &mut del, filter(&q, QoS::ExactlyOnce, |_| {})).await;
    publish(&a, &q, QoS::AtMostOnce, false, "q0").await;
    publish(&a, &q, QoS::AtLeastOnce, false, "q1").await;
    let (p0, p1) = (next_publish(&mut del).await, next_publish(&mut del).await);
    assert_eq!((p0.qos, p1.qos), (QoS::AtMostOnce, QoS::AtLeastOnce));
    // Clear the retained message (empty payload).
    publish(&a, &r, QoS::AtLeastOnce, true, "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_receive_maximum_packet_size_and_topic_aliases_are_kept() {
    let t = broker().await;
    let (d, mut del, connack) = device(&t, "d2", |o| {
        o.set_manual_acks(true);
        o.set_receive_maximum(Some(2));
        o.set_max_packet_size(Some(200));
        o.set_topic_alias_max(Some(2));
    })
    .await;
    // The listener's Receive Maximum and Server Keep Alive.
    let Packet::ConnAck(ack) = connack else {
        unreachable!()
    };
    let props = ack.properties.expect("CONNACK properties");
    assert_eq!(props.receive_max, Some(3));
    assert_eq!(props.server_keep_alive, None, "30 s is within the 60 s cap");
    let (a, ael) = app(&t).await;
    let _app = pump(ael);
    let topic = format!("devices/{PK}/d2/in");
    subscribe(&d, &mut del, filter(&topic, QoS::AtLeastOnce, |_| {})).await;

    for m in ["m1", "m2", "m3"] {
        publish(&a, &topic, QoS::AtLeastOnce, false, m).await;
    }
    // Too large for the device: never sent to it, and nothing stalls.
    a.publish(&topic, QoS::AtLeastOnce, false, vec![b'x'; 500])
        .await
        .expect("queue");
    publish(&a, &topic, QoS::AtMostOnce, false, "q0").await;
    // Two in flight; the QoS 0 message is not held behind the third.
    let got: Vec<Publish> = vec![
        next_publish(&mut del).await,
        next_publish(&mut del).await,
        next_publish(&mut del).await,
    ];
    let payloads: Vec<&[u8]> = got.iter().map(|p| p.payload.as_ref()).collect();
    assert_eq!(payloads, vec![b"m1".as_ref(), b"m2", b"q0"]);
    // Every delivery on the topic carries alias 1; only the first spells
    // the topic out.
    for (i, p) in got.iter().enumerate() {
        let expected: &[u8] = if i == 0 { topic.as_bytes() } else { b"" };
        assert_eq!(p.topic, expected);
        assert_eq!(p.properties.as_ref().and_then(|p| p.topic_alias), Some(1));
    }
    d.ack(&got[0]).await.expect("ack");
    let m3 = next_publish(&mut del).await;
    assert_eq!(m3.payload, "m3");
    d.ack(&got[1]).await.expect("ack");
    d.ack(&m3).await.expect("ack");
    publish(&a, &topic, QoS::AtLeastOnce, false, "after").await;
    let p = next_publish(&mut del).await;
    assert_eq!(p.payload, "after", "the oversized message was withheld");
    d.ack(&p).await.expect("ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_keep_alive_and_receive_maximum_of_the_listener() {
    let t = broker().await;
    let (d, _del, connack) = device(&t, "d3", |o| {
        o.set_keep_alive(Duration::from_secs(600));
    })
    .await;
    let Packet::ConnAck(ack) = connack else {
        unreachable!()
    };
    assert_eq!(ack.properties.and_then(|p| p.server_keep_alive), Some(60));
    d.disconnect().await.expect("queue");
    // A raw client sending more QoS 2 PUBLISHes than the Receive Maximum
    // (3) without completing them is disconnected with 0x93.
    let secret = t.broker.ledger.product(PK).expect("product").secret.clone();
    let (u, p) = t.creds(PK, "d4", &secret);
    let mut s = tokio::net::TcpStream::connect(t.addr()).await.expect("tcp");
    s.write_all(&RawConnect::new(5, &format!("{PK}.d4"), &u, &p).encode())
        .await
        .expect("write");
    assert_eq!(read_connack(&mut s).await, Some(0));
    for pkid in 1u16..=4 {
        let mut body = Vec::new();
        let topic = format!("devices/{PK}/d4/x");
        body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(&pkid.to_be_bytes());
        body.push(0); // no properties
        body.extend_from_slice(b"payload");
        s.write_all(&packet(0x34, &body)).await.expect("write");
    }
    let (bytes, closed) = until_closed(&mut s, WAIT).await;
    assert!(closed);
    // PUBRECs for the first three, then DISCONNECT 0x93.
    let mut rest = bytes.as_slice();
    let mut disconnect = None;
    while rest.len() >= 2 {
        let len = usize::from(rest[1]);
        if rest[0] == 0xE0 {
            disconnect = rest.get(2).copied();
        }
        rest = rest.get(2 + len..).unwrap_or_default();
    }
    assert_eq!(disconnect, Some(0x93), "{bytes:02X?}");
}
