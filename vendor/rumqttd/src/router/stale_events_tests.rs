//! A link's DeviceData event that arrives after the router ended the
//! connection (its DISCONNECT was taken with the data of an earlier event)
//! is a normal race, not an error: nothing is lost and it is logged at
//! debug, not at error ("no-connection id N is already gone").

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::local::LinkBuilder;
use crate::protocol::{Disconnect, DisconnectReasonCode, Packet, Publish, QoS};
use crate::{Notification, Router, RouterConfig};

const WAIT: Duration = Duration::from_secs(10);

/// Every log line of this test binary that mentions a gone connection.
static GONE: Mutex<String> = Mutex::new(String::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let line = String::from_utf8_lossy(buf);
        if line.contains("is already gone") {
            GONE.lock().expect("log").push_str(&line);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(f)
}

fn publish(topic: &str) -> Packet {
    Packet::Publish(
        Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            pkid: 0,
            payload: Bytes::from_static(b"x"),
        },
        None,
    )
}

/// The next forwarded topic or SUBACK of `rx`.
fn next(rx: &mut crate::local::LinkRx) -> Notification {
    let deadline = Instant::now() + WAIT;
    loop {
        match rx.recv_deadline(deadline).expect("notification in time") {
            Some(Notification::Unschedule) => rx.ready().expect("ready"),
            Some(n) => return n,
            None => {}
        }
    }
}

#[test]
fn data_events_after_the_disconnect_they_carried_are_not_errors() {
    // Only this test sets a global subscriber in this binary.
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(|| Capture)
        .try_init();
    let config = RouterConfig {
        max_connections: 10,
        max_outgoing_packet_count: 200,
        max_segment_size: 1024 * 1024,
        max_segment_count: 4,
        ..RouterConfig::default()
    };
    let router = Router::new(0, config).spawn();
    let (mut sub_tx, mut sub_rx, _) = LinkBuilder::new("stale-sub", router.clone())
        .build()
        .expect("link");
    sub_tx.subscribe("stale/t").expect("subscribe");
    assert!(matches!(next(&mut sub_rx), Notification::DeviceAck(_)));

    // A publish and the DISCONNECT in the link's buffer before the router
    // looks, one event each: the first event takes both.
    let (mut tx, _rx, _) = LinkBuilder::new("stale-dev", router.clone())
        .build()
        .expect("link");
    tx.buffer().push_back(publish("stale/t"));
    tx.buffer().push_back(Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        },
        None,
    ));
    block_on(async {
        tx.notify().await.expect("event");
        tx.notify().await.expect("event");
    });

    // Nothing lost: the publish reaches the subscriber.
    match next(&mut sub_rx) {
        Notification::Forward(f) => assert_eq!(&f.publish.topic[..], b"stale/t"),
        other => panic!("expected the publish, got {other:?}"),
    }
    // The router handles events in order: once a later link's SUBACK is
    // back, the stale event has been handled.
    let (mut later_tx, mut later_rx, _) = LinkBuilder::new("stale-later", router)
        .build()
        .expect("link");
    later_tx.subscribe("stale/u").expect("subscribe");
    assert!(matches!(next(&mut later_rx), Notification::DeviceAck(_)));

    let gone = GONE.lock().expect("log").clone();
    assert!(gone.contains("DEBUG"), "the stale event is seen: {gone:?}");
    assert!(!gone.contains("ERROR"), "and not an error: {gone}");
}
