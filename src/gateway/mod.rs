//! The device-facing connection layer: our own MQTT listener in front of
//! rumqttd's router.
//!
//! rumqttd's `Server` is not used for clients. Each accepted socket runs one
//! task (`connection.rs`) that detects MQTT 3.1.1 / 5.0 from the CONNECT,
//! asks an [`Authenticator`] whether to admit it (the activation gate plugs
//! in here), answers refusals with the exact CONNACK code, and for admitted
//! clients shuttles packets between socket and a router link
//! (`rumqttd::local::LinkBuilder`), enforcing the session's [`Acl`],
//! keepalive, will message, packet size limit and session takeover. Clean
//! sessions get their link at their first SUBSCRIBE or PUBLISH (PINGREQ is
//! answered here), so idle devices hold no router state; persistent
//! sessions are linked at CONNECT. Each listener runs on its own I/O
//! threads (a single-threaded runtime and a `SO_REUSEPORT` socket each).
//! The gateway knows nothing of the ledger.
//!
//! Wiring:
//! ```ignore
//! let router = RouterHandle::spawn(0, router_config(100_000));
//! let gateway = Gateway::start(router, events.clone(), clock.clone()).await?;
//! let devices = gateway.listen(ListenerConfig::new("devices", addr), Arc::new(gate)).await?;
//! println!("listening on {}", devices.local_addr());
//! gateway.online().disconnect("pk.dk", DisconnectReason::NotAuthorized, "code expired");
//! ```
//!
//! Behaviour worth knowing (deliberate choices and rumqttd 0.20 quirks):
//! - Wills are published by the gateway through its own router link
//!   (rumqttd only publishes wills on an internal event a local link cannot
//!   send). Published on every end except a normal DISCONNECT and a session
//!   takeover: at once, or after the MQTT 5 Will Delay Interval or at the
//!   session's expiry, whichever is first, unless the session is resumed
//!   meanwhile (`lingering.rs`).
//! - Sessions: MQTT 3.1.1 clean session off is kept until a clean session
//!   of the same client id; MQTT 5 follows clean start and the Session
//!   Expiry Interval (from CONNECT, lowered by DISCONNECT; 0xFFFFFFFF =
//!   never). The router stores a session when it may outlive its
//!   connection; at expiry the gateway discards the router's copy.
//! - A publish no subscription matches is dropped by the router and leaves
//!   no state (links set `dynamic_filters`, which rumqttd 0.20 never acted
//!   on). The router caps the retained messages a client can make it hold
//!   (see [`router_config_with`]): over a cap the publish is not stored and
//!   gets PUBACK/PUBREC 0x97.
//! - UNSUBACK and PINGRESP are answered here (the router acks only
//!   subscribed filters, one UNSUBACK per filter). PUBREL is forwarded
//!   without properties (the router ignores it otherwise).
//! - Acks the gateway writes itself (refused PUBLISH, all-refused SUBSCRIBE,
//!   UNSUBACK) can overtake router acks of earlier packets.
//! - Not honoured from MQTT 5 CONNECT: Receive Maximum and
//!   Maximum Packet Size of the client, enhanced authentication.
//! - The authenticator's future is given [`ListenerConfig::auth_timeout`];
//!   past it the client gets `ServerBusy` (the future is dropped).

pub mod acl;
mod codec;
pub mod codes;
mod connection;
mod control;
mod delivery;
mod handshake;
mod limits;
mod lingering;
mod linking;
mod listener;
pub mod online;
mod proxy;
pub mod router_link;
mod session;
mod shutdown;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttd::Notification;

pub use acl::{Acl, AclError, AclTemplate, SubscribeVerdict, DEFAULT_DEVICE_TEMPLATE};
pub use codes::{DisconnectReason, RefusalCode};
pub use lingering::SessionExpiry;
pub use listener::load_tls;
pub use online::{OnlineRegistry, SessionInfo};
pub use router_link::{
    router_config, router_config_with, LinkClosed, RouterHandle, RouterLink, RouterLinkRx,
    RouterLinkTx, INTERNAL_LINKS,
};
pub use shutdown::{Stopped, WILL_DELIVERY};

use crate::clock::Clock;
use crate::events::EventBus;

/// MQTT protocol version of a connection, detected from its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolVersion {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

impl ProtocolVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            ProtocolVersion::V4 => "3.1.1",
            ProtocolVersion::V5 => "5.0",
        }
    }
}

/// Everything the authenticator may look at in a CONNECT.
#[derive(Debug, Clone)]
pub struct ConnectInfo {
    /// As sent; may be empty (then `clean_session` is true).
    pub client_id: String,
    pub clean_session: bool,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    pub peer: SocketAddr,
    pub protocol: ProtocolVersion,
    /// Seconds; 0 means no keepalive.
    pub keep_alive: u16,
    /// Topic of the will message, if any (already checked to be a valid
    /// topic name). The gateway refuses the CONNECT with NotAuthorized after
    /// admission if it is outside the admitted publish ACL; an authenticator
    /// that writes durable state should check it first (`Acl::may_publish`)
    /// so such a refusal never follows a write.
    pub will_topic: Option<String>,
    /// Name of the listener ([`ListenerConfig::name`]).
    pub listener: String,
    /// Whether the connection came over TLS.
    pub tls: bool,
}

/// A refusal: the CONNACK code and, for MQTT 5, its Reason String.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: RefusalCode,
    pub reason: String,
}

impl Rejection {
    pub fn new(code: RefusalCode, reason: impl Into<String>) -> Self {
        Rejection {
            code,
            reason: reason.into(),
        }
    }
}

/// Who an admitted session is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A device: `device/connected` / `device/disconnected` events are
    /// published for it.
    Device {
        product_key: String,
        device_key: String,
    },
    /// An operator or application account.
    Account { name: String },
}

impl Identity {
    pub fn product_key(&self) -> Option<&str> {
        match self {
            Identity::Device { product_key, .. } => Some(product_key),
            _ => None,
        }
    }

    pub fn device_key(&self) -> Option<&str> {
        match self {
            Identity::Device { device_key, .. } => Some(device_key),
            _ => None,
        }
    }

    pub fn is_device(&self, product_key: &str, device_key: &str) -> bool {
        matches!(self, Identity::Device { product_key: p, device_key: d } if p == product_key && d == device_key)
    }
}

/// An accepted CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// The session's client id. Empty: the gateway assigns one. MQTT 5
    /// clients that sent an empty client id are told the session's id in the
    /// CONNACK's Assigned Client Identifier; clients that named themselves
    /// are not (the spec forbids it), even when the session's id differs.
    pub client_id: String,
    pub identity: Identity,
    pub acl: Acl,
}

impl Admission {
    /// A device with client id `{pk}.{dk}` and the given ACL.
    pub fn device(product_key: &str, device_key: &str, acl: Acl) -> Self {
        Admission {
            client_id: crate::credentials::client_id(product_key, device_key),
            identity: Identity::Device {
                product_key: product_key.to_owned(),
                device_key: device_key.to_owned(),
            },
            acl,
        }
    }
}

/// The future an [`Authenticator`] returns.
pub type AuthFuture = Pin<Box<dyn Future<Output = Result<Admission, Rejection>> + Send + 'static>>;

/// Decides on each CONNECT. Called on an async worker: the future must not
/// block (do blocking work with `spawn_blocking`). No router state exists
/// for the client until it returns `Ok`.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate(&self, info: ConnectInfo) -> AuthFuture;

    /// Whether the sessions this authenticator admits are accounts, which
    /// may use the registry capacity kept for them
    /// ([`online::OnlineRegistry::reserve_for_accounts`]).
    fn admits_accounts(&self) -> bool {
        false
    }
}

/// TLS for a listener: PEM certificate chain and private key files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

/// One listening socket.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Shows in [`ConnectInfo::listener`] and [`SessionInfo::listener`].
    pub name: String,
    /// Port 0 picks a free port; see [`Listener::local_addr`].
    pub bind: SocketAddr,
    pub tls: Option<TlsConfig>,
    /// listen(2) backlog (the kernel caps it at net.core.somaxconn).
    pub backlog: u32,
    /// Time allowed from accept to a complete CONNECT (TLS handshake
    /// included).
    pub connect_timeout: Duration,
    /// Largest accepted packet, counted as its remaining length (bytes
    /// after the fixed header). Larger: MQTT 5 DISCONNECT 0x95, close.
    pub max_packet_size: usize,
    /// A write that cannot complete in this time closes the connection.
    pub write_timeout: Duration,
    /// Topic aliases accepted from MQTT 5 clients (0: none).
    pub topic_alias_max: u16,
    /// Most CONNECTs being registered with the router at once.
    pub max_concurrent_links: usize,
    /// Threads serving the listener, each with its own socket on the port
    /// (SO_REUSEPORT) and single-threaded runtime; 0 = one per CPU.
    pub io_threads: usize,
    /// Time the authenticator has to decide on a CONNECT; then the client
    /// gets CONNACK 0x89 Server busy (3.1.1: 0x03).
    pub auth_timeout: Duration,
    /// Connections from one source address that have not sent their
    /// CONNECT yet; more are closed at once (0 = unlimited).
    pub max_pending_per_source: usize,
    /// Every connection starts with a PROXY protocol v2 header (from a load
    /// balancer); its source address is the client's for every limit, ban
    /// and event. A connection without a valid header is closed.
    pub proxy_protocol: bool,
    /// Longest keepalive granted: a client asking for more, or for none,
    /// gets this one (MQTT 5 Server Keep Alive); 0 = the client's.
    pub max_keep_alive_secs: u16,
    /// QoS 1/2 PUBLISHes an MQTT 5 client may have unacknowledged (Receive
    /// Maximum); one more ends the connection with DISCONNECT 0x93.
    pub receive_maximum: u16,
    /// Raised at the first allowed SUBSCRIBE that could match a topic in
    /// its filter (e.g. the event topics, so that events are made only
    /// once someone may receive them).
    pub subscribe_watch: Option<SubscribeWatch>,
}

/// A filter the gateway watches subscriptions for: the first allowed
/// SUBSCRIBE whose filter could match a topic it matches raises `seen`
/// before that SUBSCRIBE's SUBACK is written; nothing lowers it.
#[derive(Debug, Clone)]
pub struct SubscribeWatch {
    pub filter: &'static str,
    pub seen: Arc<std::sync::atomic::AtomicBool>,
}

impl SubscribeWatch {
    /// Raises the flag if `filter` (allowed, valid) could match a watched topic.
    pub(crate) fn note(&self, filter: &str) {
        if !self.seen.load(Ordering::Relaxed) && acl::subscription_overlaps(filter, self.filter) {
            self.seen.store(true, Ordering::SeqCst);
        }
    }
}

impl ListenerConfig {
    pub fn new(name: &str, bind: SocketAddr) -> Self {
        ListenerConfig {
            name: name.to_owned(),
            bind,
            tls: None,
            backlog: 8192,
            connect_timeout: Duration::from_secs(10),
            max_packet_size: 256 * 1024,
            write_timeout: Duration::from_secs(30),
            topic_alias_max: 32,
            max_concurrent_links: 64,
            io_threads: 0,
            auth_timeout: Duration::from_secs(10),
            max_pending_per_source: 1024,
            proxy_protocol: false,
            max_keep_alive_secs: 0,
            receive_maximum: 65535,
            subscribe_watch: None,
        }
    }
}

/// Errors starting the gateway or a listener.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("router: {0}")]
    Router(String),
    #[error("the broker holds its maximum of {0} sessions")]
    Full(usize),
}

/// Shared state of every listener of one gateway.
pub(crate) struct Shared {
    router: RouterHandle,
    online: Arc<OnlineRegistry>,
    events: EventBus,
    clock: Clock,
    /// Serialises "register in the online registry" and "create the router
    /// link" per client id, so both see takeovers in the same order
    /// (`linking.rs`).
    stripes: Box<[tokio::sync::Mutex<()>]>,
    /// Client ids whose last router link was stored (see
    /// [`SessionInfo::stored`]), so the router may hold their state: any
    /// CONNECT of one of them links at once (to resume or discard it).
    /// Changed only under the client id's stripe lock.
    persistent: parking_lot::Mutex<HashSet<String>>,
    /// Stored sessions whose connection ended, waiting for a delayed will
    /// or their expiry (`lingering.rs`).
    lingering: parking_lot::Mutex<HashMap<String, lingering::Lingering>>,
    lingering_seq: AtomicU64,
    /// Where lingering sessions wait (the runtime that started the
    /// gateway; listeners' I/O threads may end before them).
    runtime: tokio::runtime::Handle,
    /// Client sessions that hold a router link.
    linked: AtomicUsize,
    /// The link wills are published through (wills outlive their link).
    wills: tokio::sync::Mutex<RouterLinkTx>,
    /// Wills handed to the router so far.
    wills_published: AtomicU64,
    /// Connections between their unregistration and the end of their will
    /// (`shutdown.rs`).
    ending: AtomicUsize,
    /// A graceful stop is under way: wills go out without their delay.
    stopping: std::sync::atomic::AtomicBool,
}

/// Client id of the gateway's own link. Contains NUL, which no accepted
/// client id may contain, so it cannot be taken over.
pub(crate) const WILL_LINK_ID: &str = "\0gateway-wills";

/// The connection layer of one router: any number of listeners sharing one
/// online registry.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("online", &self.shared.online.len())
            .finish()
    }
}

impl Gateway {
    /// Connects to the router (opening the gateway's own link for will
    /// messages).
    pub async fn start(
        router: RouterHandle,
        events: EventBus,
        clock: Clock,
    ) -> Result<Gateway, GatewayError> {
        let (tx, mut rx) = router.link(WILL_LINK_ID, true).await?.split();
        tokio::spawn(async move {
            // Nothing is expected back (wills are QoS 0 towards the router);
            // drain so the router never stalls on this link.
            loop {
                match rx.next().await {
                    Ok(Notification::Unschedule) => {
                        if rx.wake().await.is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        let stripes = (0..256).map(|_| tokio::sync::Mutex::new(())).collect();
        let online = Arc::new(OnlineRegistry::with_capacity(router.sessions()));
        Ok(Gateway {
            shared: Arc::new(Shared {
                router,
                online,
                events,
                clock,
                stripes,
                persistent: parking_lot::Mutex::new(HashSet::new()),
                lingering: parking_lot::Mutex::new(HashMap::new()),
                lingering_seq: AtomicU64::new(0),
                runtime: tokio::runtime::Handle::current(),
                linked: AtomicUsize::new(0),
                wills: tokio::sync::Mutex::new(tx),
                wills_published: AtomicU64::new(0),
                ending: AtomicUsize::new(0),
                stopping: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    /// Live sessions of every listener; disconnect them from here.
    pub fn online(&self) -> Arc<OnlineRegistry> {
        self.shared.online.clone()
    }

    pub fn router(&self) -> &RouterHandle {
        &self.shared.router
    }

    /// Live sessions holding a router link: persistent sessions and clean
    /// sessions that have subscribed or published (idle clean sessions have
    /// none).
    pub fn linked_sessions(&self) -> usize {
        self.shared.linked.load(Ordering::Relaxed)
    }

    /// Client ids starting with `prefix` whose session the router stores
    /// (live or not): persistent sessions until a clean session or their
    /// expiry discards them.
    pub fn stored_client_ids(&self, prefix: &str) -> Vec<String> {
        self.shared
            .persistent
            .lock()
            .iter()
            .filter(|id| id.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// Stored sessions whose connection has ended and that wait for a
    /// delayed will or their expiry, and how many of them still hold a
    /// will: `(sessions, wills)`.
    pub fn lingering_sessions(&self) -> (usize, usize) {
        self.shared.lingering_counts()
    }

    /// Binds `config.bind` and serves it with `auth` until
    /// [`Listener::shutdown`]. Dropping the [`Listener`] keeps it serving.
    pub async fn listen(
        &self,
        config: ListenerConfig,
        auth: Arc<dyn Authenticator>,
    ) -> Result<Listener, GatewayError> {
        listener::start(self.shared.clone(), config, auth).await
    }
}

/// A bound, serving listener. Its connections run on its own I/O threads.
#[derive(Debug)]
pub struct Listener {
    name: String,
    local_addr: SocketAddr,
    state: tokio::sync::watch::Sender<listener::State>,
}

impl Listener {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bound address (the real port when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting. Established connections are not affected (end them
    /// through [`OnlineRegistry`]); the I/O threads end with the last one.
    pub fn shutdown(&self) {
        self.state.send_if_modified(|s| {
            let serving = *s == listener::State::Serving;
            if serving {
                *s = listener::State::StopAccepting;
            }
            serving
        });
    }

    /// Stops accepting and drops every connection of this listener (sockets
    /// closed without DISCONNECT, as on a process exit).
    pub fn close(&self) {
        self.state.send_replace(listener::State::Close);
    }
}
