//! The connection layer's listeners: TLS, bad TLS files, a full router.

use std::sync::Arc;

use activation_broker::clock::Clock;
use activation_broker::events::{EventBus, EventKind};
use activation_broker::gateway::{router_config, Gateway, ListenerConfig, RouterHandle};
use tokio::io::AsyncWriteExt;

use crate::common::gateway::*;

#[tokio::test]
async fn tls_listener_serves_mqtt() {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut b = broker_with(|c| {
        c.tls = Some(activation_broker::gateway::TlsConfig {
            cert_path: data.join("server.pem"),
            key_path: data.join("server.key"),
        })
    })
    .await;
    let ca = std::fs::read(data.join("ca.pem")).expect("CA");
    let mut o = v4::device(b.addr, "a");
    o.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Simple {
        ca,
        alpn: None,
        client_auth: None,
    }));
    let mut a = v4::connect(o).await.expect("admitted over TLS");
    wait_event(&mut b.events, EventKind::DeviceConnected, "a").await;
    a.subscribe(&["devices/p/a/#"], v4::QoS::AtLeastOnce).await;
    a.client
        .publish("devices/p/a/x", v4::QoS::AtLeastOnce, false, "tls")
        .await
        .expect("queued");
    assert_eq!(&a.publish().await.payload[..], b"tls");

    // Plain MQTT on the TLS port is dropped by the handshake.
    let mut s = raw(b.addr).await;
    s.write_all(&connect_bytes(4, "p.b", "p&b", 30, None))
        .await
        .expect("send");
    let reply = until_closed(&mut s).await;
    assert!(!reply.starts_with(&[0x20]), "no CONNACK in clear text");
}

#[tokio::test]
async fn bad_tls_files_are_a_clear_error() {
    let router = RouterHandle::spawn(0, router_config(10));
    let gateway = Gateway::start(router, EventBus::new(16), Clock::system())
        .await
        .expect("gateway");
    let mut cfg = ListenerConfig::new("devices", "127.0.0.1:0".parse().expect("addr"));
    cfg.tls = Some(activation_broker::gateway::TlsConfig {
        cert_path: "/nonexistent/cert.pem".into(),
        key_path: "/nonexistent/key.pem".into(),
    });
    let err = gateway
        .listen(cfg, Arc::new(AcceptAll))
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
}

#[tokio::test]
async fn full_router_refuses_with_server_unavailable() {
    let (gateway, listener) = accept_all_gateway(1, EventBus::new(16)).await;
    let addr = listener.local_addr();
    let _first = raw_connected(addr, 5, "a", 30, None).await;
    let mut s = raw(addr).await;
    s.write_all(&connect_bytes(5, "p.b", "p&b", 30, None))
        .await
        .expect("send");
    let bytes = until_closed(&mut s).await;
    assert_eq!(bytes.get(3), Some(&0x88), "{bytes:?}");
    let mut s = raw(addr).await;
    s.write_all(&connect_bytes(4, "p.b", "p&b", 30, None))
        .await
        .expect("send");
    assert_eq!(until_closed(&mut s).await, vec![0x20, 0x02, 0x00, 0x03]);
    assert_eq!(gateway.online().len(), 1);
    // A takeover of the one session still works at capacity.
    let _again = raw_connected(addr, 4, "a", 30, None).await;
}
