//! End-to-end tests of the device-facing connection layer: real sockets on
//! port 0, rumqttc 3.1.1 and 5.0 clients, raw bytes for malformed input. A
//! small allow-list authenticator stands in for the activation gate. No
//! sleeps: every wait is for an event or packet, bounded by a timeout.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use activation_broker::clock::Clock;
use activation_broker::events::{Event as BusEvent, EventBus, EventKind};
use activation_broker::gateway::{
    router_config, Acl, Admission, AuthFuture, Authenticator, ConnectInfo, DisconnectReason,
    Gateway, Identity, Listener, ListenerConfig, RefusalCode, Rejection, RouterHandle,
};
use bytes::{BufMut, BytesMut};
use rumqttd::protocol::{self as wire, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc};

const WAIT: Duration = Duration::from_secs(10);
const PASSWORD: &str = "secret";

// ---------------------------------------------------------------- harness

/// Admits devices by user name `{pk}&{dk}` with password `secret`, accounts
/// by name with their own ACL; user names listed in `refusals` are refused
/// with that code.
struct AllowList {
    devices: Vec<(String, String)>,
    accounts: HashMap<String, Acl>,
    refusals: HashMap<String, RefusalCode>,
}

impl AllowList {
    fn decide(&self, info: &ConnectInfo) -> Result<Admission, Rejection> {
        let user = info.username.clone().unwrap_or_default();
        if let Some(code) = self.refusals.get(&user) {
            return Err(Rejection::new(*code, format!("refused: {}", code.as_str())));
        }
        let password_ok = info.password.as_deref() == Some(PASSWORD.as_bytes());
        if let Some(acl) = self.accounts.get(&user) {
            if password_ok {
                return Ok(Admission {
                    client_id: info.client_id.clone(),
                    identity: Identity::Account { name: user },
                    acl: acl.clone(),
                });
            }
        }
        if let Some((pk, dk)) = user.split_once('&') {
            if password_ok && self.devices.iter().any(|(p, d)| p == pk && d == dk) {
                let expected = format!("{pk}.{dk}");
                if !info.client_id.is_empty() && info.client_id != expected {
                    return Err(Rejection::new(
                        RefusalCode::ClientIdNotValid,
                        "client id must be ProductKey.DeviceKey",
                    ));
                }
                return Ok(Admission::device(pk, dk, Acl::device(pk, dk)));
            }
        }
        Err(Rejection::new(
            RefusalCode::BadUserNameOrPassword,
            "unknown user or wrong password",
        ))
    }
}

impl Authenticator for AllowList {
    fn authenticate(&self, info: ConnectInfo) -> AuthFuture {
        let decision = self.decide(&info);
        Box::pin(async move { decision })
    }
}

const REFUSALS: [(RefusalCode, &str, u8, u8); 7] = [
    (RefusalCode::ClientIdNotValid, "r-clientid", 0x85, 0x02),
    (RefusalCode::BadUserNameOrPassword, "r-badpass", 0x86, 0x04),
    (RefusalCode::Banned, "r-banned", 0x8A, 0x05),
    (RefusalCode::ConnectionRateExceeded, "r-rate", 0x9F, 0x05),
    (RefusalCode::QuotaExceeded, "r-quota", 0x97, 0x05),
    (RefusalCode::NotAuthorized, "r-notauth", 0x87, 0x05),
    (RefusalCode::ServerUnavailable, "r-unavailable", 0x88, 0x03),
];

struct Broker {
    addr: SocketAddr,
    gateway: Gateway,
    events: broadcast::Receiver<BusEvent>,
}

async fn broker() -> Broker {
    broker_with(|_| {}).await
}

async fn broker_with(tune: impl FnOnce(&mut ListenerConfig)) -> Broker {
    let events = EventBus::new(4096);
    let rx = events.subscribe();
    let router = RouterHandle::spawn(0, router_config(1000));
    let gateway = Gateway::start(router, events, Clock::system())
        .await
        .expect("gateway starts");
    let mut cfg = ListenerConfig::new("devices", "127.0.0.1:0".parse().expect("addr"));
    tune(&mut cfg);
    let mut accounts = HashMap::new();
    accounts.insert(
        "observer".to_owned(),
        Acl {
            publish: vec!["devices/#".into()],
            subscribe: vec!["devices/#".into()],
            ..Acl::default()
        },
    );
    let auth = AllowList {
        devices: ["a", "b", "c", "w"]
            .iter()
            .map(|d| ("p".to_owned(), (*d).to_owned()))
            .collect(),
        accounts,
        refusals: REFUSALS
            .iter()
            .map(|(c, u, _, _)| ((*u).to_owned(), *c))
            .collect(),
    };
    let listener = gateway
        .listen(cfg, Arc::new(auth))
        .await
        .expect("listener binds");
    Broker {
        addr: listener.local_addr(),
        gateway,
        events: rx,
    }
}

async fn wait_event(rx: &mut broadcast::Receiver<BusEvent>, kind: EventKind, dk: &str) -> BusEvent {
    tokio::time::timeout(WAIT, async {
        loop {
            match rx.recv().await {
                Ok(e)
                    if e.kind == kind
                        && e.fields.get("DeviceKey").and_then(|v| v.as_str()) == Some(dk) =>
                {
                    return e
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("event bus closed: {e}"),
            }
        }
    })
    .await
    .expect("event in time")
}

// ------------------------------------------------------------ v4 clients

mod v4 {
    use super::*;
    pub use rumqttc::{
        AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, QoS,
        SubscribeFilter, SubscribeReasonCode,
    };

    pub struct Client {
        pub client: AsyncClient,
        pub rx: mpsc::UnboundedReceiver<Result<Event, ConnectionError>>,
        pub session_present: bool,
    }

    pub fn opts(addr: SocketAddr, client_id: &str, user: &str) -> MqttOptions {
        let mut o = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        o.set_credentials(user, PASSWORD);
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    pub fn device(addr: SocketAddr, dk: &str) -> MqttOptions {
        opts(addr, &format!("p.{dk}"), &format!("p&{dk}"))
    }

    /// Connects; Err is the refusal or error of the first CONNECT.
    pub async fn connect(o: MqttOptions) -> Result<Client, ConnectionError> {
        let (client, mut el) = AsyncClient::new(o, 64);
        let session_present = tokio::time::timeout(WAIT, async {
            loop {
                match el.poll().await? {
                    Event::Incoming(Packet::ConnAck(a)) => {
                        return Ok::<_, ConnectionError>(a.session_present)
                    }
                    _ => continue,
                }
            }
        })
        .await
        .expect("CONNACK in time")?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let ev = el.poll().await;
                let stop = ev.is_err();
                if tx.send(ev).is_err() || stop {
                    return;
                }
            }
        });
        Ok(Client {
            client,
            rx,
            session_present,
        })
    }

    impl Client {
        /// Waits for the first incoming packet `pick` accepts.
        pub async fn expect<T>(&mut self, mut pick: impl FnMut(&Packet) -> Option<T>) -> T {
            tokio::time::timeout(WAIT, async {
                loop {
                    match self.rx.recv().await {
                        Some(Ok(Event::Incoming(p))) => {
                            if let Some(t) = pick(&p) {
                                return t;
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => panic!("connection error: {e}"),
                        None => panic!("event loop ended"),
                    }
                }
            })
            .await
            .expect("packet in time")
        }

        /// The next PUBLISH received.
        pub async fn publish(&mut self) -> rumqttc::Publish {
            self.expect(|p| match p {
                Packet::Publish(p) => Some(p.clone()),
                _ => None,
            })
            .await
        }

        /// Waits until the connection ends; returns the error.
        pub async fn closed(&mut self) -> ConnectionError {
            tokio::time::timeout(WAIT, async {
                loop {
                    match self.rx.recv().await {
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return e,
                        None => panic!("event loop ended without error"),
                    }
                }
            })
            .await
            .expect("closed in time")
        }

        pub async fn subscribe(&mut self, filters: &[&str], qos: QoS) -> Vec<SubscribeReasonCode> {
            self.client
                .subscribe_many(
                    filters
                        .iter()
                        .map(|f| SubscribeFilter::new((*f).to_owned(), qos)),
                )
                .await
                .expect("subscribe queued");
            self.expect(|p| match p {
                Packet::SubAck(s) => Some(s.return_codes.clone()),
                _ => None,
            })
            .await
        }
    }
}

// ------------------------------------------------------------ v5 clients

mod v5 {
    use super::*;
    pub use rumqttc::v5::mqttbytes::v5::{
        ConnAck, ConnectReturnCode, DisconnectReasonCode, Filter, Packet, PubAckReason,
        SubscribeReasonCode,
    };
    pub use rumqttc::v5::mqttbytes::QoS;
    pub use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions, StateError};

    pub struct Client {
        pub client: AsyncClient,
        pub rx: mpsc::UnboundedReceiver<Result<Event, ConnectionError>>,
        pub session_present: bool,
    }

    pub fn opts(addr: SocketAddr, client_id: &str, user: &str) -> MqttOptions {
        let mut o = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        o.set_credentials(user, PASSWORD);
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    pub fn device(addr: SocketAddr, dk: &str) -> MqttOptions {
        opts(addr, &format!("p.{dk}"), &format!("p&{dk}"))
    }

    /// Device `dk` with clean start `clean` and Session Expiry Interval
    /// `expiry` (seconds).
    pub fn session(addr: SocketAddr, dk: &str, clean: bool, expiry: Option<u32>) -> MqttOptions {
        let mut o = device(addr, dk);
        o.set_clean_start(clean);
        o.set_session_expiry_interval(expiry);
        o
    }

    pub async fn connect(o: MqttOptions) -> Result<Client, ConnectionError> {
        let (client, mut el) = AsyncClient::new(o, 64);
        let session_present = tokio::time::timeout(WAIT, async {
            loop {
                if let Event::Incoming(Packet::ConnAck(a)) = el.poll().await? {
                    return Ok::<_, ConnectionError>(a.session_present);
                }
            }
        })
        .await
        .expect("CONNACK in time")?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let ev = el.poll().await;
                let stop = ev.is_err();
                if tx.send(ev).is_err() || stop {
                    return;
                }
            }
        });
        Ok(Client {
            client,
            rx,
            session_present,
        })
    }

    impl Client {
        pub async fn expect<T>(&mut self, mut pick: impl FnMut(&Packet) -> Option<T>) -> T {
            tokio::time::timeout(WAIT, async {
                loop {
                    match self.rx.recv().await {
                        Some(Ok(Event::Incoming(p))) => {
                            if let Some(t) = pick(&p) {
                                return t;
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => panic!("connection error: {e}"),
                        None => panic!("event loop ended"),
                    }
                }
            })
            .await
            .expect("packet in time")
        }

        pub async fn publish(&mut self) -> rumqttc::v5::mqttbytes::v5::Publish {
            self.expect(|p| match p {
                Packet::Publish(p) => Some(p.clone()),
                _ => None,
            })
            .await
        }

        pub async fn closed(&mut self) -> ConnectionError {
            tokio::time::timeout(WAIT, async {
                loop {
                    match self.rx.recv().await {
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return e,
                        None => panic!("event loop ended without error"),
                    }
                }
            })
            .await
            .expect("closed in time")
        }

        pub async fn subscribe(&mut self, filters: &[&str], qos: QoS) -> Vec<SubscribeReasonCode> {
            self.client
                .subscribe_many(filters.iter().map(|f| Filter::new(*f, qos)))
                .await
                .expect("subscribe queued");
            self.expect(|p| match p {
                Packet::SubAck(s) => Some(s.return_codes.clone()),
                _ => None,
            })
            .await
        }
    }
}

// ------------------------------------------------------------- raw bytes

fn connect_bytes(
    version: u8,
    client_id: &str,
    user: &str,
    keep_alive: u16,
    will: Option<(&str, &str)>,
) -> BytesMut {
    connect_bytes_clean(version, client_id, user, keep_alive, will, true)
}

fn connect_bytes_clean(
    version: u8,
    client_id: &str,
    user: &str,
    keep_alive: u16,
    will: Option<(&str, &str)>,
    clean_session: bool,
) -> BytesMut {
    let connect = wire::Connect {
        keep_alive,
        client_id: client_id.to_owned(),
        clean_session,
    };
    encode_connect(version, connect, None, will, None, user)
}

/// Encodes a CONNECT logging in as `user` with the test password; `will`
/// is (topic, message) at QoS 0.
fn encode_connect(
    version: u8,
    connect: wire::Connect,
    props: Option<wire::ConnectProperties>,
    will: Option<(&str, &str)>,
    will_props: Option<wire::LastWillProperties>,
    user: &str,
) -> BytesMut {
    let login = Some(wire::Login {
        username: user.to_owned(),
        password: PASSWORD.to_owned(),
    });
    let will = will.map(|(t, m)| wire::LastWill {
        topic: bytes::Bytes::copy_from_slice(t.as_bytes()),
        message: bytes::Bytes::copy_from_slice(m.as_bytes()),
        qos: wire::QoS::AtMostOnce,
        retain: false,
    });
    let mut buf = BytesMut::new();
    let packet = wire::Packet::Connect(connect, props, will, will_props, login);
    if version == 5 {
        wire::v5::V5.write(packet, &mut buf).expect("encode");
    } else {
        wire::v4::V4.write(packet, &mut buf).expect("encode");
    }
    buf
}

async fn raw(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("tcp connect")
}

/// Reads one packet from the server with rumqttc's MQTT 3.1.1 decoder.
async fn read_v4(s: &mut TcpStream) -> Option<v4::Packet> {
    read_with(s, |buf| match v4::Packet::read(buf, 1 << 20) {
        Ok(p) => Ok(Some(p)),
        Err(rumqttc::Error::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(e.to_string()),
    })
    .await
}

/// Reads one packet from the server with rumqttc's MQTT 5 decoder.
async fn read_v5(s: &mut TcpStream) -> Option<v5::Packet> {
    read_with(s, |buf| match v5::Packet::read(buf, Some(1 << 20)) {
        Ok(p) => Ok(Some(p)),
        Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(e.to_string()),
    })
    .await
}

async fn read_with<T>(
    s: &mut TcpStream,
    mut decode: impl FnMut(&mut BytesMut) -> Result<Option<T>, String>,
) -> Option<T> {
    let mut buf = BytesMut::new();
    tokio::time::timeout(WAIT, async {
        loop {
            match decode(&mut buf) {
                Ok(Some(p)) => return Some(p),
                Ok(None) => {}
                Err(e) => panic!("undecodable reply: {e}"),
            }
            match s.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("reply or close in time")
}

/// Waits until the server closes the socket; returns the bytes it sent.
async fn until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("server closes in time");
    all
}

async fn raw_connected(
    addr: SocketAddr,
    version: u8,
    dk: &str,
    keep_alive: u16,
    will: Option<(&str, &str)>,
) -> TcpStream {
    let mut s = raw(addr).await;
    s.write_all(&connect_bytes(
        version,
        &format!("p.{dk}"),
        &format!("p&{dk}"),
        keep_alive,
        will,
    ))
    .await
    .expect("send CONNECT");
    if version == 5 {
        match read_v5(&mut s).await {
            Some(v5::Packet::ConnAck(a)) => assert_eq!(a.code, v5::ConnectReturnCode::Success),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    } else {
        match read_v4(&mut s).await {
            Some(v4::Packet::ConnAck(a)) => assert_eq!(a.code, v4::ConnectReturnCode::Success),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }
    s
}

/// An observer account subscribed to `filter`.
async fn observer(addr: SocketAddr, filter: &str) -> v4::Client {
    let mut o = v4::connect(v4::opts(addr, "observer-1", "observer"))
        .await
        .expect("observer connects");
    let codes = o.subscribe(&[filter], v4::QoS::AtLeastOnce).await;
    assert_eq!(
        codes,
        vec![v4::SubscribeReasonCode::Success(v4::QoS::AtLeastOnce)]
    );
    o
}

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn admits_v4_and_v5_and_reports_them_online() {
    let mut b = broker().await;
    let c4 = v4::connect(v4::device(b.addr, "a"))
        .await
        .expect("v4 admitted");
    assert!(!c4.session_present);
    let e = wait_event(&mut b.events, EventKind::DeviceConnected, "a").await;
    assert_eq!(
        e.fields.get("ProductKey").and_then(|v| v.as_str()),
        Some("p")
    );
    assert_eq!(
        e.fields.get("Protocol").and_then(|v| v.as_str()),
        Some("3.1.1")
    );

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
    assert!(e.fields.contains_key("Reason"));
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
    assert!(e.fields["Reason"]
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

/// Publishes a marker to `topic` through the observer and asserts it is the
/// next message the observer gets: nothing else was on its way.
async fn assert_no_message_before_marker(ob: &mut v4::Client, topic: &str) {
    ob.client
        .publish(topic, v4::QoS::AtLeastOnce, false, "m")
        .await
        .expect("queued");
    assert_eq!(ob.publish().await.topic, topic);
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
    assert!(e.fields["Reason"]
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

/// After each bad client, a good one still gets in.
async fn still_serving(addr: SocketAddr) {
    let c = v4::connect(v4::device(addr, "c"))
        .await
        .expect("broker still serves");
    c.client.disconnect().await.expect("queued");
}

#[tokio::test]
async fn garbage_bytes_close_the_connection() {
    let b = broker().await;
    let mut s = raw(b.addr).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send");
    assert!(until_closed(&mut s).await.is_empty());
    let mut s = raw(b.addr).await;
    s.write_all(&[0x10, 0xff, 0xff, 0xff, 0xff, 0x01])
        .await
        .expect("send");
    assert!(until_closed(&mut s).await.is_empty());
    still_serving(b.addr).await;
}

#[tokio::test]
async fn publish_before_connect_closes_the_connection() {
    let b = broker().await;
    let mut s = raw(b.addr).await;
    s.write_all(&[0x30, 0x05, 0x00, 0x01, b'a', b'h', b'i'])
        .await
        .expect("send");
    assert!(until_closed(&mut s).await.is_empty());
    still_serving(b.addr).await;
}

#[tokio::test]
async fn second_connect_closes_the_connection() {
    let b = broker().await;
    let mut s = raw_connected(b.addr, 5, "a", 30, None).await;
    s.write_all(&connect_bytes(5, "p.a", "p&a", 30, None))
        .await
        .expect("send");
    let bytes = until_closed(&mut s).await;
    assert_eq!(bytes.first(), Some(&0xE0), "MQTT 5 DISCONNECT");
    assert_eq!(bytes.get(2), Some(&0x82), "protocol error");
    let mut s = raw_connected(b.addr, 4, "b", 30, None).await;
    s.write_all(&connect_bytes(4, "p.b", "p&b", 30, None))
        .await
        .expect("send");
    assert!(until_closed(&mut s).await.is_empty());
    still_serving(b.addr).await;
}

#[tokio::test]
async fn oversized_packets_close_the_connection() {
    let b = broker_with(|c| c.max_packet_size = 1024).await;
    // Before CONNECT: a CONNECT claiming 1 MiB.
    let mut s = raw(b.addr).await;
    s.write_all(&[0x10, 0x80, 0x80, 0x40]).await.expect("send");
    assert!(until_closed(&mut s).await.is_empty());

    // After CONNECT, MQTT 5: DISCONNECT 0x95.
    let mut s = raw_connected(b.addr, 5, "a", 30, None).await;
    let mut p = BytesMut::new();
    p.put_u8(0x30);
    p.put_slice(&[0x80, 0x10]); // remaining length 2048
    p.put_u16(13);
    p.put_slice(b"devices/p/a/x");
    p.put_slice(&[0u8; 2048 - 15]);
    s.write_all(&p).await.expect("send");
    let bytes = until_closed(&mut s).await;
    assert_eq!(bytes.first(), Some(&0xE0));
    assert_eq!(bytes.get(2), Some(&0x95));

    // MQTT 3.1.1: closed.
    let mut s = raw_connected(b.addr, 4, "b", 30, None).await;
    s.write_all(&p).await.expect("send");
    assert!(until_closed(&mut s).await.is_empty());
    still_serving(b.addr).await;
}

#[tokio::test]
async fn connect_timeout_closes_silent_sockets() {
    let b = broker_with(|c| c.connect_timeout = Duration::from_millis(300)).await;
    let mut silent = raw(b.addr).await;
    let mut partial = raw(b.addr).await;
    partial.write_all(&[0x10, 0x20, 0x00]).await.expect("send");
    assert!(until_closed(&mut silent).await.is_empty());
    assert!(until_closed(&mut partial).await.is_empty());
    still_serving(b.addr).await;
}

#[tokio::test]
async fn unsupported_protocol_level_gets_connack_0x01() {
    let b = broker().await;
    let mut s = raw(b.addr).await;
    let mut c = connect_bytes(4, "p.a", "p&a", 30, None);
    c[8] = 3; // protocol level
    s.write_all(&c).await.expect("send");
    assert_eq!(until_closed(&mut s).await, vec![0x20, 0x02, 0x00, 0x01]);
    still_serving(b.addr).await;
}

#[tokio::test]
async fn invalid_filters_and_topics() {
    let b = broker().await;
    // SUBSCRIBE pkid 1, no properties, filter "a/#/x" QoS 0 → SUBACK 0x8F
    // (rumqttc refuses to send such a filter, so raw bytes).
    let mut s = raw_connected(b.addr, 5, "a", 30, None).await;
    s.write_all(&[
        0x82, 0x0B, 0x00, 0x01, 0x00, 0x00, 0x05, b'a', b'/', b'#', b'/', b'x', 0x00,
    ])
    .await
    .expect("send");
    match read_v5(&mut s).await {
        Some(v5::Packet::SubAck(ack)) => {
            assert_eq!(ack.pkid, 1);
            assert_eq!(
                ack.return_codes,
                vec![v5::SubscribeReasonCode::TopicFilterInvalid]
            );
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
    // A PUBLISH with a wildcard topic ends the session with 0x90.
    let mut s = raw_connected(b.addr, 5, "b", 30, None).await;
    s.write_all(&[
        0x30, 0x0B, 0x00, 0x08, b'd', b'e', b'v', b'/', b'+', b'/', b'x', b'y', 0x00,
    ])
    .await
    .expect("send");
    let bytes = until_closed(&mut s).await;
    assert_eq!(bytes.get(2), Some(&0x90));
    still_serving(b.addr).await;
}

#[tokio::test]
async fn server_only_packets_from_a_client_close_the_connection() {
    let mut b = broker().await;
    // CONNACK and UNSUBACK from an MQTT 5 client (rumqttd's decoder has no
    // arm for them), then SUBACK and PINGRESP from 3.1.1 clients.
    for (version, dk, bytes) in [
        (5u8, "a", vec![0x20, 0x03, 0x00, 0x00, 0x00]),
        (5, "b", vec![0xB0, 0x03, 0x00, 0x01, 0x00]),
        (4, "c", vec![0x90, 0x03, 0x00, 0x01, 0x00]),
        (4, "w", vec![0xD0, 0x00]),
    ] {
        let mut s = raw_connected(b.addr, version, dk, 30, None).await;
        wait_event(&mut b.events, EventKind::DeviceConnected, dk).await;
        s.write_all(&bytes).await.expect("send");
        until_closed(&mut s).await;
        wait_event(&mut b.events, EventKind::DeviceDisconnected, dk).await;
        assert!(!b.gateway.online().is_online(&format!("p.{dk}")));
    }
    still_serving(b.addr).await;
}

/// Admits every device `p&{dk}` (for the rate measurement).
struct AcceptAll;

impl Authenticator for AcceptAll {
    fn authenticate(&self, info: ConnectInfo) -> AuthFuture {
        let user = info.username.unwrap_or_default();
        let decision = match user.split_once('&') {
            Some((pk, dk)) => Ok(Admission::device(pk, dk, Acl::device(pk, dk))),
            None => Err(Rejection::new(RefusalCode::BadUserNameOrPassword, "")),
        };
        Box::pin(async move { decision })
    }
}

/// A gateway over a router configured for `connections`, publishing on
/// `bus`, with one `devices` listener on a free port admitting every device.
async fn accept_all_gateway(connections: usize, bus: EventBus) -> (Gateway, Listener) {
    let router = RouterHandle::spawn(0, router_config(connections));
    let gateway = Gateway::start(router, bus, Clock::system())
        .await
        .expect("gateway");
    let cfg = ListenerConfig::new("devices", "127.0.0.1:0".parse().expect("addr"));
    let listener = gateway
        .listen(cfg, Arc::new(AcceptAll))
        .await
        .expect("listen");
    (gateway, listener)
}

/// Connection rate: `cargo test --release --test it -- --ignored
/// --nocapture gateway::connect_rate`. Holds every connection open until the end.
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn connect_rate() {
    const N: usize = 8000;
    const CONCURRENCY: usize = 256;
    let bus = EventBus::new(65536);
    let mut events = bus.subscribe();
    let (gateway, listener) = accept_all_gateway(N + 10, bus).await;
    let (held, secs) = flood(listener.local_addr(), "d", N, CONCURRENCY, 60, false).await;
    let total = held.len();
    println!(
        "{total} connections in {secs:.2} s: {:.0} CONNACKs/s, {} online",
        total as f64 / secs,
        gateway.online().len()
    );
    let mut reasons: HashMap<String, usize> = HashMap::new();
    while let Ok(e) = events.try_recv() {
        if e.kind == EventKind::DeviceDisconnected {
            *reasons.entry(e.fields["Reason"].to_string()).or_default() += 1;
        }
    }
    assert!(reasons.is_empty(), "sessions ended early: {reasons:?}");
    assert_eq!(total, N);
    assert_eq!(gateway.online().len(), N);
}

/// Connects `n` devices `p.{prefix}{i}` (keep alive `keep_alive` s) through
/// `concurrency` workers, each waiting for its CONNACK and, with `subscribe`, then subscribing to its
/// command topic (QoS 1) and waiting for the SUBACK. Returns the held
/// sockets and the seconds taken.
async fn flood(
    addr: SocketAddr,
    prefix: &str,
    n: usize,
    concurrency: usize,
    keep_alive: u16,
    subscribe: bool,
) -> (Vec<TcpStream>, f64) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (next, prefix) = (next.clone(), prefix.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return held;
                }
                let dk = format!("{prefix}{i}");
                let mut s = raw(addr).await;
                s.write_all(&connect_bytes(
                    4,
                    &format!("p.{dk}"),
                    &format!("p&{dk}"),
                    keep_alive,
                    None,
                ))
                .await
                .expect("send");
                let mut ack = [0u8; 4];
                s.read_exact(&mut ack).await.expect("CONNACK");
                assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
                if subscribe {
                    let filter = format!("devices/p/{dk}/command");
                    let mut body = vec![0x00, 0x01];
                    body.extend_from_slice(
                        &u16::try_from(filter.len()).expect("short").to_be_bytes(),
                    );
                    body.extend_from_slice(filter.as_bytes());
                    body.push(0x01);
                    let mut packet = vec![0x82, u8::try_from(body.len()).expect("short")];
                    packet.extend_from_slice(&body);
                    s.write_all(&packet).await.expect("SUBSCRIBE");
                    let mut suback = [0u8; 5];
                    s.read_exact(&mut suback).await.expect("SUBACK");
                    assert_eq!(suback, [0x90, 0x03, 0x00, 0x01, 0x01]);
                }
                held.push(s);
            }
        }));
    }
    let mut held = Vec::new();
    for t in tasks {
        held.extend(t.await.expect("task"));
    }
    (held, start.elapsed().as_secs_f64())
}

/// VmRSS of this process in KB.
fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Connection rate and memory of idle connections, connect alone or with a
/// SUBSCRIBE, one configuration per process run:
/// `RATE_SUBSCRIBE=0|1 RATE_DEVICES=5000 cargo test --release --test it
/// -- --ignored --nocapture gateway::connect_and_subscribe_rate`. Settings are
/// printed; nothing is asserted about time or memory.
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn connect_and_subscribe_rate() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let n = env("RATE_DEVICES", 5000);
    let subscribe = env("RATE_SUBSCRIBE", 1) == 1;
    const CONCURRENCY: usize = 50;
    println!(
        "settings: {n} devices, {CONCURRENCY} in flight, MQTT 3.1.1, in-process gateway \
         (AcceptAll authenticator, no ledger), default ListenerConfig, client in the same \
         process on the same runtime, {} CPUs, subscribe: {subscribe}",
        std::thread::available_parallelism().map_or(1, |p| p.get())
    );
    let (gateway, listener) = accept_all_gateway(n + 10, EventBus::new(65536)).await;
    let before = rss_kb();
    let (held, secs) = flood(listener.local_addr(), "d", n, CONCURRENCY, 600, subscribe).await;
    // Measurement only: let the RSS settle (bounded).
    let mut rss = rss_kb();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = rss_kb();
        if now.abs_diff(rss) < 64 {
            rss = now;
            break;
        }
        rss = now;
    }
    println!(
        "{}: {} devices in {secs:.2} s: {:.0}/s; RSS {before} KB -> {rss} KB: {:.2} KB per idle device \
         (client sockets included); {} linked",
        if subscribe { "connect + SUBSCRIBE" } else { "connect alone" },
        held.len(),
        held.len() as f64 / secs,
        (rss.saturating_sub(before)) as f64 / held.len() as f64,
        gateway.linked_sessions()
    );
    assert_eq!(gateway.online().len(), n);
    listener.close();
}

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
async fn random_bytes_after_connect_never_leak_sessions() {
    use rand::{Rng, SeedableRng};
    let bus = EventBus::new(65_536);
    let mut events = bus.subscribe();
    let (gateway, listener) = accept_all_gateway(1000, bus).await;
    let addr = listener.local_addr();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    const N: usize = 300;
    for i in 0..N {
        let version = if i % 2 == 0 { 4 } else { 5 };
        let mut s = raw_connected(addr, version, &format!("f{i}"), 30, None).await;
        let len = rng.gen_range(1..200);
        let mut junk: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        // Often start with a plausible packet type byte.
        if i % 3 == 0 {
            junk[0] = [
                0x30, 0x32, 0x34, 0x82, 0xA2, 0x62, 0x40, 0x50, 0x70, 0x20, 0xB0,
            ][i % 11];
        }
        let _ = s.write_all(&junk).await;
        drop(s);
    }
    let mut ended = 0;
    tokio::time::timeout(WAIT, async {
        while ended < N {
            match events.recv().await {
                Ok(e) if e.kind == EventKind::DeviceDisconnected => ended += 1,
                Ok(_) => {}
                Err(e) => panic!("event bus: {e}"),
            }
        }
    })
    .await
    .expect("every session ends");
    assert!(gateway.online().is_empty());
    let c = v4::connect(v4::opts(addr, "p.ok", "p&ok"))
        .await
        .expect("still serving");
    c.client.disconnect().await.expect("queued");
}

#[tokio::test]
async fn topic_aliases_are_resolved_before_the_acl() {
    let b = broker().await;
    let mut ob = observer(b.addr, "devices/p/a/#").await;
    let mut s = raw_connected(b.addr, 5, "a", 30, None).await;
    let mut p = BytesMut::new();
    // PUBLISH "devices/p/a/t", Topic Alias 1, payload "1".
    p.put_slice(&[0x30, 20, 0x00, 13]);
    p.put_slice(b"devices/p/a/t");
    p.put_slice(&[0x03, 0x23, 0x00, 0x01, b'1']);
    // PUBLISH "" with Topic Alias 1, payload "2".
    p.put_slice(&[0x30, 7, 0x00, 0x00, 0x03, 0x23, 0x00, 0x01, b'2']);
    s.write_all(&p).await.expect("send");
    for payload in [b"1", b"2"] {
        let m = ob.publish().await;
        assert_eq!(m.topic, "devices/p/a/t");
        assert_eq!(&m.payload[..], payload);
    }
    // An alias above the advertised maximum (32) ends the session with 0x94.
    s.write_all(&[0x30, 7, 0x00, 0x00, 0x03, 0x23, 0x00, 99, b'3'])
        .await
        .expect("send");
    let bytes = until_closed(&mut s).await;
    assert_eq!(bytes.get(2), Some(&0x94), "{bytes:?}");

    // An alias cannot smuggle a topic past the ACL: it resolves to the real
    // topic, which is checked (PUBACK 0x87 for QoS 1).
    let mut s = raw_connected(b.addr, 5, "b", 30, None).await;
    let mut p = BytesMut::new();
    // PUBLISH QoS 1 "admin/x" pkid 5, alias 1.
    p.put_slice(&[0x32, 15, 0x00, 7]);
    p.put_slice(b"admin/x");
    p.put_slice(&[0x00, 0x05, 0x03, 0x23, 0x00, 0x01, b'x']);
    s.write_all(&p).await.expect("send");
    match read_v5(&mut s).await {
        Some(v5::Packet::PubAck(ack)) => {
            assert_eq!(ack.pkid, 5);
            assert_eq!(ack.reason, v5::PubAckReason::NotAuthorized);
        }
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// QoS 0 PUBLISH of MQTT 3.1.1 as raw bytes.
fn publish_bytes(topic: &str, payload: &[u8]) -> Vec<u8> {
    let len = 2 + topic.len() + payload.len();
    let mut b = vec![0x30, u8::try_from(len).expect("short packet")];
    b.extend_from_slice(&u16::try_from(topic.len()).expect("short").to_be_bytes());
    b.extend_from_slice(topic.as_bytes());
    b.extend_from_slice(payload);
    b
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

// ------------------------------------------- MQTT 5 will delay and expiry

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
