//! Admin topics behave like MQTT's `$` topics, end to end with real
//! clients: an account whose rights are `#` subscribes to `#`, `+/+/+/+`
//! and `+/v1/+/request` and receives every data topic but never an admin
//! request, response or event; `deny_subscribe` carves topics out of `#`
//! (no subscription inside them, no delivery through `#`, at any QoS) and
//! `deny_publish` out of the publish rights.

use crate::common;

use activation_broker::admin::accounts::{hash_password, AccountConfig, RoleConfig};
use bytes::Bytes;
use common::broker::*;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use serde_json::{json, Value};

fn account(
    name: &str,
    role: &str,
    events: bool,
    rights: &[&str],
    deny_publish: &[&str],
    deny_subscribe: &[&str],
) -> AccountConfig {
    let list = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    AccountConfig {
        name: name.into(),
        password_hash: hash_password(&format!("pw-{name}")),
        role: RoleConfig::Named(role.into()),
        publish: list(rights),
        subscribe: list(rights),
        deny_publish: list(deny_publish),
        deny_subscribe: list(deny_subscribe),
        events,
    }
}

async fn login(t: &TestBroker, name: &str) -> (AsyncClient, EventLoop) {
    let addr = t.broker.accounts_addr();
    let mut o = MqttOptions::new(name, addr.ip().to_string(), addr.port());
    o.set_credentials(name, format!("pw-{name}"));
    let (c, mut el) = AsyncClient::new(o, 64);
    let ev = tokio::time::timeout(WAIT, el.poll())
        .await
        .expect("CONNACK in time");
    assert!(
        matches!(ev, Ok(Event::Incoming(Packet::ConnAck(_)))),
        "{name}: {ev:?}"
    );
    (c, el)
}

/// Every packet until `f` returns `Some`.
async fn until<T>(
    el: &mut EventLoop,
    seen: &mut Vec<Packet>,
    mut f: impl FnMut(&Packet) -> Option<T>,
) -> T {
    tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(p)) => {
                    let done = f(&p);
                    seen.push(p);
                    if let Some(v) = done {
                        return v;
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("connection ended: {e}"),
            }
        }
    })
    .await
    .expect("in time")
}

async fn subscribe(c: &AsyncClient, el: &mut EventLoop, filter: &str) -> SubscribeReasonCode {
    c.subscribe(filter, QoS::ExactlyOnce).await.expect("queue");
    until(el, &mut Vec::new(), |p| match p {
        Packet::SubAck(a) => Some(a.return_codes[0]),
        _ => None,
    })
    .await
}

fn topics(seen: &[Packet]) -> Vec<String> {
    seen.iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some(String::from_utf8_lossy(&p.topic).into_owned()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_subscriber_never_receives_admin_topics_and_deny_lists_carve_out_topics() {
    let t = start_broker(|c| {
        c.accounts = vec![
            account("ops", "admin", true, &[], &[], &[]),
            account("watcher", "none", false, &["#"], &["ro/#"], &["secret/#"]),
        ]
    })
    .await;
    let (w, mut w_el) = login(&t, "watcher").await;
    for f in ["#", "+/+/+/+", "+/v1/+/request", "+/v1/events/#", "+/c/#"] {
        assert!(
            matches!(
                subscribe(&w, &mut w_el, f).await,
                SubscribeReasonCode::Success(_)
            ),
            "{f}"
        );
    }
    for f in [
        "admin/#",
        "admin/v1/ops/response",
        "$share/g/admin/#",
        "secret/#",
        "secret/x",
    ] {
        assert_eq!(
            subscribe(&w, &mut w_el, f).await,
            SubscribeReasonCode::NotAuthorized,
            "{f}"
        );
    }

    // An operator calls an action and receives its response and its event.
    let (ops, mut ops_el) = login(&t, "ops").await;
    for f in ["admin/v1/ops/response", "admin/v1/events/#"] {
        assert!(matches!(
            subscribe(&ops, &mut ops_el, f).await,
            SubscribeReasonCode::Success(_)
        ));
    }
    t.product("p1", 0, 3600).await;
    let body = json!({"Action": "DeleteProduct", "ProductKey": "p1", "Confirm": true});
    ops.publish(
        "admin/v1/ops/request",
        QoS::AtLeastOnce,
        false,
        body.to_string(),
    )
    .await
    .expect("queue");
    let mut got = Vec::new();
    let (mut response, mut event) = (false, false);
    until(&mut ops_el, &mut got, |p| {
        if let Packet::Publish(p) = p {
            response |= p.topic == "admin/v1/ops/response".as_bytes()
                && serde_json::from_slice::<Value>(&p.payload)
                    .is_ok_and(|v| v["Code"] != "Forbidden");
            event |= p.topic == "admin/v1/events/product/deleted".as_bytes();
        }
        (response && event).then_some(())
    })
    .await;

    // The watcher publishes everywhere it may; the denied ones at every QoS.
    let mut acks = Vec::new();
    for (topic, qos) in [
        ("secret/a", QoS::AtMostOnce),
        ("secret/b", QoS::AtLeastOnce),
        ("secret/c/x", QoS::ExactlyOnce),
        ("data/a", QoS::AtLeastOnce),
        ("ro/x", QoS::AtLeastOnce),
        ("admin/v1/ops/request", QoS::AtLeastOnce),
        ("data/done", QoS::ExactlyOnce),
    ] {
        w.publish(topic, qos, false, Bytes::from_static(b"x"))
            .await
            .expect("queue");
    }
    let mut seen = Vec::new();
    until(&mut w_el, &mut seen, |p| match p {
        Packet::PubAck(a) => {
            acks.push(a.reason);
            None
        }
        Packet::Publish(p) if p.topic == "data/done".as_bytes() => Some(()),
        _ => None,
    })
    .await;
    let received = topics(&seen);
    assert!(
        received
            .iter()
            .all(|t| !t.starts_with("admin/") && !t.starts_with("secret/")),
        "{received:?}"
    );
    assert!(received.contains(&"data/a".to_owned()), "{received:?}");
    assert!(!received.contains(&"ro/x".to_owned()), "{received:?}");
    // secret/b and data/a are allowed; ro/x and the admin topic are not.
    assert_eq!(
        acks.iter()
            .filter(|r| **r == PubAckReason::NotAuthorized)
            .count(),
        2,
        "{acks:?}"
    );
    // The session goes on: a later message still arrives.
    w.publish(
        "data/after",
        QoS::AtLeastOnce,
        false,
        Bytes::from_static(b"y"),
    )
    .await
    .expect("queue");
    until(&mut w_el, &mut seen, |p| match p {
        Packet::Publish(p) if p.topic == "data/after".as_bytes() => Some(()),
        _ => None,
    })
    .await;
}
