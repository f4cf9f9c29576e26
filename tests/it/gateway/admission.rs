//! Admission by the connection layer: refusals with their exact CONNACK
//! codes, and the device namespace (subscriptions and publishes outside it
//! fail, QoS 0/1/2 inside it arrive).

use activation_broker::events::EventKind;
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::common::gateway::*;

#[tokio::test]
async fn admits_v4_and_v5_and_reports_them_online() {
    let mut b = broker().await;
    let c4 = v4::connect(v4::device(b.addr, "a"))
        .await
        .expect("v4 admitted");
    assert!(!c4.session_present);
    let e = wait_event(&mut b.events, EventKind::DeviceConnected, "a").await;
    assert_eq!(e.field("ProductKey").and_then(|v| v.as_str()), Some("p"));
    assert_eq!(e.field("Protocol").and_then(|v| v.as_str()), Some("3.1.1"));

    let _c5 = v5::connect(v5::device(b.addr, "b"))
        .await
        .expect("v5 admitted");
    wait_event(&mut b.events, EventKind::DeviceConnected, "b").await;

    let online = b.gateway.online();
    assert!(online.is_online("p.a"));
    assert!(online.is_online("p.b"));
    let info = online.get("p.b").expect("b online");
    assert_eq!(info.identity.device_key(), Some("b"));
    assert_eq!(online.list().len(), 2);

    c4.client.disconnect().await.expect("disconnect queued");
    let e = wait_event(&mut b.events, EventKind::DeviceDisconnected, "a").await;
    assert!(e.field("Reason").is_some());
    assert!(!online.is_online("p.a"));
}

#[tokio::test]
async fn empty_client_id_gets_the_assigned_one() {
    let mut b = broker().await;
    let mut s = raw(b.addr).await;
    s.write_all(&connect_bytes(5, "", "p&c", 30, None))
        .await
        .expect("send");
    match read_v5(&mut s).await {
        Some(v5::Packet::ConnAck(a)) => {
            assert_eq!(a.code, v5::ConnectReturnCode::Success);
            let props = a.properties.expect("v5 CONNACK properties");
            assert_eq!(props.assigned_client_identifier.as_deref(), Some("p.c"));
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    wait_event(&mut b.events, EventKind::DeviceConnected, "c").await;
    assert!(b.gateway.online().is_online("p.c"));
}

#[tokio::test]
async fn refusals_carry_the_exact_connack_code_v4() {
    let b = broker().await;
    for (_, user, _, v4_code) in REFUSALS {
        let err = v4::connect(v4::opts(b.addr, "p.a", user))
            .await
            .err()
            .expect("refused");
        let want = match v4_code {
            0x02 => v4::ConnectReturnCode::BadClientId,
            0x03 => v4::ConnectReturnCode::ServiceUnavailable,
            0x04 => v4::ConnectReturnCode::BadUserNamePassword,
            _ => v4::ConnectReturnCode::NotAuthorized,
        };
        assert!(
            matches!(&err, v4::ConnectionError::ConnectionRefused(c) if *c == want),
            "{user}: {err:?}"
        );

        // Byte-exact, and the socket is closed right after.
        let mut s = raw(b.addr).await;
        s.write_all(&connect_bytes(4, "p.a", user, 30, None))
            .await
            .expect("send");
        let bytes = until_closed(&mut s).await;
        assert_eq!(bytes, vec![0x20, 0x02, 0x00, v4_code], "{user}");
    }
    assert!(
        b.gateway.online().is_empty(),
        "no refused client registered"
    );
}

#[tokio::test]
async fn refusals_carry_the_exact_connack_code_and_reason_v5() {
    let b = broker().await;
    for (code, user, v5_code, _) in REFUSALS {
        let err = v5::connect(v5::opts(b.addr, "p.a", user))
            .await
            .err()
            .expect("refused");
        let want = match v5_code {
            0x85 => v5::ConnectReturnCode::ClientIdentifierNotValid,
            0x86 => v5::ConnectReturnCode::BadUserNamePassword,
            0x8A => v5::ConnectReturnCode::Banned,
            0x9F => v5::ConnectReturnCode::ConnectionRateExceeded,
            0x97 => v5::ConnectReturnCode::QuotaExceeded,
            0x87 => v5::ConnectReturnCode::NotAuthorized,
            _ => v5::ConnectReturnCode::ServerUnavailable,
        };
        assert!(
            matches!(&err, v5::ConnectionError::ConnectionRefused(c) if *c == want),
            "{user}: {err:?}"
        );

        let mut s = raw(b.addr).await;
        s.write_all(&connect_bytes(5, "p.a", user, 30, None))
            .await
            .expect("send");
        let bytes = until_closed(&mut s).await;
        assert_eq!(bytes[0], 0x20);
        assert_eq!(bytes[3], v5_code, "{user}");
        let mut buf = BytesMut::from(&bytes[..]);
        match v5::Packet::read(&mut buf, None) {
            Ok(v5::Packet::ConnAck(v5::ConnAck {
                properties: Some(props),
                ..
            })) => assert_eq!(
                props.reason_string.as_deref(),
                Some(format!("refused: {}", code.as_str()).as_str())
            ),
            other => panic!("expected CONNACK with properties, got {other:?}"),
        }
        assert_eq!(buf.len(), 0, "nothing after the CONNACK");
    }
    assert!(
        b.gateway.online().is_empty(),
        "no refused client registered"
    );
}

#[tokio::test]
async fn wrong_password_and_foreign_client_id_are_refused() {
    let b = broker().await;
    let mut o = v5::device(b.addr, "a");
    o.set_credentials("p&a", "wrong");
    let err = v5::connect(o).await.err().expect("refused");
    assert!(matches!(
        err,
        v5::ConnectionError::ConnectionRefused(v5::ConnectReturnCode::BadUserNamePassword)
    ));
    let err = v4::connect(v4::opts(b.addr, "p.b", "p&a"))
        .await
        .err()
        .expect("refused");
    assert!(matches!(
        err,
        v4::ConnectionError::ConnectionRefused(v4::ConnectReturnCode::BadClientId)
    ));
    // Empty client id with a persistent session is refused before the gate.
    let mut s = raw(b.addr).await;
    s.write_all(&connect_bytes_clean(4, "", "p&a", 30, None, false))
        .await
        .expect("send");
    assert_eq!(until_closed(&mut s).await, vec![0x20, 0x02, 0x00, 0x02]);
}

const FORBIDDEN: [&str; 6] = [
    "#",
    "+/#",
    "devices/p/b/#",
    "admin/#",
    "$SYS/#",
    "devices/+/a/#",
];

#[tokio::test]
async fn subscriptions_outside_the_namespace_fail_v4() {
    let b = broker().await;
    let mut a = v4::connect(v4::device(b.addr, "a")).await.expect("a");
    let codes = a.subscribe(&FORBIDDEN, v4::QoS::AtLeastOnce).await;
    assert_eq!(
        codes,
        vec![v4::SubscribeReasonCode::Failure; FORBIDDEN.len()]
    );

    // Mixed: codes stay in filter order.
    let codes = a
        .subscribe(&["admin/#", "devices/p/a/+/x", "#"], v4::QoS::AtLeastOnce)
        .await;
    assert_eq!(
        codes,
        vec![
            v4::SubscribeReasonCode::Failure,
            v4::SubscribeReasonCode::Success(v4::QoS::AtLeastOnce),
            v4::SubscribeReasonCode::Failure
        ]
    );
    let codes = a.subscribe(&["devices/p/a/#"], v4::QoS::AtLeastOnce).await;
    assert_eq!(
        codes,
        vec![v4::SubscribeReasonCode::Success(v4::QoS::AtLeastOnce)]
    );

    // b publishes in its namespace; a must see only its own marker.
    let bc = v4::connect(v4::device(b.addr, "b")).await.expect("b");
    bc.client
        .publish("devices/p/b/secret", v4::QoS::AtLeastOnce, false, "x")
        .await
        .expect("queued");
    let mut ob = observer(b.addr, "devices/p/b/#").await;
    bc.client
        .publish("devices/p/b/secret", v4::QoS::AtLeastOnce, false, "y")
        .await
        .expect("queued");
    assert_eq!(ob.publish().await.topic, "devices/p/b/secret");
    a.client
        .publish("devices/p/a/marker", v4::QoS::AtLeastOnce, false, "m")
        .await
        .expect("queued");
    assert_eq!(a.publish().await.topic, "devices/p/a/marker");
}

#[tokio::test]
async fn subscriptions_outside_the_namespace_fail_v5() {
    let b = broker().await;
    let mut a = v5::connect(v5::device(b.addr, "a")).await.expect("a");
    let codes = a.subscribe(&FORBIDDEN, v5::QoS::AtLeastOnce).await;
    assert_eq!(
        codes,
        vec![v5::SubscribeReasonCode::NotAuthorized; FORBIDDEN.len()]
    );
    let codes = a
        .subscribe(&["devices/p/a/#", "devices/p/b/#"], v5::QoS::AtMostOnce)
        .await;
    assert_eq!(
        codes,
        vec![
            v5::SubscribeReasonCode::Success(v5::QoS::AtMostOnce),
            v5::SubscribeReasonCode::NotAuthorized
        ]
    );
}

#[tokio::test]
async fn publishes_outside_the_namespace_are_dropped() {
    let b = broker().await;
    let mut ob = observer(b.addr, "devices/#").await;

    // MQTT 5: PUBACK 0x87.
    let mut a = v5::connect(v5::device(b.addr, "a")).await.expect("a");
    a.client
        .publish("devices/p/b/spoof", v5::QoS::AtLeastOnce, false, "x")
        .await
        .expect("queued");
    let reason = a
        .expect(|p| match p {
            v5::Packet::PubAck(ack) => Some(ack.reason),
            _ => None,
        })
        .await;
    assert_eq!(reason, v5::PubAckReason::NotAuthorized);

    // MQTT 3.1.1: acknowledged (so the device does not retry) but dropped,
    // at every QoS.
    let mut c = v4::connect(v4::device(b.addr, "c")).await.expect("c");
    for qos in [
        v4::QoS::AtMostOnce,
        v4::QoS::AtLeastOnce,
        v4::QoS::ExactlyOnce,
    ] {
        c.client
            .publish("admin/v1/c/request", qos, false, "x")
            .await
            .expect("queued");
    }
    c.expect(|p| matches!(p, v4::Packet::PubAck(_)).then_some(()))
        .await;
    c.expect(|p| matches!(p, v4::Packet::PubComp(_)).then_some(()))
        .await;

    // Only the in-namespace marker reaches the observer.
    c.client
        .publish("devices/p/c/marker", v4::QoS::AtLeastOnce, false, "m")
        .await
        .expect("queued");
    assert_eq!(ob.publish().await.topic, "devices/p/c/marker");
    // Both devices are still connected.
    assert!(b.gateway.online().is_online("p.a"));
    assert!(b.gateway.online().is_online("p.c"));
}

#[tokio::test]
async fn qos_0_1_2_reach_a_subscriber_in_the_namespace() {
    let b = broker().await;
    let mut ob = observer(b.addr, "devices/p/a/#").await;
    let mut a = v4::connect(v4::device(b.addr, "a")).await.expect("a");
    let codes = a
        .subscribe(&["devices/p/a/down/#"], v4::QoS::ExactlyOnce)
        .await;
    assert_eq!(
        codes,
        vec![v4::SubscribeReasonCode::Success(v4::QoS::ExactlyOnce)]
    );
    for (i, qos) in [
        v4::QoS::AtMostOnce,
        v4::QoS::AtLeastOnce,
        v4::QoS::ExactlyOnce,
    ]
    .into_iter()
    .enumerate()
    {
        a.client
            .publish(format!("devices/p/a/up/{i}"), qos, false, format!("m{i}"))
            .await
            .expect("queued");
        let p = ob.publish().await;
        assert_eq!(p.topic, format!("devices/p/a/up/{i}"));
        assert_eq!(&p.payload[..], format!("m{i}").as_bytes());
    }
    // Commands the other way, at QoS 2.
    ob.client
        .publish("devices/p/a/down/cmd", v4::QoS::ExactlyOnce, false, "go")
        .await
        .expect("queued");
    let p = a.publish().await;
    assert_eq!(p.topic, "devices/p/a/down/cmd");
    assert_eq!(p.qos, v4::QoS::ExactlyOnce);

    // The same over MQTT 5.
    let mut bc = v5::connect(v5::device(b.addr, "b")).await.expect("b");
    bc.subscribe(&["devices/p/b/#"], v5::QoS::ExactlyOnce).await;
    for qos in [
        v5::QoS::AtMostOnce,
        v5::QoS::AtLeastOnce,
        v5::QoS::ExactlyOnce,
    ] {
        bc.client
            .publish("devices/p/b/echo", qos, false, "e")
            .await
            .expect("queued");
        let p = bc.publish().await;
        assert_eq!(&p.topic[..], b"devices/p/b/echo");
    }
}
