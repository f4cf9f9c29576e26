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
pub mod codes;
mod connection;
mod limits;
mod lingering;
mod listener;
pub mod online;
mod proxy;

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::{Notification, Router, RouterConfig};

pub use acl::{Acl, AclError, AclTemplate, SubscribeVerdict, DEFAULT_DEVICE_TEMPLATE};
pub use codes::{DisconnectReason, RefusalCode};
pub use lingering::SessionExpiry;
pub use online::{OnlineRegistry, SessionInfo};

use online::Control;
use tokio::sync::mpsc;

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
    /// Anything else (no events).
    Anonymous,
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

type BuildFn =
    dyn Fn(&str, bool) -> Result<(LinkTx, LinkRx, Notification), GatewayError> + Send + Sync;
type FreeFn = dyn Fn() -> usize + Send + Sync;

/// A running rumqttd router and the means to open links to it.
#[derive(Clone)]
pub struct RouterHandle {
    build: Arc<BuildFn>,
    free: Arc<FreeFn>,
    /// Client sessions the router has room for (its `max_connections`
    /// less [`INTERNAL_LINKS`]).
    sessions: usize,
}

/// Router slots kept for the broker's own links (the gateway's will link,
/// the admin plane's links).
pub const INTERNAL_LINKS: usize = 16;

impl std::fmt::Debug for RouterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterHandle")
            .field("free_slots", &(self.free)())
            .finish()
    }
}

/// Free slots in the router's event channel below which senders wait, so a
/// send never blocks an async worker (at most `max_concurrent_links` plus
/// the worker threads can send concurrently).
const ROUTER_HEADROOM: usize = 256;

impl RouterHandle {
    /// Starts rumqttd's router on its own thread.
    pub fn spawn(router_id: usize, config: RouterConfig) -> Self {
        let sessions = config.max_connections.saturating_sub(INTERNAL_LINKS).max(1);
        let tx = Router::new(router_id, config).spawn();
        let build_tx = tx.clone();
        let build = move |client_id: &str, clean_session: bool| {
            LinkBuilder::new(client_id, build_tx.clone())
                .clean_session(clean_session)
                // Publishing to a topic nobody subscribes to must not
                // disconnect the publisher.
                .dynamic_filters(true)
                // The router never aliases topics towards our clients.
                .topic_alias_max(0)
                .build()
                .map_err(|e: LinkError| GatewayError::Router(e.to_string()))
        };
        let free = move || tx.capacity().unwrap_or(usize::MAX).saturating_sub(tx.len());
        RouterHandle {
            build: Arc::new(build),
            free: Arc::new(free),
            sessions,
        }
    }

    /// Client sessions the router has room for.
    pub fn sessions(&self) -> usize {
        self.sessions
    }

    /// Opens a local link (e.g. for the admin plane). BLOCKS until the
    /// router answers: call it from `spawn_blocking` or use [`Self::link`].
    pub fn link_blocking(
        &self,
        client_id: &str,
        clean_session: bool,
    ) -> Result<(LinkTx, LinkRx, Notification), GatewayError> {
        (self.build)(client_id, clean_session)
    }

    /// [`Self::link_blocking`] on the blocking pool.
    pub async fn link(
        &self,
        client_id: &str,
        clean_session: bool,
    ) -> Result<(LinkTx, LinkRx, Notification), GatewayError> {
        self.wait_for_room().await;
        let this = self.clone();
        let id = client_id.to_owned();
        tokio::task::spawn_blocking(move || this.link_blocking(&id, clean_session))
            .await
            .map_err(|e| GatewayError::Router(e.to_string()))?
    }

    /// Waits until the router's event channel has headroom, so the
    /// synchronous `LinkTx::send` that follows cannot block the thread.
    pub async fn wait_for_room(&self) {
        while (self.free)() < ROUTER_HEADROOM {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// A router configuration suitable for the broker: room for
/// `max_connections` client sessions (plus [`INTERNAL_LINKS`]), small in-memory
/// segments per subscribed filter (4 × 1 MiB per filter bounds what a
/// persistent session can have queued), the default caps of `[router]`.
pub fn router_config(max_connections: usize) -> RouterConfig {
    router_config_with(&crate::config::RouterSection {
        max_connections,
        ..Default::default()
    })
}

/// [`router_config`] with the caps of `section` (`[router]` in the config).
/// The gateway's own links publish for many clients: exempt from the
/// per-client caps.
pub fn router_config_with(section: &crate::config::RouterSection) -> RouterConfig {
    RouterConfig {
        max_connections: section.max_connections.saturating_add(INTERNAL_LINKS),
        max_outgoing_packet_count: 200,
        max_segment_size: 1024 * 1024,
        max_segment_count: 4,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
        max_retained_per_client: section.max_retained_per_client,
        max_retained_bytes: section.max_retained_bytes,
        quota_exempt_clients: vec![
            WILL_LINK_ID.to_owned(),
            crate::admin::service::ADMIN_CLIENT_ID.to_owned(),
        ],
    }
}

/// Shared state of every listener of one gateway.
pub(crate) struct Shared {
    router: RouterHandle,
    online: Arc<OnlineRegistry>,
    events: EventBus,
    clock: Clock,
    /// Serialises "register in the online registry" and "create the router
    /// link" per client id, so both see takeovers in the same order.
    stripes: Box<[parking_lot::Mutex<()>]>,
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
    wills: tokio::sync::Mutex<LinkTx>,
}

impl Shared {
    /// The lock serialising registration and linking of `client_id`.
    fn stripe(&self, client_id: &str) -> &parking_lot::Mutex<()> {
        let mut h = DefaultHasher::new();
        client_id.hash(&mut h);
        &self.stripes[(h.finish() as usize) % self.stripes.len()]
    }

    /// Registers a clean session that needs no router link yet (the client
    /// id has no stored session in the router). A session that must be
    /// linked at once is handed back.
    fn register_unlinked(
        &self,
        session: SessionInfo,
        ctrl: mpsc::UnboundedSender<Control>,
    ) -> Registration {
        let _guard = self.stripe(&session.client_id).lock();
        if session.stored() || self.persistent.lock().contains(&session.client_id) {
            return Registration::MustLink(Box::new((session, ctrl)));
        }
        match self.online.register(session, ctrl) {
            Some(seq) => Registration::Registered(seq),
            None => Registration::Full(self.online.capacity()),
        }
    }

    /// Registers `session` and links it to the router. BLOCKS on the router.
    fn register_linked(
        &self,
        session: SessionInfo,
        ctrl: mpsc::UnboundedSender<Control>,
    ) -> Result<(u64, (LinkTx, LinkRx, Notification)), GatewayError> {
        let cid = session.client_id.clone();
        let clean_start = session.clean_session;
        let stored = session.stored();
        let _guard = self.stripe(&cid).lock();
        let seq = self
            .online
            .register(session, ctrl)
            .ok_or(GatewayError::Full(self.online.capacity()))?;
        self.settle_lingering(&cid, clean_start);
        if clean_start && stored && self.persistent.lock().contains(&cid) {
            // A fresh session that the router will store: drop the old one
            // first (a stored link would resume it).
            if let Err(e) = self.discard_locked(&cid) {
                self.online.unregister(&cid, seq);
                return Err(e);
            }
        }
        match self.link_locked(&cid, !stored) {
            Ok(link) => Ok((seq, link)),
            Err(e) => {
                self.online.unregister(&cid, seq);
                Err(e)
            }
        }
    }

    /// Links the registered clean session `seq` of `client_id` to the
    /// router, unless another connection has taken the client id over
    /// (then `None`). BLOCKS on the router.
    fn link_registered(
        &self,
        client_id: &str,
        seq: u64,
    ) -> Result<Option<(LinkTx, LinkRx, Notification)>, GatewayError> {
        let _guard = self.stripe(client_id).lock();
        if !self.online.is_current(client_id, seq) {
            return Ok(None);
        }
        self.link_locked(client_id, true).map(Some)
    }

    /// A session's link is closed (or dropped by the router).
    fn unlinked(&self) {
        self.linked.fetch_sub(1, Ordering::Relaxed);
    }

    /// Makes the router forget the stored session of `client_id` (a clean
    /// link's CONNECT discards it; its DISCONNECT stores nothing). Under the
    /// stripe lock of `client_id`. BLOCKS on the router.
    fn discard_locked(&self, client_id: &str) -> Result<(), GatewayError> {
        let (mut tx, _rx, _ack) = self.router.link_blocking(client_id, true)?;
        self.persistent.lock().remove(client_id);
        // `send` is a blocking channel send behind an async signature:
        // fine on this blocking thread.
        self.runtime
            .block_on(tx.send(connection::router_disconnect_packet()))
            .map_err(|e| GatewayError::Router(e.to_string()))?;
        Ok(())
    }

    /// Under the stripe lock of `client_id`.
    fn link_locked(
        &self,
        client_id: &str,
        clean: bool,
    ) -> Result<(LinkTx, LinkRx, Notification), GatewayError> {
        let link = self.router.link_blocking(client_id, clean)?;
        self.linked.fetch_add(1, Ordering::Relaxed);
        let mut persistent = self.persistent.lock();
        if clean {
            persistent.remove(client_id);
        } else if !persistent.contains(client_id) {
            persistent.insert(client_id.to_owned());
        }
        Ok(link)
    }
}

/// The outcome of [`Shared::register_unlinked`].
enum Registration {
    Registered(u64),
    MustLink(Box<(SessionInfo, mpsc::UnboundedSender<Control>)>),
    Full(usize),
}

/// Client id of the gateway's own link. Contains NUL, which no accepted
/// client id may contain, so it cannot be taken over.
const WILL_LINK_ID: &str = "\0gateway-wills";

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
        let (tx, mut rx, _ack) = router.link(WILL_LINK_ID, true).await?;
        tokio::spawn(async move {
            // Nothing is expected back (wills are QoS 0 towards the router);
            // drain so the router never stalls on this link.
            loop {
                match rx.next().await {
                    Ok(Some(Notification::Unschedule)) => {
                        if rx.wake().await.is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        let stripes = (0..256).map(|_| parking_lot::Mutex::new(())).collect();
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
