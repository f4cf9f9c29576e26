//! The device-facing connection layer alone (a gateway over rumqttd's
//! router on port 0), with a small allow-list authenticator standing in
//! for the activation gate; rumqttc 3.1.1 and 5.0 clients and raw bytes.
//! No sleeps: every wait is for an event or packet, bounded by a timeout.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use activation_broker::clock::Clock;
use activation_broker::events::{Event as BusEvent, EventBus, EventKind};
use activation_broker::gateway::{
    router_config, Acl, Admission, AuthFuture, Authenticator, ConnectInfo, Gateway, Identity,
    Listener, ListenerConfig, RefusalCode, Rejection, RouterHandle,
};
use bytes::BytesMut;
use rumqttd::protocol::{self as wire, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc};

pub const WAIT: Duration = Duration::from_secs(10);
pub const PASSWORD: &str = "secret";

// ---------------------------------------------------------------- harness

/// Admits devices by user name `{pk}&{dk}` with password `secret`, accounts
/// by name with their own ACL; user names listed in `refusals` are refused
/// with that code.
pub struct AllowList {
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

pub const REFUSALS: [(RefusalCode, &str, u8, u8); 7] = [
    (RefusalCode::ClientIdNotValid, "r-clientid", 0x85, 0x02),
    (RefusalCode::BadUserNameOrPassword, "r-badpass", 0x86, 0x04),
    (RefusalCode::Banned, "r-banned", 0x8A, 0x05),
    (RefusalCode::ConnectionRateExceeded, "r-rate", 0x9F, 0x05),
    (RefusalCode::QuotaExceeded, "r-quota", 0x97, 0x05),
    (RefusalCode::NotAuthorized, "r-notauth", 0x87, 0x05),
    (RefusalCode::ServerUnavailable, "r-unavailable", 0x88, 0x03),
];

pub struct Broker {
    pub addr: SocketAddr,
    pub gateway: Gateway,
    pub events: broadcast::Receiver<Arc<BusEvent>>,
}

pub async fn broker() -> Broker {
    broker_with(|_| {}).await
}

pub async fn broker_with(tune: impl FnOnce(&mut ListenerConfig)) -> Broker {
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

pub async fn wait_event(
    rx: &mut broadcast::Receiver<Arc<BusEvent>>,
    kind: EventKind,
    dk: &str,
) -> Arc<BusEvent> {
    tokio::time::timeout(WAIT, async {
        loop {
            match rx.recv().await {
                Ok(e)
                    if e.kind == kind
                        && e.field("DeviceKey").and_then(|v| v.as_str()) == Some(dk) =>
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

pub mod v4 {
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

pub mod v5 {
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

pub fn connect_bytes(
    version: u8,
    client_id: &str,
    user: &str,
    keep_alive: u16,
    will: Option<(&str, &str)>,
) -> BytesMut {
    connect_bytes_clean(version, client_id, user, keep_alive, will, true)
}

pub fn connect_bytes_clean(
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
pub fn encode_connect(
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

pub async fn raw(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("tcp connect")
}

/// Reads one packet from the server with rumqttc's MQTT 3.1.1 decoder.
pub async fn read_v4(s: &mut TcpStream) -> Option<v4::Packet> {
    read_with(s, |buf| match v4::Packet::read(buf, 1 << 20) {
        Ok(p) => Ok(Some(p)),
        Err(rumqttc::Error::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(e.to_string()),
    })
    .await
}

/// Reads one packet from the server with rumqttc's MQTT 5 decoder.
pub async fn read_v5(s: &mut TcpStream) -> Option<v5::Packet> {
    read_with(s, |buf| match v5::Packet::read(buf, Some(1 << 20)) {
        Ok(p) => Ok(Some(p)),
        Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(e.to_string()),
    })
    .await
}

pub async fn read_with<T>(
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
pub async fn until_closed(s: &mut TcpStream) -> Vec<u8> {
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

pub async fn raw_connected(
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
pub async fn observer(addr: SocketAddr, filter: &str) -> v4::Client {
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

/// After each bad client, a good one still gets in.
pub async fn still_serving(addr: SocketAddr) {
    let c = v4::connect(v4::device(addr, "c"))
        .await
        .expect("broker still serves");
    c.client.disconnect().await.expect("queued");
}

/// QoS 0 PUBLISH of MQTT 3.1.1 as raw bytes.
pub fn publish_bytes(topic: &str, payload: &[u8]) -> Vec<u8> {
    let len = 2 + topic.len() + payload.len();
    let mut b = vec![0x30, u8::try_from(len).expect("short packet")];
    b.extend_from_slice(&u16::try_from(topic.len()).expect("short").to_be_bytes());
    b.extend_from_slice(topic.as_bytes());
    b.extend_from_slice(payload);
    b
}

/// Publishes a marker to `topic` through the observer and asserts it is the
/// next message the observer gets: nothing else was on its way.
pub async fn assert_no_message_before_marker(ob: &mut v4::Client, topic: &str) {
    ob.client
        .publish(topic, v4::QoS::AtLeastOnce, false, "m")
        .await
        .expect("queued");
    assert_eq!(ob.publish().await.topic, topic);
}

/// Admits every device `p&{dk}` (for the rate measurement).
pub struct AcceptAll;

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
pub async fn accept_all_gateway(connections: usize, bus: EventBus) -> (Gateway, Listener) {
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
