//! An in-process broker on port 0 with a manual clock, and device clients.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use activation_broker::admin::accounts::{hash_password, AccountConfig, RoleConfig};
use activation_broker::clock::{Clock, ManualClock};
use activation_broker::config::Config;
use activation_broker::credentials::{client_id, device_credentials};
use activation_broker::events::{Event, EventKind};
use activation_broker::ledger::{AuthMode, Command, Outcome};
use activation_broker::server::Broker;
use tokio::sync::broadcast;

use super::T0;

pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestBroker {
    pub broker: Broker,
    pub clock: Arc<ManualClock>,
    /// The broker's store; removed when the broker is dropped.
    _dir: tempfile::TempDir,
}

/// An account `name` with `password` (argon2-hashed) and `role`, no topic
/// rules of its own; with `events`, it receives the event topics.
pub fn account(name: &str, password: &str, role: RoleConfig, events: bool) -> AccountConfig {
    AccountConfig {
        name: name.into(),
        password_hash: hash_password(password),
        role,
        publish: Vec::new(),
        subscribe: Vec::new(),
        deny_publish: Vec::new(),
        deny_subscribe: Vec::new(),
        events,
    }
}

pub async fn start_broker(tweak: impl FnOnce(&mut Config)) -> TestBroker {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::on_loopback(dir.path());
    tweak(&mut config);
    let (clock, handle) = Clock::manual(T0);
    let broker = Broker::start(config, clock).await.expect("broker starts");
    TestBroker {
        broker,
        clock: handle,
        _dir: dir,
    }
}

impl TestBroker {
    pub fn addr(&self) -> SocketAddr {
        self.broker.device_addr()
    }

    pub async fn run(&self, c: Command) -> Outcome {
        self.broker
            .ledger
            .execute(c.clone(), None)
            .await
            .unwrap_or_else(|e| panic!("{c:?}: {e}"))
    }

    /// A product-secret product with `codes` codes valid `validity` s; returns its secret.
    pub async fn product(&self, pk: &str, codes: u64, validity: u64) -> String {
        let Outcome::ProductCreated(p) = self
            .run(Command::CreateProduct {
                product_key: pk.into(),
                name: format!("Product {pk}"),
                auth_mode: AuthMode::ProductSecret,
            })
            .await
        else {
            panic!("no product")
        };
        if codes > 0 {
            self.run(Command::CreateOrder {
                order_id: None,
                quantity: codes,
                validity_secs: validity,
                product_key: Some(pk.into()),
            })
            .await;
        }
        p.secret
    }

    pub fn creds(&self, pk: &str, dk: &str, secret: &str) -> (String, String) {
        device_credentials(pk, dk, secret, self.clock.now())
    }

    pub fn advance(&self, secs: u64) {
        self.clock.advance(Duration::from_secs(secs));
    }

    pub fn consumed(&self) -> u64 {
        self.broker.ledger.counters().consumed
    }

    pub fn is_online(&self, pk: &str, dk: &str) -> bool {
        self.broker.gateway.online().is_online(&client_id(pk, dk))
    }

    pub async fn wait_online(&self, pk: &str, dk: &str, online: bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut rx = self.broker.events.subscribe();
        while self.is_online(pk, dk) != online {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{pk}.{dk} never became online={online}"
            );
            let _ = tokio::time::timeout(Duration::from_millis(50), rx.recv()).await;
        }
    }
}

/// Waits for the next event of `kind` on `rx`.
pub async fn next_event(rx: &mut broadcast::Receiver<Arc<Event>>, kind: EventKind) -> Arc<Event> {
    tokio::time::timeout(WAIT, async {
        loop {
            match rx.recv().await {
                Ok(e) if e.kind == kind => return e,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("event stream closed: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {kind:?} event"))
}

/// `connect(addr, id, user, pass)`: `Ok` once CONNACK 0 arrived (the event
/// loop must then be polled), else the CONNACK code. One body for the v4
/// and v5 clients, whose types differ.
macro_rules! connect_fn {
    () => {
        pub async fn connect(
            addr: SocketAddr,
            id: &str,
            user: &str,
            pass: &str,
        ) -> Result<(AsyncClient, EventLoop), u8> {
            let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
            o.set_credentials(user, pass);
            o.set_keep_alive(Duration::from_secs(30));
            let (c, mut el) = AsyncClient::new(o, 64);
            let r = tokio::time::timeout(WAIT, async {
                loop {
                    match el.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(a))) => return Ok(code(a.code)),
                        Ok(_) => {}
                        Err(ConnectionError::ConnectionRefused(c)) => return Err(code(c)),
                        Err(e) => panic!("connection failed: {e}"),
                    }
                }
            })
            .await
            .expect("CONNACK in time");
            match r {
                Ok(0) => Ok((c, el)),
                Ok(c) | Err(c) => Err(c),
            }
        }
    };
}

pub mod v4 {
    use super::*;
    use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet};

    pub use activation_client::connack::v4_code as code;

    connect_fn!();
}

pub mod v5 {
    use super::*;
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
    use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};

    pub use activation_client::connack::v5_code as code;

    connect_fn!();

    /// The next packet the broker sends this client.
    pub async fn incoming(el: &mut EventLoop) -> Packet {
        tokio::time::timeout(WAIT, async {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(p)) => return p,
                    Ok(Event::Outgoing(_)) => {}
                    Err(e) => panic!("connection failed: {e}"),
                }
            }
        })
        .await
        .expect("packet in time")
    }

    /// The reason code of the next PUBACK.
    pub async fn puback(el: &mut EventLoop) -> PubAckReason {
        loop {
            if let Packet::PubAck(a) = incoming(el).await {
                return a.reason;
            }
        }
    }

    /// The first reason code of the next SUBACK.
    pub async fn suback(el: &mut EventLoop) -> SubscribeReasonCode {
        loop {
            if let Packet::SubAck(a) = incoming(el).await {
                return a.return_codes[0];
            }
        }
    }
}

/// Raw MQTT 5 CONNECT; returns the CONNACK's reason code and Reason String.
pub async fn raw_v5_connack(
    addr: SocketAddr,
    client_id: &str,
    user: &str,
    pass: &str,
) -> (u8, Option<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    fn s(out: &mut Vec<u8>, v: &[u8]) {
        out.extend_from_slice(&(v.len() as u16).to_be_bytes());
        out.extend_from_slice(v);
    }
    let mut body = Vec::new();
    s(&mut body, b"MQTT");
    body.push(5); // protocol level
    body.push(0b1100_0010); // user name, password, clean start
    body.extend_from_slice(&30u16.to_be_bytes());
    body.push(0); // no properties
    s(&mut body, client_id.as_bytes());
    s(&mut body, user.as_bytes());
    s(&mut body, pass.as_bytes());
    let mut pkt = vec![0x10];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        pkt.push(b);
        if len == 0 {
            break;
        }
    }
    pkt.extend_from_slice(&body);
    let mut sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    sock.write_all(&pkt).await.expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, sock.read_to_end(&mut buf)).await;
    assert!(buf.len() >= 5 && buf[0] == 0x20, "no CONNACK: {buf:?}");
    // fixed header (2 bytes, small packet), flags, reason, props length, props
    let code = buf[3];
    let props = &buf[5..];
    let mut i = 0;
    let mut reason = None;
    while i < props.len() {
        let id = props[i];
        i += 1;
        match id {
            0x1F => {
                let n = u16::from_be_bytes([props[i], props[i + 1]]) as usize;
                reason = Some(String::from_utf8_lossy(&props[i + 2..i + 2 + n]).into_owned());
                i += 2 + n;
            }
            0x12 | 0x1A | 0x1C | 0x15 => {
                let n = u16::from_be_bytes([props[i], props[i + 1]]) as usize;
                i += 2 + n;
            }
            0x21 | 0x22 | 0x13 => i += 2,
            0x24 | 0x25 | 0x28 | 0x29 | 0x2A => i += 1,
            0x11 | 0x27 => i += 4,
            _ => break,
        }
    }
    (code, reason)
}
