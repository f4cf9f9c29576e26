//! Sessions in the connection layer: retained messages, persistent
//! sessions, wills, takeovers, disconnects by the registry, clean sessions
//! and shared subscriptions.

use activation_broker::events::EventKind;
use activation_broker::gateway::DisconnectReason;
use tokio::io::AsyncWriteExt;

use crate::common::gateway::*;

#[tokio::test]
async fn retained_messages_reach_later_subscribers() {
    let b = broker().await;
    let a = v5::connect(v5::device(b.addr, "a")).await.expect("a");
    a.client
        .publish("devices/p/a/state", v5::QoS::AtLeastOnce, true, "on")
        .await
        .expect("queued");
    // Once the observer sees the live copy the retained one is stored.
    let mut first = observer(b.addr, "devices/p/a/#").await;
    a.client
        .publish("devices/p/a/state", v5::QoS::AtLeastOnce, true, "on")
        .await
        .expect("queued");
    first.publish().await;
    let mut late = v4::connect(v4::opts(b.addr, "observer-2", "observer"))
        .await
        .expect("late observer");
    late.subscribe(&["devices/p/a/state"], v4::QoS::AtLeastOnce)
        .await;
    let p = late.publish().await;
    assert_eq!(p.topic, "devices/p/a/state");
    assert_eq!(&p.payload[..], b"on");
    assert!(p.retain);
}

/// Device `a` with a persistent session subscribed to `devices/p/a/down/#`,
/// disconnected; its options (clean session off) to come back with.
async fn persistent_session_left_offline(b: &mut Broker) -> v4::MqttOptions {
    let mut o = v4::device(b.addr, "a");
    o.set_clean_session(false);
    let mut a = v4::connect(o.clone()).await.expect("persistent");
    a.subscribe(&["devices/p/a/down/#"], v4::QoS::AtLeastOnce)
        .await;
    a.client.disconnect().await.expect("disconnect queued");
    wait_event(&mut b.events, EventKind::DeviceDisconnected, "a").await;
    o
}

#[tokio::test]
async fn persistent_session_gets_queued_messages_after_reconnect() {
    let mut b = broker().await;
    let o = persistent_session_left_offline(&mut b).await;

    let ob = v4::connect(v4::opts(b.addr, "observer-1", "observer"))
        .await
        .expect("observer");
    ob.client
        .publish(
            "devices/p/a/down/cmd",
            v4::QoS::AtLeastOnce,
            false,
            "while-away",
        )
        .await
        .expect("queued");
    // The observer's PUBACK proves the router took it.
    let mut ob = ob;
    ob.expect(|p| matches!(p, v4::Packet::PubAck(_)).then_some(()))
        .await;

    let mut a = v4::connect(o).await.expect("a again");
    assert!(a.session_present, "session resumed");
    let p = a.publish().await;
    assert_eq!(p.topic, "devices/p/a/down/cmd");
    assert_eq!(&p.payload[..], b"while-away");
}

#[tokio::test]
async fn will_is_published_on_abrupt_close() {
    let mut b = broker().await;
    let mut ob = observer(b.addr, "devices/p/w/#").await;
    let s = raw_connected(b.addr, 4, "w", 30, Some(("devices/p/w/status", "gone"))).await;
    wait_event(&mut b.events, EventKind::DeviceConnected, "w").await;
    drop(s);
    let p = ob.publish().await;
    assert_eq!(p.topic, "devices/p/w/status");
    assert_eq!(&p.payload[..], b"gone");
}

#[tokio::test]
async fn will_is_published_on_keepalive_expiry() {
    let mut b = broker().await;
    let mut ob = observer(b.addr, "devices/p/w/#").await;
    let mut s = raw_connected(b.addr, 5, "w", 1, Some(("devices/p/w/status", "expired"))).await;
    // Silent for 1.5 s: DISCONNECT 0x8D, close, will.
    let p = ob.publish().await;
    assert_eq!(&p.payload[..], b"expired");
    let bytes = until_closed(&mut s).await;
    assert_eq!(bytes.first(), Some(&0xE0));
    assert_eq!(bytes.get(2), Some(&0x8D));
    let e = wait_event(&mut b.events, EventKind::DeviceDisconnected, "w").await;
    assert!(e.to_json()["Reason"]
        .as_str()
        .unwrap_or("")
        .contains("KeepAlive"));
}

#[tokio::test]
async fn no_will_after_disconnect() {
    let mut b = broker().await;
    let mut ob = observer(b.addr, "devices/p/w/#").await;
    let mut s = raw_connected(b.addr, 4, "w", 30, Some(("devices/p/w/status", "gone"))).await;
    s.write_all(&[0xE0, 0x00]).await.expect("DISCONNECT");
    until_closed(&mut s).await;
    wait_event(&mut b.events, EventKind::DeviceDisconnected, "w").await;
    // The will would have been published before the event.
    assert_no_message_before_marker(&mut ob, "devices/p/w/marker").await;
}

#[tokio::test]
async fn session_takeover_closes_the_older_connection() {
    let mut b = broker().await;
    let mut first = v5::connect(v5::device(b.addr, "a")).await.expect("first");
    wait_event(&mut b.events, EventKind::DeviceConnected, "a").await;
    let mut second = v5::connect(v5::device(b.addr, "a")).await.expect("second");
    match first.closed().await {
        v5::ConnectionError::MqttState(v5::StateError::ServerDisconnect {
            reason_code, ..
        }) => {
            assert_eq!(reason_code, v5::DisconnectReasonCode::SessionTakenOver)
        }
        other => panic!("expected DISCONNECT 0x8E, got {other:?}"),
    }
    wait_event(&mut b.events, EventKind::DeviceDisconnected, "a").await;
    assert!(b.gateway.online().is_online("p.a"), "the new session stays");
    // The new connection works.
    second
        .subscribe(&["devices/p/a/#"], v5::QoS::AtLeastOnce)
        .await;
    second
        .client
        .publish("devices/p/a/x", v5::QoS::AtLeastOnce, false, "ok")
        .await
        .expect("queued");
    second.publish().await;

    // MQTT 3.1.1: the older socket is just closed.
    let mut old = v4::connect(v4::device(b.addr, "b")).await.expect("old");
    let _new = v4::connect(v4::device(b.addr, "b")).await.expect("new");
    old.closed().await;
}

#[tokio::test]
async fn registry_disconnects_with_reason() {
    let mut b = broker().await;
    let mut a = v5::connect(v5::device(b.addr, "a")).await.expect("a");
    wait_event(&mut b.events, EventKind::DeviceConnected, "a").await;
    assert!(b.gateway.online().disconnect(
        "p.a",
        DisconnectReason::NotAuthorized,
        "activation code expired"
    ));
    match a.closed().await {
        v5::ConnectionError::MqttState(v5::StateError::ServerDisconnect {
            reason_code,
            reason_string,
        }) => {
            assert_eq!(reason_code, v5::DisconnectReasonCode::NotAuthorized);
            assert_eq!(reason_string.as_deref(), Some("activation code expired"));
        }
        other => panic!("expected DISCONNECT 0x87, got {other:?}"),
    }
    let e = wait_event(&mut b.events, EventKind::DeviceDisconnected, "a").await;
    assert!(e.to_json()["Reason"]
        .as_str()
        .unwrap_or("")
        .contains("activation code expired"));
    assert!(!b.gateway.online().is_online("p.a"));

    let mut c = v4::connect(v4::device(b.addr, "c")).await.expect("c");
    wait_event(&mut b.events, EventKind::DeviceConnected, "c").await;
    assert_eq!(
        b.gateway.online().disconnect_product(
            "p",
            DisconnectReason::AdministrativeAction,
            "product deleted"
        ),
        1
    );
    c.closed().await;
}

#[tokio::test]
async fn will_outside_the_namespace_is_refused() {
    let b = broker().await;
    let mut s = raw(b.addr).await;
    s.write_all(&connect_bytes(
        5,
        "p.a",
        "p&a",
        30,
        Some(("devices/p/b/status", "x")),
    ))
    .await
    .expect("send");
    let bytes = until_closed(&mut s).await;
    assert_eq!(bytes.get(3), Some(&0x87), "{bytes:?}");
    let mut s = raw(b.addr).await;
    s.write_all(&connect_bytes(4, "p.a", "p&a", 30, Some(("admin/x", "x"))))
        .await
        .expect("send");
    assert_eq!(until_closed(&mut s).await, vec![0x20, 0x02, 0x00, 0x05]);
    assert!(b.gateway.online().is_empty());
}

#[tokio::test]
async fn takeover_keeps_a_persistent_session() {
    let mut b = broker().await;
    let mut o = v5::device(b.addr, "a");
    o.set_clean_start(false);
    let mut first = v5::connect(o.clone()).await.expect("first");
    first
        .subscribe(&["devices/p/a/down/#"], v5::QoS::AtLeastOnce)
        .await;
    wait_event(&mut b.events, EventKind::DeviceConnected, "a").await;

    let mut second = v5::connect(o).await.expect("second");
    first.closed().await;
    wait_event(&mut b.events, EventKind::DeviceDisconnected, "a").await;

    // The subscription moved with the session.
    let mut ob = v4::connect(v4::opts(b.addr, "observer-1", "observer"))
        .await
        .expect("observer");
    ob.client
        .publish("devices/p/a/down/cmd", v4::QoS::AtLeastOnce, false, "hi")
        .await
        .expect("queued");
    ob.expect(|p| matches!(p, v4::Packet::PubAck(_)).then_some(()))
        .await;
    let p = second.publish().await;
    assert_eq!(&p.topic[..], b"devices/p/a/down/cmd");
    assert!(b.gateway.online().is_online("p.a"));
}

#[tokio::test]
async fn idle_clean_sessions_hold_no_router_link() {
    let mut b = broker().await;
    let mut a = v4::connect(v4::device(b.addr, "a")).await.expect("a");
    let mut c = v5::connect(v5::device(b.addr, "c")).await.expect("c");
    let mut s = raw_connected(b.addr, 4, "w", 30, None).await;
    s.write_all(&[0xC0, 0x00]).await.expect("PINGREQ");
    assert!(matches!(read_v4(&mut s).await, Some(v4::Packet::PingResp)));
    assert_eq!(b.gateway.online().len(), 3);
    assert_eq!(b.gateway.linked_sessions(), 0, "idle sessions are unlinked");

    // The first SUBSCRIBE links a session, the first PUBLISH another.
    a.subscribe(&["devices/p/a/#"], v4::QoS::AtLeastOnce).await;
    assert_eq!(b.gateway.linked_sessions(), 1);
    // A PUBLISH the ACL drops needs no link; one it lets through does.
    for (topic, reason, linked) in [
        ("devices/p/a/x", v5::PubAckReason::NotAuthorized, 1),
        ("devices/p/c/x", v5::PubAckReason::Success, 2),
    ] {
        c.client
            .publish(topic, v5::QoS::AtLeastOnce, false, "hi")
            .await
            .expect("queued");
        let got = c
            .expect(|p| match p {
                v5::Packet::PubAck(a) => Some(a.reason),
                _ => None,
            })
            .await;
        assert_eq!(got, reason, "{topic}");
        assert_eq!(b.gateway.linked_sessions(), linked, "{topic}");
    }

    // A persistent session is linked from its CONNECT.
    let mut o = v4::device(b.addr, "b");
    o.set_clean_session(false);
    let _persistent = v4::connect(o).await.expect("b");
    assert_eq!(b.gateway.linked_sessions(), 3);

    drop(s);
    wait_event(&mut b.events, EventKind::DeviceDisconnected, "w").await;
    a.client.disconnect().await.expect("disconnect queued");
    wait_event(&mut b.events, EventKind::DeviceDisconnected, "a").await;
    assert_eq!(b.gateway.linked_sessions(), 2);
}

#[tokio::test]
async fn publish_and_disconnect_in_one_write_are_both_honoured() {
    let mut b = broker().await;
    let mut ob = observer(b.addr, "devices/p/a/#").await;
    let mut s = raw_connected(b.addr, 4, "a", 30, Some(("devices/p/a/will", "gone"))).await;
    let mut bytes = publish_bytes("devices/p/a/t", b"last words");
    bytes.extend_from_slice(&[0xE0, 0x00]);
    s.write_all(&bytes).await.expect("PUBLISH + DISCONNECT");
    until_closed(&mut s).await;
    wait_event(&mut b.events, EventKind::DeviceDisconnected, "a").await;
    let p = ob.publish().await;
    assert_eq!(p.topic, "devices/p/a/t");
    assert_eq!(&p.payload[..], b"last words");
    // No will after DISCONNECT.
    assert_no_message_before_marker(&mut ob, "devices/p/a/marker").await;
}

#[tokio::test]
async fn takeover_of_a_subscribed_session_by_an_idle_one() {
    let mut b = broker().await;
    let mut first = v4::connect(v4::device(b.addr, "a")).await.expect("first");
    first
        .subscribe(&["devices/p/a/#"], v4::QoS::AtLeastOnce)
        .await;
    let mut second = v4::connect(v4::device(b.addr, "a")).await.expect("second");
    first.closed().await;
    wait_event(&mut b.events, EventKind::DeviceDisconnected, "a").await;
    assert_eq!(b.gateway.linked_sessions(), 0, "the old link is closed");

    // The clean session starts without the old subscription; once it
    // subscribes it gets each message once.
    second
        .subscribe(&["devices/p/a/in"], v4::QoS::AtLeastOnce)
        .await;
    let ob = v4::connect(v4::opts(b.addr, "observer-1", "observer"))
        .await
        .expect("observer");
    for topic in ["devices/p/a/other", "devices/p/a/in"] {
        ob.client
            .publish(topic, v4::QoS::AtLeastOnce, false, topic)
            .await
            .expect("queued");
    }
    let p = second.publish().await;
    assert_eq!(p.topic, "devices/p/a/in");
    ob.client
        .publish("devices/p/a/in", v4::QoS::AtLeastOnce, false, "second")
        .await
        .expect("queued");
    assert_eq!(&second.publish().await.payload[..], b"second");
}

#[tokio::test]
async fn a_clean_session_discards_the_offline_persistent_one() {
    let mut b = broker().await;
    let o = persistent_session_left_offline(&mut b).await;

    let clean = v4::connect(v4::device(b.addr, "a")).await.expect("clean");
    assert!(!clean.session_present);
    clean.client.disconnect().await.expect("disconnect queued");
    wait_event(&mut b.events, EventKind::DeviceDisconnected, "a").await;

    let again = v4::connect(o).await.expect("persistent again");
    assert!(
        !again.session_present,
        "the clean session discarded the stored one"
    );
}

#[tokio::test]
async fn plain_and_shared_subscription_of_one_filter() {
    let b = broker().await;
    let mut a = v5::connect(v5::device(b.addr, "a")).await.expect("a");
    let codes = a
        .subscribe(
            &["devices/p/a/t", "$share/g/devices/p/a/t"],
            v5::QoS::AtLeastOnce,
        )
        .await;
    assert_eq!(codes.len(), 2);
    a.client
        .publish("devices/p/a/t", v5::QoS::AtLeastOnce, false, "x")
        .await
        .expect("queued");
    assert_eq!(&a.publish().await.payload[..], b"x");
    still_serving(b.addr).await;
}

// The gateway answers SUBACK itself once the SUBSCRIBE is in the router's
// channel (before the router has taken it, and for a device's first
// SUBSCRIBE before its router link is acknowledged): a message published
// by anyone after the SUBACK still reaches the new subscription. Rounds of
// a fresh device (its first SUBSCRIBE creates its link) and a second
// SUBSCRIBE on the linked session, each answered by a publish at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_sent_after_the_suback_reaches_the_subscriber() {
    let b = broker().await;
    let ob = v4::connect(v4::opts(b.addr, "observer-1", "observer"))
        .await
        .expect("observer");
    for round in 0..50 {
        let mut a = v4::connect(v4::device(b.addr, "a")).await.expect("a");
        for topic in ["devices/p/a/command", "devices/p/a/config"] {
            let codes = a.subscribe(&[topic], v4::QoS::AtLeastOnce).await;
            assert_eq!(
                codes,
                vec![v4::SubscribeReasonCode::Success(v4::QoS::AtLeastOnce)]
            );
            let payload = format!("{round} {topic}");
            ob.client
                .publish(topic, v4::QoS::AtMostOnce, false, payload.clone())
                .await
                .expect("queued");
            let got = a.publish().await;
            assert_eq!(
                (got.topic.as_str(), &got.payload[..]),
                (topic, payload.as_bytes())
            );
        }
        a.client.disconnect().await.expect("disconnect queued");
        a.closed().await;
    }
}

// A SUBSCRIBE partly outside the ACL: the codes in the filters' order,
// granted the QoS asked for; the allowed filters work.
#[tokio::test]
async fn a_partly_refused_subscribe_answers_every_filter_in_order() {
    let b = broker().await;
    let mut ob = observer(b.addr, "devices/p/a/#").await;
    let mut a = v5::connect(v5::device(b.addr, "a")).await.expect("a");
    let codes = a
        .subscribe(
            &[
                "devices/p/b/#",
                "devices/p/a/x",
                "$SYS/#",
                "devices/p/a/+/y",
            ],
            v5::QoS::ExactlyOnce,
        )
        .await;
    assert_eq!(
        codes,
        vec![
            v5::SubscribeReasonCode::NotAuthorized,
            v5::SubscribeReasonCode::Success(v5::QoS::ExactlyOnce),
            v5::SubscribeReasonCode::NotAuthorized,
            v5::SubscribeReasonCode::Success(v5::QoS::ExactlyOnce),
        ]
    );
    ob.client
        .publish("devices/p/a/x", v4::QoS::AtLeastOnce, false, "hi")
        .await
        .expect("queued");
    assert_eq!(&a.publish().await.payload[..], b"hi");
    assert_eq!(ob.publish().await.topic, "devices/p/a/x");
}
