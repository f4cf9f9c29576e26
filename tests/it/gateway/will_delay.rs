//! MQTT 5 will delay and session expiry in the connection layer.

use std::net::SocketAddr;
use std::time::Duration;

use activation_broker::events::EventKind;
use bytes::BytesMut;
use rumqttd::protocol::{self as wire, Protocol};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::common::gateway::*;

/// A raw MQTT 5 CONNECT of device `dk`: clean start `clean`, Session Expiry
/// Interval `expiry`, and a will `(topic, message, delay)`.
fn connect_v5_bytes(
    dk: &str,
    clean: bool,
    expiry: Option<u32>,
    will: Option<(&str, &str, u32)>,
) -> BytesMut {
    let connect = wire::Connect {
        keep_alive: 30,
        client_id: format!("p.{dk}"),
        clean_session: clean,
    };
    let props = wire::ConnectProperties {
        session_expiry_interval: expiry,
        receive_maximum: None,
        max_packet_size: None,
        topic_alias_max: None,
        request_response_info: None,
        request_problem_info: None,
        user_properties: Vec::new(),
        authentication_method: None,
        authentication_data: None,
    };
    let will_props = will.map(|(_, _, delay)| wire::LastWillProperties {
        delay_interval: Some(delay),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    });
    encode_connect(
        5,
        connect,
        Some(props),
        will.map(|(t, m, _)| (t, m)),
        will_props,
        &format!("p&{dk}"),
    )
}

/// Connects with [`connect_v5_bytes`]; returns the socket and the CONNACK's
/// session present flag.
async fn raw_v5_session(
    addr: SocketAddr,
    dk: &str,
    clean: bool,
    expiry: Option<u32>,
    will: Option<(&str, &str, u32)>,
) -> (TcpStream, bool) {
    let mut s = raw(addr).await;
    s.write_all(&connect_v5_bytes(dk, clean, expiry, will))
        .await
        .expect("send CONNECT");
    match read_v5(&mut s).await {
        Some(v5::Packet::ConnAck(a)) => {
            assert_eq!(a.code, v5::ConnectReturnCode::Success);
            (s, a.session_present)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// Polls `f` until it holds (the gateway's counters change off the wire).
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} in time"));
}

/// Device `w` connected raw with a stored session and a delayed will, then
/// its socket dropped; returns when the gateway holds the will.
async fn dropped_with_delayed_will(b: &mut Broker, expiry: u32, delay: u32) -> std::time::Instant {
    let will = Some(("devices/p/w/status", "gone", delay));
    let (s, _) = raw_v5_session(b.addr, "w", true, Some(expiry), will).await;
    wait_event(&mut b.events, EventKind::DeviceConnected, "w").await;
    let dropped = std::time::Instant::now();
    drop(s);
    wait_event(&mut b.events, EventKind::DeviceDisconnected, "w").await;
    assert_eq!(b.gateway.lingering_sessions(), (1, 1));
    dropped
}

#[tokio::test]
async fn delayed_will_waits_for_its_delay_or_the_session_end() {
    // (session expiry, will delay): the will goes out at the earlier.
    for (expiry, delay) in [(60, 1), (1, 60)] {
        let mut b = broker().await;
        let mut ob = observer(b.addr, "devices/p/w/#").await;
        let dropped = dropped_with_delayed_will(&mut b, expiry, delay).await;
        let p = ob.publish().await;
        assert_eq!(&p.payload[..], b"gone");
        assert!(
            dropped.elapsed() >= Duration::from_secs(1),
            "will held back for 1 s (expiry {expiry}, delay {delay})"
        );
        until("will counted as sent", || {
            b.gateway.lingering_sessions().1 == 0
        })
        .await;
    }
}

#[tokio::test]
async fn resuming_the_session_cancels_the_delayed_will() {
    let mut b = broker().await;
    let mut ob = observer(b.addr, "devices/p/w/#").await;
    dropped_with_delayed_will(&mut b, 600, 300).await;

    let (mut s, present) = raw_v5_session(b.addr, "w", false, Some(600), None).await;
    assert!(present, "the stored session is resumed");
    assert_eq!(b.gateway.lingering_sessions(), (0, 0));
    s.write_all(&[0xE0, 0x00]).await.expect("DISCONNECT");
    until_closed(&mut s).await;
    wait_event(&mut b.events, EventKind::DeviceDisconnected, "w").await;
    assert_no_message_before_marker(&mut ob, "devices/p/w/marker").await;
}

#[tokio::test]
async fn clean_start_ends_the_old_session_and_sends_its_will_at_once() {
    let mut b = broker().await;
    let mut ob = observer(b.addr, "devices/p/w/#").await;
    dropped_with_delayed_will(&mut b, 600, 300).await;

    let (_s, present) = raw_v5_session(b.addr, "w", true, Some(600), None).await;
    assert!(!present, "clean start discards the stored session");
    // Within the test's 10 s wait, not after 300 s.
    assert_eq!(&ob.publish().await.payload[..], b"gone");
    assert_eq!(b.gateway.lingering_sessions(), (0, 0));
}

/// Device `a` (MQTT 5) with clean start `clean` and expiry `expiry`,
/// subscribed to its downlink, then disconnected normally.
async fn v5_session_left(b: &mut Broker, clean: bool, expiry: Option<u32>) -> bool {
    let mut a = v5::connect(v5::session(b.addr, "a", clean, expiry))
        .await
        .expect("a connects");
    a.subscribe(&["devices/p/a/down/#"], v5::QoS::AtLeastOnce)
        .await;
    a.client.disconnect().await.expect("disconnect queued");
    wait_event(&mut b.events, EventKind::DeviceDisconnected, "a").await;
    a.session_present
}

#[tokio::test]
async fn stored_session_expires_after_its_interval() {
    let mut b = broker().await;
    v5_session_left(&mut b, true, Some(1)).await;
    assert_eq!(b.gateway.lingering_sessions(), (1, 0));
    until("session expiry", || b.gateway.lingering_sessions().0 == 0).await;
    let again = v5::connect(v5::session(b.addr, "a", false, Some(1)))
        .await
        .expect("a again");
    assert!(!again.session_present, "the expired session is gone");
}

#[tokio::test]
async fn expiry_zero_ends_a_resumed_session_with_its_connection() {
    let mut b = broker().await;
    assert!(!v5_session_left(&mut b, true, Some(600)).await);
    // Resumed with expiry 0: the session ends when this connection does.
    assert!(v5_session_left(&mut b, false, None).await);
    assert!(!v5_session_left(&mut b, false, None).await);
    // An unlimited session is kept, with nothing waiting.
    assert!(!v5_session_left(&mut b, false, Some(u32::MAX)).await);
    assert_eq!(b.gateway.lingering_sessions(), (0, 0));
    assert!(v5_session_left(&mut b, false, Some(u32::MAX)).await);
}

#[tokio::test]
async fn disconnect_may_lower_the_expiry_but_not_raise_it_from_zero() {
    let mut b = broker().await;
    let disconnect = |expiry: u32| {
        let mut buf = BytesMut::new();
        let props = wire::DisconnectProperties {
            session_expiry_interval: Some(expiry),
            reason_string: None,
            user_properties: Vec::new(),
            server_reference: None,
        };
        wire::v5::V5
            .write(
                wire::Packet::Disconnect(
                    wire::Disconnect {
                        reason_code: wire::DisconnectReasonCode::NormalDisconnection,
                    },
                    Some(props),
                ),
                &mut buf,
            )
            .expect("encode");
        buf
    };

    // 600 at CONNECT, 0 at DISCONNECT: the session ends with it.
    let (mut s, _) = raw_v5_session(b.addr, "a", true, Some(600), None).await;
    s.write_all(&disconnect(0)).await.expect("DISCONNECT");
    until_closed(&mut s).await;
    wait_event(&mut b.events, EventKind::DeviceDisconnected, "a").await;
    assert_eq!(b.gateway.lingering_sessions(), (0, 0));
    let (_s, present) = raw_v5_session(b.addr, "a", false, Some(600), None).await;
    assert!(!present);

    // 0 at CONNECT, 600 at DISCONNECT: protocol error 0x82.
    let (mut s, _) = raw_v5_session(b.addr, "b", true, None, None).await;
    s.write_all(&disconnect(600)).await.expect("DISCONNECT");
    let bytes = until_closed(&mut s).await;
    assert_eq!(bytes.first(), Some(&0xE0));
    assert_eq!(bytes.get(2), Some(&0x82));
}
