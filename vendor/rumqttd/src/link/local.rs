use crate::protocol::{
    Filter, LastWill, LastWillProperties, Packet, Publish, QoS, RetainForwardRule, Subscribe,
    Unsubscribe,
};
use crate::router::Ack;
use crate::router::{
    iobufs::{Incoming, Outgoing},
    Connection, Event, Notification, ShadowRequest, UNASSIGNED,
};
use crate::ConnectionId;
use bytes::Bytes;
use flume::{Receiver, RecvError, RecvTimeoutError, SendError, Sender, TrySendError};
use parking_lot::lock_api::MutexGuard;
use parking_lot::{Mutex, RawMutex};

use std::collections::VecDeque;
use std::mem;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("Unexpected router message")]
    NotConnectionAck,
    #[error("ConnAck error {0}")]
    ConnectionAck(String),
    #[error("Channel try send error")]
    TrySend(#[from] TrySendError<(ConnectionId, Event)>),
    #[error("Channel send error")]
    Send(#[from] SendError<(ConnectionId, Event)>),
    #[error("Channel recv error")]
    Recv(#[from] RecvError),
    #[error("Channel timeout recv error")]
    RecvTimeout(#[from] RecvTimeoutError),
    #[error("Timeout = {0}")]
    Elapsed(#[from] tokio::time::error::Elapsed),
}

// used to build LinkTx and LinkRx
pub struct LinkBuilder<'a> {
    tenant_id: Option<String>,
    client_id: &'a str,
    router_tx: Sender<(ConnectionId, Event)>,
    // true by default
    clean_session: bool,
    last_will: Option<LastWill>,
    last_will_properties: Option<LastWillProperties>,
    // false by default
    dynamic_filters: bool,
    // default to 0, indicating to not use topic alias
    topic_alias_max: u16,
}

impl<'a> LinkBuilder<'a> {
    pub fn new(client_id: &'a str, router_tx: Sender<(ConnectionId, Event)>) -> Self {
        LinkBuilder {
            client_id,
            router_tx,
            tenant_id: None,
            clean_session: true,
            last_will: None,
            last_will_properties: None,
            dynamic_filters: false,
            topic_alias_max: 0,
        }
    }

    pub fn tenant_id(mut self, tenant_id: Option<String>) -> Self {
        self.tenant_id = tenant_id;
        self
    }

    pub fn last_will(mut self, last_will: Option<LastWill>) -> Self {
        self.last_will = last_will;
        self
    }

    pub fn last_will_properties(
        mut self,
        last_will_properties: Option<LastWillProperties>,
    ) -> Self {
        self.last_will_properties = last_will_properties;
        self
    }

    pub fn topic_alias_max(mut self, max: u16) -> Self {
        self.topic_alias_max = max;
        self
    }

    pub fn clean_session(mut self, clean: bool) -> Self {
        self.clean_session = clean;
        self
    }

    pub fn dynamic_filters(mut self, dynamic_filters: bool) -> Self {
        self.dynamic_filters = dynamic_filters;
        self
    }

    pub fn build(self) -> Result<(LinkTx, LinkRx, Notification), LinkError> {
        let (event, pending) = self.prepare(None);
        pending.router_tx.send((0, event))?;
        pending.link_rx.recv()?;
        pending.finish()
    }

    /// [`Self::build`] without blocking the calling thread: the router's
    /// event channel is sent to with `send_async` and the router's ConnAck is
    /// awaited with `recv_async`, so an async task can create a link without
    /// holding a thread for the round trip (many links can be in creation at
    /// once on one thread). A router that refuses the link (e.g. it is at
    /// `max_connections`) drops the link's channel: an error, not a hang.
    pub async fn build_async(self) -> Result<(LinkTx, LinkRx, Notification), LinkError> {
        let (event, pending) = self.prepare(None);
        pending.router_tx.send_async((0, event)).await?;
        pending.link_rx.recv_async().await?;
        pending.finish()
    }

    /// [`Self::build_async`] with `packets` queued on the link before its
    /// Connect event: the router takes them right after the link's ConnAck,
    /// so a link made for its first packets (a SUBSCRIBE, say) costs one
    /// round trip to the router instead of two. What the router answers in
    /// the same pass is already in the returned link's receive cache.
    pub async fn build_async_with(
        self,
        packets: impl IntoIterator<Item = Packet>,
    ) -> Result<(LinkTx, LinkRx, Notification), LinkError> {
        self.connect_async_with(packets).await?.established().await
    }

    /// The first half of [`Self::build_async_with`]: returns once the
    /// link's Connect event, carrying `packets`, is in the router's event
    /// channel. The router handles its events in order, and takes these
    /// packets in the same pass as the Connect: whatever any link sends
    /// after this returns is handled after them (a SUBSCRIBE carried here
    /// is in effect for every later publish). [`PendingLink::established`]
    /// then awaits the router's ConnAck.
    pub async fn connect_async_with(
        self,
        packets: impl IntoIterator<Item = Packet>,
    ) -> Result<PendingLink, LinkError> {
        self.connect(packets, None).await
    }

    /// A link for a client whose server answers its CONNECT, SUBSCRIBE and
    /// UNSUBSCRIBE itself: the router sends it no ConnAck, SubAck or
    /// UnsubAck, so linking and subscribing never wake the link's reader
    /// (nor keep notifications in its buffer). Returns as soon as the
    /// link's Connect, carrying `packets`, is in the router's event channel
    /// (ordered as with [`Self::connect_async_with`]). The link learns its
    /// connection id from a cell the router fills when it registers the
    /// link; events it sends before then carry the cell. A router that
    /// refuses the link (no free slot) drops it: the link's receiver then
    /// fails and its events are ignored. No ConnAck means no
    /// `session_present`: meant for clean sessions.
    pub async fn connect_quiet_with(
        self,
        packets: impl IntoIterator<Item = Packet>,
    ) -> Result<(LinkTx, LinkRx), LinkError> {
        let cell = Arc::new(AtomicUsize::new(UNASSIGNED));
        let pending = self.connect(packets, Some(cell.clone())).await?;
        let tx = LinkTx::with_id(
            LinkId::Quiet(cell.clone()),
            pending.router_tx.clone(),
            pending.incoming_data_buffer,
        );
        let rx = LinkRx::with_id(
            LinkId::Quiet(cell),
            pending.router_tx,
            pending.link_rx,
            pending.outgoing_data_buffer,
        );
        Ok((tx, rx))
    }

    /// Sends the link's Connect event, carrying `packets` (and `quiet`, a
    /// quiet link's id cell), to the router.
    async fn connect(
        self,
        packets: impl IntoIterator<Item = Packet>,
        quiet: Option<Arc<AtomicUsize>>,
    ) -> Result<PendingLink, LinkError> {
        let (event, pending) = self.prepare(quiet);
        pending.incoming_data_buffer.lock().extend(packets);
        pending.router_tx.send_async((0, event)).await?;
        Ok(pending)
    }

    /// The Connect event for the router and what is needed to finish the
    /// link once the router has answered it.
    fn prepare(self, quiet: Option<Arc<AtomicUsize>>) -> (Event, PendingLink) {
        // Connect to router
        // Local connections to the router shall have access to all subscriptions
        let mut connection = Connection::new(
            self.tenant_id,
            self.client_id.to_owned(),
            self.clean_session,
            self.dynamic_filters,
        );

        connection
            .last_will(self.last_will, self.last_will_properties)
            .topic_alias_max(self.topic_alias_max);
        let incoming = Incoming::new(connection.client_id.to_owned());
        let (mut outgoing, link_rx) = Outgoing::new(connection.client_id.to_owned());
        outgoing.quiet = quiet;
        let outgoing_data_buffer = outgoing.buffer();
        let incoming_data_buffer = incoming.buffer();

        let event = Event::Connect {
            connection,
            incoming,
            outgoing,
        };
        let pending = PendingLink {
            router_tx: self.router_tx,
            link_rx,
            incoming_data_buffer,
            outgoing_data_buffer,
        };
        (event, pending)
    }
}

/// A link whose Connect event is on its way to the router
/// ([`LinkBuilder::connect_async_with`]).
pub struct PendingLink {
    router_tx: Sender<(ConnectionId, Event)>,
    link_rx: Receiver<()>,
    incoming_data_buffer: Arc<Mutex<VecDeque<Packet>>>,
    outgoing_data_buffer: Arc<Mutex<VecDeque<Notification>>>,
}

impl PendingLink {
    /// Awaits the router's ConnAck (without blocking the thread). Answers
    /// the router gave in the same pass (they came with its one signal) are
    /// in the returned link's receive cache. A router that refused the link
    /// (e.g. at `max_connections`) dropped its channel: an error.
    pub async fn established(self) -> Result<(LinkTx, LinkRx, Notification), LinkError> {
        self.link_rx.recv_async().await?;
        let (tx, mut rx, ack) = self.finish()?;
        {
            let mut sent = rx.send_buffer.lock();
            if !sent.is_empty() {
                mem::swap(&mut *sent, &mut rx.cache);
            }
        }
        Ok((tx, rx, ack))
    }

    /// Once the router has signalled the link: its ConnAck gives the id.
    fn finish(self) -> Result<(LinkTx, LinkRx, Notification), LinkError> {
        // Right now link identifies failure with dropped rx in router,
        // which is probably ok. We need this here to get id assigned by router
        let notification = {
            let mut buffer = self.outgoing_data_buffer.lock();
            let first = buffer.pop_front();
            // The router's first push allocated room for four
            // notifications (about a kilobyte): not kept by an idle link
            if buffer.is_empty() && buffer.capacity() > 0 {
                *buffer = VecDeque::new();
            }
            first.ok_or(LinkError::NotConnectionAck)?
        };
        let id = match notification {
            Notification::DeviceAck(Ack::ConnAck(id, ..)) => id,
            _message => return Err(LinkError::NotConnectionAck),
        };

        let tx = LinkTx::new(id, self.router_tx.clone(), self.incoming_data_buffer);
        let rx = LinkRx::new(id, self.router_tx, self.link_rx, self.outgoing_data_buffer);
        Ok((tx, rx, notification))
    }
}

/// A link's connection id: given by its ConnAck, or, for a quiet link
/// ([`LinkBuilder::connect_quiet_with`]), in a cell the router fills when
/// it registers the link.
#[derive(Debug, Clone)]
enum LinkId {
    Known(ConnectionId),
    Quiet(Arc<AtomicUsize>),
}

impl LinkId {
    /// The id (`usize::MAX` for a quiet link the router has not
    /// registered yet).
    fn get(&self) -> ConnectionId {
        match self {
            LinkId::Known(id) => *id,
            LinkId::Quiet(cell) => cell.load(Ordering::Relaxed),
        }
    }

    /// `event` addressed to this link: by its id, or, while a quiet link
    /// does not know it yet, with its cell for the router to read.
    fn event(&self, event: Event) -> (ConnectionId, Event) {
        match self {
            LinkId::Known(id) => (*id, event),
            LinkId::Quiet(cell) => match cell.load(Ordering::Relaxed) {
                UNASSIGNED => (
                    UNASSIGNED,
                    Event::OfQuietLink(cell.clone(), Box::new(event)),
                ),
                id => (id, event),
            },
        }
    }
}

pub struct LinkTx {
    id: LinkId,
    router_tx: Sender<(ConnectionId, Event)>,
    recv_buffer: Arc<Mutex<VecDeque<Packet>>>,
}

impl LinkTx {
    pub fn new(
        connection_id: ConnectionId,
        router_tx: Sender<(ConnectionId, Event)>,
        recv_buffer: Arc<Mutex<VecDeque<Packet>>>,
    ) -> LinkTx {
        LinkTx::with_id(LinkId::Known(connection_id), router_tx, recv_buffer)
    }

    fn with_id(
        id: LinkId,
        router_tx: Sender<(ConnectionId, Event)>,
        recv_buffer: Arc<Mutex<VecDeque<Packet>>>,
    ) -> LinkTx {
        LinkTx {
            id,
            router_tx,
            recv_buffer,
        }
    }

    /// The link's connection id (`usize::MAX` for a quiet link the router
    /// has not registered yet).
    pub fn connection_id(&self) -> ConnectionId {
        self.id.get()
    }

    pub fn buffer(&self) -> MutexGuard<RawMutex, VecDeque<Packet>> {
        self.recv_buffer.lock()
    }

    /// Whether the router still holds this link: it drops its end of the
    /// link's buffer when it disconnects the link (or stops), so a sender
    /// waiting for the router to take its backlog can tell a paused link
    /// (flow control) from a dropped one.
    pub fn is_linked(&self) -> bool {
        Arc::strong_count(&self.recv_buffer) > 1
    }

    /// Send raw device data
    fn push(&mut self, data: Packet) -> Result<usize, LinkError> {
        let len = {
            let mut buffer = self.recv_buffer.lock();
            buffer.push_back(data);
            buffer.len()
        };

        self.router_tx.send(self.id.event(Event::DeviceData))?;

        Ok(len)
    }

    /// Send raw device data. Waits (without blocking the thread) while the
    /// router's event channel is full.
    pub async fn send(&mut self, data: Packet) -> Result<usize, LinkError> {
        let len = {
            let mut buffer = self.recv_buffer.lock();
            buffer.push_back(data);
            buffer.len()
        };

        self.router_tx
            .send_async(self.id.event(Event::DeviceData))
            .await?;

        Ok(len)
    }

    fn try_push(&mut self, data: Packet) -> Result<usize, LinkError> {
        let len = {
            let mut buffer = self.recv_buffer.lock();
            buffer.push_back(data);
            buffer.len()
        };

        self.router_tx.try_send(self.id.event(Event::DeviceData))?;
        Ok(len)
    }

    pub(crate) async fn notify(&mut self) -> Result<(), LinkError> {
        self.router_tx
            .send_async(self.id.event(Event::DeviceData))
            .await?;

        Ok(())
    }

    /// Sends a MQTT Publish to the router
    pub fn publish<S, V>(&mut self, topic: S, payload: V) -> Result<usize, LinkError>
    where
        S: Into<Bytes>,
        V: Into<Bytes>,
    {
        let publish = Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: topic.into(),
            pkid: 0,
            payload: payload.into(),
        };

        let len = self.push(Packet::Publish(publish, None))?;
        Ok(len)
    }

    /// Sends a MQTT Publish to the router
    pub fn try_publish<S, V>(&mut self, topic: S, payload: V) -> Result<usize, LinkError>
    where
        S: Into<Bytes>,
        V: Into<Bytes>,
    {
        let publish = Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: topic.into(),
            pkid: 0,
            payload: payload.into(),
        };

        let len = self.try_push(Packet::Publish(publish, None))?;
        // TODO: Remote item in buffer after failure and write unittest
        Ok(len)
    }

    /// Sends a MQTT Subscribe to the eventloop
    pub fn subscribe<S: Into<String>>(&mut self, filter: S) -> Result<usize, LinkError> {
        let filters = vec![Filter {
            path: filter.into(),
            qos: QoS::AtMostOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::OnNewSubscribe,
        }];

        let subscribe = Subscribe { pkid: 0, filters };

        let len = self.push(Packet::Subscribe(subscribe, None))?;
        Ok(len)
    }

    /// Sends a MQTT Subscribe to the eventloop
    pub fn try_subscribe<S: Into<String>>(&mut self, filter: S) -> Result<usize, LinkError> {
        let filters = vec![Filter {
            path: filter.into(),
            qos: QoS::AtMostOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::OnNewSubscribe,
        }];

        let subscribe = Subscribe { pkid: 0, filters };

        let len = self.try_push(Packet::Subscribe(subscribe, None))?;
        Ok(len)
    }

    /// Sends a MQTT Unsubscribe to the eventloop
    pub fn unsubscribe<S: Into<String>>(&mut self, filter: S) -> Result<usize, LinkError> {
        let unsubscribe = Unsubscribe {
            pkid: 0,
            filters: vec![filter.into()],
        };

        let len = self.push(Packet::Unsubscribe(unsubscribe, None))?;
        Ok(len)
    }

    /// Sends a MQTT Unsubscribe to the eventloop
    pub fn try_unsubscribe<S: Into<String>>(&mut self, filter: S) -> Result<usize, LinkError> {
        let unsubscribe = Unsubscribe {
            pkid: 0,
            filters: vec![filter.into()],
        };

        let len = self.try_push(Packet::Unsubscribe(unsubscribe, None))?;
        Ok(len)
    }

    /// Request to get device shadow
    pub fn shadow<S: Into<String>>(&mut self, filter: S) -> Result<(), LinkError> {
        let message = Event::Shadow(ShadowRequest {
            filter: filter.into(),
        });

        self.router_tx.try_send(self.id.event(message))?;
        Ok(())
    }
}

#[derive(Debug)]
pub struct LinkRx {
    id: LinkId,
    router_tx: Sender<(ConnectionId, Event)>,
    router_rx: Receiver<()>,
    send_buffer: Arc<Mutex<VecDeque<Notification>>>,
    cache: VecDeque<Notification>,
}

impl LinkRx {
    pub fn new(
        connection_id: ConnectionId,
        router_tx: Sender<(ConnectionId, Event)>,
        router_rx: Receiver<()>,
        outgoing_data_buffer: Arc<Mutex<VecDeque<Notification>>>,
    ) -> LinkRx {
        LinkRx::with_id(
            LinkId::Known(connection_id),
            router_tx,
            router_rx,
            outgoing_data_buffer,
        )
    }

    fn with_id(
        id: LinkId,
        router_tx: Sender<(ConnectionId, Event)>,
        router_rx: Receiver<()>,
        outgoing_data_buffer: Arc<Mutex<VecDeque<Notification>>>,
    ) -> LinkRx {
        LinkRx {
            id,
            router_tx,
            router_rx,
            send_buffer: outgoing_data_buffer,
            // Sized on demand: `recv`/`next` swap it with the router's
            // buffer, so a preallocation here is a per-link cost that stays.
            cache: VecDeque::new(),
        }
    }

    /// The link's connection id (`usize::MAX` for a quiet link the router
    /// has not registered yet).
    pub fn id(&self) -> ConnectionId {
        self.id.get()
    }

    /// The next cached notification; the cache's storage is freed once it
    /// is drained. (The router swaps in a buffer of about a kilobyte, four
    /// notifications, for its first push; kept here, every idle link would
    /// hold it.)
    fn pop(&mut self) -> Option<Notification> {
        let next = self.cache.pop_front();
        if self.cache.is_empty() && self.cache.capacity() > 0 {
            self.cache = VecDeque::new();
        }
        next
    }

    pub fn recv(&mut self) -> Result<Option<Notification>, LinkError> {
        // Read from cache first
        // One router_rx trigger signifies a bunch of notifications. So we
        // should always check cache first
        match self.pop() {
            Some(v) => Ok(Some(v)),
            None => {
                // If cache is empty, check for router trigger and get fresh notifications
                self.router_rx.recv()?;
                // Collect 'all' the data in the buffer after a notification.
                // Notification means fresh data which isn't previously collected
                mem::swap(&mut *self.send_buffer.lock(), &mut self.cache);
                Ok(self.pop())
            }
        }
    }

    pub fn recv_deadline(&mut self, deadline: Instant) -> Result<Option<Notification>, LinkError> {
        // Read from cache first
        // One router_rx trigger signifies a bunch of notifications. So we
        // should always check cache first
        match self.pop() {
            Some(v) => Ok(Some(v)),
            None => {
                // If cache is empty, check for router trigger and get fresh notifications
                self.router_rx.recv_deadline(deadline)?;
                mem::swap(&mut *self.send_buffer.lock(), &mut self.cache);
                Ok(self.pop())
            }
        }
    }

    pub async fn next(&mut self) -> Result<Option<Notification>, LinkError> {
        // Read from cache first
        // One router_rx trigger signifies a bunch of notifications. So we
        // should always check cache first
        match self.pop() {
            Some(v) => Ok(Some(v)),
            None => {
                // If cache is empty, check for router trigger and get fresh notifications
                self.router_rx.recv_async().await?;
                // Collect 'all' the data in the buffer after a notification.
                // Notification means fresh data which isn't previously collected
                mem::swap(&mut *self.send_buffer.lock(), &mut self.cache);
                Ok(self.pop())
            }
        }
    }

    pub(crate) async fn exchange(
        &mut self,
        notifications: &mut VecDeque<Notification>,
    ) -> Result<(), LinkError> {
        self.router_rx.recv_async().await?;
        mem::swap(&mut *self.send_buffer.lock(), notifications);
        Ok(())
    }

    pub fn ready(&self) -> Result<(), LinkError> {
        self.router_tx.send(self.id.event(Event::Ready))?;
        Ok(())
    }

    pub async fn wake(&self) -> Result<(), LinkError> {
        self.router_tx
            .send_async(self.id.event(Event::Ready))
            .await?;

        Ok(())
    }

    /// Waits until notifications are cached: at once if some are, else
    /// for the router's signal, then takes what it sent into the cache
    /// (possibly nothing). Read them with [`Self::try_next`]. Cancel safe.
    /// Unlike [`Self::next`], its future holds no notification: a task
    /// waiting on many idle links stays small.
    pub async fn wait_for_notifications(&mut self) -> Result<(), LinkError> {
        if !self.cache.is_empty() {
            return Ok(());
        }
        self.router_rx.recv_async().await?;
        mem::swap(&mut *self.send_buffer.lock(), &mut self.cache);
        Ok(())
    }

    /// The next cached notification, without waiting; the cache's storage
    /// is freed once it is drained (an idle link keeps no slots).
    pub fn try_next(&mut self) -> Option<Notification> {
        self.pop()
    }
}

#[cfg(test)]
mod test {
    use super::LinkTx;
    use flume::bounded;
    use parking_lot::Mutex;
    use std::{collections::VecDeque, sync::Arc, thread};

    #[test]
    fn push_sends_all_data_and_notifications_to_router() {
        let (router_tx, router_rx) = bounded(10);
        let mut buffers = Vec::new();
        const CONNECTIONS: usize = 1000;
        const MESSAGES_PER_CONNECTION: usize = 100;

        for i in 0..CONNECTIONS {
            let buffer = Arc::new(Mutex::new(VecDeque::new()));
            let mut link_tx = LinkTx::new(i, router_tx.clone(), buffer.clone());
            buffers.push(buffer);
            thread::spawn(move || {
                for _ in 0..MESSAGES_PER_CONNECTION {
                    link_tx.publish("hello/world", vec![1, 2, 3]).unwrap();
                }
            });
        }

        // Router should receive notifications from all the connections
        for _ in 0..CONNECTIONS * MESSAGES_PER_CONNECTION {
            let _v = router_rx.recv().unwrap();
        }

        // Every connection has expected number of messages
        for item in buffers.iter().take(CONNECTIONS) {
            assert_eq!(item.lock().len(), MESSAGES_PER_CONNECTION);
        }

        // TODO: Write a similar test to benchmark buffer vs channels
    }

    fn router(
        max_connections: usize,
    ) -> flume::Sender<(crate::ConnectionId, crate::router::Event)> {
        let config = crate::RouterConfig {
            max_connections,
            max_outgoing_packet_count: 200,
            max_segment_size: 1024 * 1024,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
            ..Default::default()
        };
        crate::Router::new(0, config).spawn()
    }

    // One thread, many links in creation at once: `build_async` never holds
    // the thread for the router's round trip.
    #[tokio::test(flavor = "current_thread")]
    async fn build_async_creates_many_links_concurrently_on_one_thread() {
        const LINKS: usize = 200;
        let router_tx = router(LINKS);
        let mut builds = tokio::task::JoinSet::new();
        for i in 0..LINKS {
            let router_tx = router_tx.clone();
            builds.spawn(async move {
                super::LinkBuilder::new(&format!("client-{i}"), router_tx)
                    .dynamic_filters(true)
                    .build_async()
                    .await
            });
        }
        let mut seen = std::collections::HashSet::new();
        while let Some(link) = builds.join_next().await {
            let (tx, _rx, ack) = link.expect("task").expect("link built");
            assert!(matches!(
                ack,
                crate::Notification::DeviceAck(crate::router::Ack::ConnAck(..))
            ));
            assert!(seen.insert(tx.connection_id()), "ids are distinct");
        }
        assert_eq!(seen.len(), LINKS);
    }

    // The link works: a subscription made over it is acknowledged.
    #[tokio::test(flavor = "current_thread")]
    async fn build_async_link_carries_traffic() {
        let router_tx = router(4);
        let (mut tx, mut rx, _ack) = super::LinkBuilder::new("sub", router_tx)
            .build_async()
            .await
            .expect("link built");
        tx.subscribe("a/b").expect("subscribe sent");
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), rx.next())
            .await
            .expect("SUBACK in time")
            .expect("link open");
        assert!(
            matches!(
                n,
                Some(crate::Notification::DeviceAck(crate::router::Ack::SubAck(
                    _
                )))
            ),
            "{n:?}"
        );
    }

    fn subscribe_packet(pkid: u16, path: &str) -> crate::protocol::Packet {
        crate::protocol::Packet::Subscribe(
            crate::protocol::Subscribe {
                pkid,
                filters: vec![crate::protocol::Filter {
                    path: path.to_owned(),
                    qos: crate::protocol::QoS::AtLeastOnce,
                    nolocal: false,
                    preserve_retain: false,
                    retain_forward_rule: crate::protocol::RetainForwardRule::OnEverySubscribe,
                }],
            },
            None,
        )
    }

    async fn next_notification(rx: &mut super::LinkRx) -> crate::Notification {
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                if let Some(n) = rx.next().await.expect("link open") {
                    return n;
                }
            }
        })
        .await
        .expect("notification in time")
    }

    // A SUBSCRIBE carried by a Connect is in effect for whatever is sent
    // once the Connect is in the router's channel, before the ConnAck is
    // read.
    #[tokio::test(flavor = "current_thread")]
    async fn connect_async_with_orders_the_first_packets_before_later_sends() {
        let router_tx = router(4);
        let pending = super::LinkBuilder::new("sub", router_tx.clone())
            .dynamic_filters(true)
            .connect_async_with([subscribe_packet(3, "a/+")])
            .await
            .expect("connect sent");
        let (mut publisher, _prx, _) = super::LinkBuilder::new("pub", router_tx)
            .dynamic_filters(true)
            .build_async()
            .await
            .expect("publisher linked");
        publisher.publish("a/b", vec![1, 2, 3]).expect("published");
        let (_tx, mut rx, ack) = pending.established().await.expect("link built");
        assert!(matches!(
            ack,
            crate::Notification::DeviceAck(crate::router::Ack::ConnAck(..))
        ));
        let n = next_notification(&mut rx).await;
        assert!(
            matches!(
                &n,
                crate::Notification::DeviceAck(crate::router::Ack::SubAck(s)) if s.pkid == 3
            ),
            "{n:?}"
        );
        let n = next_notification(&mut rx).await;
        assert!(
            matches!(&n, crate::Notification::Forward(f) if f.publish.topic == "a/b"),
            "{n:?}"
        );
    }

    // Packets queued with the Connect are taken right after the ConnAck:
    // their answer is waiting in the new link, with no send of its own.
    #[tokio::test(flavor = "current_thread")]
    async fn build_async_with_carries_the_first_packets() {
        let router_tx = router(4);
        let subscribe = subscribe_packet(7, "a/b");
        let (_tx, mut rx, ack) = super::LinkBuilder::new("sub", router_tx)
            .build_async_with([subscribe])
            .await
            .expect("link built");
        assert!(matches!(
            ack,
            crate::Notification::DeviceAck(crate::router::Ack::ConnAck(..))
        ));
        let n = next_notification(&mut rx).await;
        assert!(
            matches!(
                &n,
                crate::Notification::DeviceAck(crate::router::Ack::SubAck(s)) if s.pkid == 7
            ),
            "{n:?}"
        );
    }

    // `wait_for_notifications` then `try_next` read what `next` would, and
    // a drained cache keeps no storage.
    #[tokio::test(flavor = "current_thread")]
    async fn wait_then_try_next_reads_and_frees_the_cache() {
        let router_tx = router(4);
        let (mut tx, mut rx, _ack) = super::LinkBuilder::new("sub", router_tx)
            .build_async()
            .await
            .expect("link built");
        assert!(rx.try_next().is_none());
        tx.subscribe("a/b").expect("subscribe sent");
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                rx.wait_for_notifications().await.expect("link open");
                if let Some(n) = rx.try_next() {
                    return n;
                }
            }
        })
        .await
        .expect("SUBACK in time");
        assert!(
            matches!(
                n,
                crate::Notification::DeviceAck(crate::router::Ack::SubAck(_))
            ),
            "{n:?}"
        );
        assert!(rx.try_next().is_none());
        assert_eq!(rx.cache.capacity(), 0);
    }

    // Neither side of the swap keeps notification slots for an idle link:
    // after the ConnAck, and after each SubAck read.
    #[tokio::test(flavor = "current_thread")]
    async fn an_idle_link_holds_no_notification_slots() {
        let router_tx = router(4);
        let (mut tx, mut rx, _ack) = super::LinkBuilder::new("idle", router_tx)
            .build_async()
            .await
            .expect("link built");
        assert_eq!(rx.send_buffer.lock().capacity(), 0);
        for filter in ["a/b", "c/+"] {
            tx.subscribe(filter).expect("subscribe sent");
            let n = tokio::time::timeout(std::time::Duration::from_secs(10), rx.next())
                .await
                .expect("SUBACK in time")
                .expect("link open");
            assert!(
                matches!(
                    n,
                    Some(crate::Notification::DeviceAck(crate::router::Ack::SubAck(
                        _
                    )))
                ),
                "{n:?}"
            );
            assert_eq!(rx.cache.capacity(), 0);
            assert_eq!(rx.send_buffer.lock().capacity(), 0);
        }
    }

    // A quiet link gets no ConnAck and no SubAck: its first notification is
    // the first message for its subscription. What it sends before it
    // knows its id (right after the Connect) reaches the router, and it
    // learns its id once the router registered it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_quiet_link_gets_no_acks_and_learns_its_id() {
        let router_tx = router(4);
        let (mut quiet_tx, mut quiet_rx) = super::LinkBuilder::new("quiet", router_tx.clone())
            .dynamic_filters(true)
            .connect_quiet_with([subscribe_packet(1, "q/cmd")])
            .await
            .expect("connect sent");
        // Sent at once, before the router can have registered the link
        quiet_tx
            .send(subscribe_packet(2, "q/other"))
            .await
            .expect("sent");
        let (mut tx, mut rx, _ack) = super::LinkBuilder::new("pub", router_tx)
            .dynamic_filters(true)
            .build_async_with([subscribe_packet(3, "q/echo")])
            .await
            .expect("link built");
        // The publisher's link was built after the quiet one's Connect and
        // SUBSCRIBEs, so the router registered the quiet link first
        assert_ne!(quiet_tx.connection_id(), usize::MAX);
        assert_eq!(quiet_rx.id(), quiet_tx.connection_id());
        assert_ne!(quiet_tx.connection_id(), tx.connection_id());
        for topic in ["q/cmd", "q/other"] {
            tx.send(crate::protocol::Packet::Publish(
                crate::protocol::Publish::new(topic, "x", false),
                None,
            ))
            .await
            .expect("published");
            let n = next_notification(&mut quiet_rx).await;
            assert!(
                matches!(&n, crate::Notification::Forward(f) if f.publish.topic == topic),
                "{n:?}"
            );
        }
        // Its sends by id reach the router too
        quiet_tx
            .send(crate::protocol::Packet::Publish(
                crate::protocol::Publish::new("q/echo", "y", false),
                None,
            ))
            .await
            .expect("published");
        loop {
            match next_notification(&mut rx).await {
                crate::Notification::DeviceAck(_) => {}
                n => {
                    assert!(
                        matches!(&n, crate::Notification::Forward(f) if f.publish.topic == "q/echo"),
                        "{n:?}"
                    );
                    break;
                }
            }
        }
        assert!(quiet_rx.try_next().is_none(), "no ack was sent");
    }

    // A retained message published after a SUBSCRIBE, both taken by the
    // router in one pass before it serves the new subscription, reaches the
    // subscriber once, as a live message (retain 0): not also as a retained
    // one read when the subscription is first served.
    #[tokio::test(flavor = "current_thread")]
    async fn a_retained_publish_right_after_a_subscribe_arrives_once_as_live() {
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let config = crate::RouterConfig {
            max_connections: 4,
            max_outgoing_packet_count: 200,
            max_segment_size: 1024 * 1024,
            max_segment_count: 4,
            ..Default::default()
        };
        // The router waits until both links' packets are in its channel
        let router_tx = crate::Router::new(0, config).spawn_with(move || {
            let _ = go_rx.recv();
        });
        let mut subscribe = subscribe_packet(1, "r/t");
        if let crate::protocol::Packet::Subscribe(s, _) = &mut subscribe {
            s.filters[0].qos = crate::protocol::QoS::AtMostOnce;
        }
        let (_sub_tx, mut sub_rx) = super::LinkBuilder::new("sub", router_tx.clone())
            .dynamic_filters(true)
            .connect_quiet_with([subscribe])
            .await
            .expect("connect sent");
        let (mut pub_tx, _pub_rx) = super::LinkBuilder::new("pub", router_tx)
            .dynamic_filters(true)
            .connect_quiet_with([crate::protocol::Packet::Publish(
                crate::protocol::Publish::new("r/t", "x", true),
                None,
            )])
            .await
            .expect("connect sent");
        go_tx.send(()).expect("router waiting");
        let n = next_notification(&mut sub_rx).await;
        assert!(
            matches!(&n, crate::Notification::Forward(f) if f.publish.payload == "x" && !f.publish.retain),
            "{n:?}"
        );
        // Whatever the router sends next comes before this marker
        pub_tx
            .send(crate::protocol::Packet::Publish(
                crate::protocol::Publish::new("r/t", "marker", false),
                None,
            ))
            .await
            .expect("published");
        let n = next_notification(&mut sub_rx).await;
        assert!(
            matches!(&n, crate::Notification::Forward(f) if f.publish.payload == "marker"),
            "a second copy before the marker: {n:?}"
        );
    }

    // `spawn_with` runs its hook on the router's thread, before the router
    // takes events.
    #[tokio::test(flavor = "current_thread")]
    async fn spawn_with_runs_the_hook_on_the_router_thread() {
        let (name_tx, name_rx) = std::sync::mpsc::channel();
        let config = crate::RouterConfig {
            max_connections: 4,
            max_outgoing_packet_count: 200,
            max_segment_size: 1024 * 1024,
            max_segment_count: 4,
            ..Default::default()
        };
        let router_tx = crate::Router::new(7, config).spawn_with(move || {
            let _ = name_tx.send(thread::current().name().map(str::to_owned));
        });
        let name = name_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("hook ran");
        assert_eq!(name.as_deref(), Some("router-7"));
        let built = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            super::LinkBuilder::new("c", router_tx).build_async(),
        )
        .await
        .expect("answered in time");
        assert!(built.is_ok(), "{:?}", built.err());
    }

    // A router without room drops a quiet link: its receiver fails, and
    // what it sends is ignored (the router keeps running).
    #[tokio::test(flavor = "current_thread")]
    async fn a_quiet_link_the_router_refuses_fails_its_receiver() {
        let router_tx = router(1);
        let (_first_tx, _first_rx, _) = super::LinkBuilder::new("first", router_tx.clone())
            .build_async()
            .await
            .expect("first link");
        let (mut tx, mut rx) = super::LinkBuilder::new("second", router_tx.clone())
            .connect_quiet_with([subscribe_packet(1, "a")])
            .await
            .expect("connect sent");
        let waited = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            rx.wait_for_notifications(),
        )
        .await
        .expect("answered in time");
        assert!(waited.is_err());
        assert_eq!(tx.connection_id(), usize::MAX);
        tx.send(subscribe_packet(2, "b")).await.expect("sent");
        // The router is still there and answers others
        let third = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            super::LinkBuilder::new("first", router_tx).build_async(),
        )
        .await
        .expect("answered in time");
        assert!(third.is_ok(), "{:?}", third.err());
    }

    // A router without room drops the link: an error, not a hang.
    #[tokio::test(flavor = "current_thread")]
    async fn build_async_fails_when_the_router_is_full() {
        let router_tx = router(1);
        let _first = super::LinkBuilder::new("first", router_tx.clone())
            .build_async()
            .await
            .expect("first link");
        let second = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            super::LinkBuilder::new("second", router_tx).build_async(),
        )
        .await
        .expect("answered in time");
        assert!(
            matches!(second, Err(super::LinkError::Recv(_))),
            "{:?}",
            second.err()
        );
    }

    // `send` waits for room in a full router channel instead of blocking
    // the thread (here the only thread, which must go on to drain it).
    #[tokio::test(flavor = "current_thread")]
    async fn send_waits_without_blocking_the_thread() {
        let (router_tx, router_rx) = bounded(1);
        let buffer = Arc::new(Mutex::new(VecDeque::new()));
        let mut link_tx = LinkTx::new(7, router_tx.clone(), buffer.clone());
        router_tx
            .send((0, crate::router::Event::Ready))
            .expect("fills the channel");
        let publish = crate::protocol::Publish::new("a/b", "x", false);
        let sending = tokio::spawn(async move {
            link_tx
                .send(crate::protocol::Packet::Publish(publish, None))
                .await
        });
        // The send is parked on the full channel; this thread goes on.
        tokio::task::yield_now().await;
        assert!(!sending.is_finished());
        assert!(router_rx.recv_async().await.is_ok());
        let (id, _event) = router_rx.recv_async().await.expect("the send's event");
        assert_eq!(id, 7);
        assert_eq!(sending.await.expect("task").expect("sent"), 1);
        assert_eq!(buffer.lock().len(), 1);
    }
}
