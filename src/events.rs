//! The internal event stream. The ledger, the gate and the connection layer
//! publish here; the admin plane relays it to `admin/v1/events/{kind}`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::broadcast;

use crate::clock::{format_time, Millis};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum EventKind {
    #[serde(rename = "device/activated")]
    DeviceActivated,
    #[serde(rename = "device/renewed")]
    DeviceRenewed,
    #[serde(rename = "device/rejected")]
    DeviceRejected,
    #[serde(rename = "device/connected")]
    DeviceConnected,
    #[serde(rename = "device/disconnected")]
    DeviceDisconnected,
    #[serde(rename = "device/expiring")]
    DeviceExpiring,
    #[serde(rename = "device/expired")]
    DeviceExpired,
    #[serde(rename = "device/deleted")]
    DeviceDeleted,
    #[serde(rename = "product/deleted")]
    ProductDeleted,
    #[serde(rename = "codes/purchased")]
    CodesPurchased,
    #[serde(rename = "codes/assigned")]
    CodesAssigned,
    #[serde(rename = "pool/low")]
    PoolLow,
}

impl EventKind {
    pub const ALL: [EventKind; 12] = [
        EventKind::DeviceActivated,
        EventKind::DeviceRenewed,
        EventKind::DeviceRejected,
        EventKind::DeviceConnected,
        EventKind::DeviceDisconnected,
        EventKind::DeviceExpiring,
        EventKind::DeviceExpired,
        EventKind::DeviceDeleted,
        EventKind::ProductDeleted,
        EventKind::CodesPurchased,
        EventKind::CodesAssigned,
        EventKind::PoolLow,
    ];

    /// This kind's place in [`EventKind::ALL`].
    fn index(self) -> usize {
        self as usize
    }

    /// The `{kind}` segment of `admin/v1/events/{kind}`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::DeviceActivated => "device/activated",
            EventKind::DeviceRenewed => "device/renewed",
            EventKind::DeviceRejected => "device/rejected",
            EventKind::DeviceConnected => "device/connected",
            EventKind::DeviceDisconnected => "device/disconnected",
            EventKind::DeviceExpiring => "device/expiring",
            EventKind::DeviceExpired => "device/expired",
            EventKind::DeviceDeleted => "device/deleted",
            EventKind::ProductDeleted => "product/deleted",
            EventKind::CodesPurchased => "codes/purchased",
            EventKind::CodesAssigned => "codes/assigned",
            EventKind::PoolLow => "pool/low",
        }
    }
}

/// One event: its kind, when, and the keys and details involved, rendered as
/// the JSON object `{"Event": kind, "At": time, ...fields}` (keys in
/// alphabetical order).
///
/// Events are made on every connect and disconnect, so an event is cheap to
/// make (fields are named by `&'static str`), shared rather than copied by
/// the bus (every receiver gets the same `Arc`), and rendered only by a
/// receiver that sends it somewhere.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: EventKind,
    pub at: Millis,
    fields: Vec<(&'static str, serde_json::Value)>,
    /// Times, rendered as `YYYY-MM-DD HH:MM:SS` only when the event is.
    times: Vec<(&'static str, Millis)>,
}

impl Event {
    pub fn new(kind: EventKind, at: Millis) -> Self {
        Event {
            kind,
            at,
            fields: Vec::with_capacity(6),
            times: Vec::new(),
        }
    }

    /// Sets `key` (replacing an earlier value of the same key).
    pub fn with(mut self, key: &'static str, value: impl Into<serde_json::Value>) -> Self {
        let value = value.into();
        match self.fields.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.fields.push((key, value)),
        }
        self
    }

    /// A time field, formatted when the event is rendered.
    pub fn with_time(mut self, key: &'static str, at: Millis) -> Self {
        self.times.retain(|(k, _)| *k != key);
        self.times.push((key, at));
        self
    }

    pub fn device(self, product_key: &str, device_key: &str) -> Self {
        self.with("ProductKey", product_key)
            .with("DeviceKey", device_key)
    }

    /// The value of the field `key`.
    pub fn field(&self, key: &str) -> Option<&serde_json::Value> {
        self.fields.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// The event as a JSON value.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// The event as JSON text, written by serde_json straight from the
    /// event (the same text as [`Self::to_json`] rendered).
    pub fn render(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from("null"))
    }

    /// Every key and value of the rendered object; a field named like
    /// `Event` or `At` or a time field overrides what comes before it.
    fn entries(&self) -> Vec<(&'static str, Entry<'_>)> {
        fn put<'a>(entries: &mut Vec<(&'static str, Entry<'a>)>, k: &'static str, v: Entry<'a>) {
            match entries.iter_mut().find(|e| e.0 == k) {
                Some(slot) => slot.1 = v,
                None => entries.push((k, v)),
            }
        }
        let mut entries = Vec::with_capacity(2 + self.fields.len() + self.times.len());
        put(&mut entries, "Event", Entry::Str(self.kind.as_str()));
        put(&mut entries, "At", Entry::Owned(format_time(self.at)));
        for (k, v) in &self.fields {
            put(&mut entries, k, Entry::Value(v));
        }
        for (k, t) in &self.times {
            put(&mut entries, k, Entry::Owned(format_time(*t)));
        }
        entries
    }
}

/// The rendered object, keys in alphabetical order (as a
/// `serde_json::Map` orders them). Serialising strings and maps cannot fail.
impl Serialize for Event {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut entries = self.entries();
        entries.sort_unstable_by_key(|(k, _)| *k);
        let mut map = serializer.serialize_map(Some(entries.len()))?;
        for (k, v) in &entries {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// One value of a rendered event.
#[derive(Serialize)]
#[serde(untagged)]
enum Entry<'a> {
    Str(&'static str),
    Owned(String),
    Value(&'a serde_json::Value),
}

/// A cheap, cloneable publisher. Publishing never blocks; an event nobody
/// wants is not sent (and a caller that checks [`EventBus::wants`] first
/// does not even make it: a connection flood makes two events per device).
///
/// Who wants an event of a kind: any receiver of every kind
/// ([`EventBus::subscribe`]: the console's event stream, tests); a receiver
/// of some kinds ([`EventBus::subscribe_to`]: the enforcer, deletions only)
/// when the kind is among them; and MQTT subscribers of
/// `admin/v1/events/…`, through [`EventBus::mqtt_interest`]: the gateway
/// raises that flag at the first allowed SUBSCRIBE whose filter can match an
/// event topic, before its SUBACK is written, and it stays raised (a stored
/// session keeps its subscription while offline), so no event after a
/// SUBACK is skipped.
#[derive(Clone, Debug)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<Event>>,
    interest: Arc<Interest>,
}

/// What the receivers of an [`EventBus`] want.
#[derive(Debug, Default)]
struct Interest {
    /// Receivers of some kinds only (among the channel's receivers).
    partial: AtomicUsize,
    /// Per kind (index in [`EventKind::ALL`]), the receivers of some kinds that take it.
    kinds: [AtomicUsize; EventKind::ALL.len()],
    /// Some MQTT session has subscribed to an event topic.
    mqtt: Arc<AtomicBool>,
}

impl EventBus {
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(16));
        EventBus {
            tx,
            interest: Arc::default(),
        }
    }

    /// Whether an event of `kind` published now would reach anyone.
    pub fn wants(&self, kind: EventKind) -> bool {
        let i = &self.interest;
        // A receiver of some kinds counts itself in `partial` only once it
        // exists and stops counting before it is gone, so this errs
        // towards sending.
        self.tx.receiver_count() > i.partial.load(Ordering::SeqCst)
            || i.kinds[kind.index()].load(Ordering::SeqCst) > 0
            || i.mqtt.load(Ordering::SeqCst)
    }

    pub fn publish(&self, event: Event) {
        if self.wants(event.kind) {
            let _ = self.tx.send(Arc::new(event));
        }
    }

    /// A receiver of every event.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }

    /// A receiver of the events of `kinds`, and of any other event that
    /// someone else wants when it is sent (so check the kind).
    pub fn subscribe_to(&self, kinds: &[EventKind]) -> KindsReceiver {
        let kinds: Vec<EventKind> = kinds.to_vec();
        for k in &kinds {
            self.interest.kinds[k.index()].fetch_add(1, Ordering::SeqCst);
        }
        let rx = self.tx.subscribe();
        self.interest.partial.fetch_add(1, Ordering::SeqCst);
        KindsReceiver {
            rx,
            kinds,
            interest: self.interest.clone(),
        }
    }

    /// The flag that MQTT subscribers of `admin/v1/events/…` exist (the
    /// gateway raises it; see [`EventBus`]).
    pub fn mqtt_interest(&self) -> Arc<AtomicBool> {
        self.interest.mqtt.clone()
    }

    /// Whether MQTT subscribers of `admin/v1/events/…` exist.
    pub fn mqtt_wanted(&self) -> bool {
        self.interest.mqtt.load(Ordering::SeqCst)
    }
}

/// A receiver of some kinds of events ([`EventBus::subscribe_to`]); reads
/// like a `broadcast::Receiver`.
#[derive(Debug)]
pub struct KindsReceiver {
    rx: broadcast::Receiver<Arc<Event>>,
    kinds: Vec<EventKind>,
    interest: Arc<Interest>,
}

impl KindsReceiver {
    pub async fn recv(&mut self) -> Result<Arc<Event>, broadcast::error::RecvError> {
        self.rx.recv().await
    }

    pub fn try_recv(&mut self) -> Result<Arc<Event>, broadcast::error::TryRecvError> {
        self.rx.try_recv()
    }
}

impl Drop for KindsReceiver {
    fn drop(&mut self) {
        // Uncounted while its receiver still exists (dropped after this):
        // for the others' kinds that errs towards sending; this receiver's
        // own kinds no longer matter.
        self.interest.partial.fetch_sub(1, Ordering::SeqCst);
        for k in &self.kinds {
            self.interest.kinds[k.index()].fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus::new(65_536)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_text_is_the_json_value_with_sorted_keys() {
        let e = Event::new(EventKind::DeviceConnected, 1_764_000_000_000)
            .device("pk\"1", "dk\n1")
            .with("Quantity", 3)
            .with("Ip", "127.0.0.1")
            .with("Reason", "café \\ tab\t")
            .with_time("ExpiresAt", 1_764_000_100_000);
        let text = e.render();
        let parsed: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(parsed, e.to_json());
        assert_eq!(text, e.to_json().to_string());
        assert_eq!(parsed["Event"], "device/connected");
        assert_eq!(parsed["At"], "2025-11-24 16:00:00");
        assert_eq!(parsed["ExpiresAt"], "2025-11-24 16:01:40");
        assert_eq!(e.field("DeviceKey"), Some(&"dk\n1".into()));
    }

    #[test]
    fn later_values_replace_earlier_ones() {
        let e = Event::new(EventKind::DeviceRejected, 0)
            .with("Reason", "a")
            .with("Reason", "b")
            .with("Event", "overridden");
        let v = e.to_json();
        assert_eq!(v["Reason"], "b");
        assert_eq!(v["Event"], "overridden");
        assert_eq!(e.render(), v.to_string());
    }

    #[test]
    fn kinds_index_their_place_in_all() {
        for (i, k) in EventKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i, "{k:?}");
        }
    }

    #[tokio::test]
    async fn an_event_is_sent_only_when_someone_wants_its_kind() {
        let bus = EventBus::new(16);
        let wanted = |bus: &EventBus| -> Vec<EventKind> {
            EventKind::ALL
                .into_iter()
                .filter(|k| bus.wants(*k))
                .collect()
        };
        assert!(wanted(&bus).is_empty(), "no receiver");

        let mut deletions =
            bus.subscribe_to(&[EventKind::DeviceDeleted, EventKind::ProductDeleted]);
        let mut none = bus.subscribe_to(&[]);
        assert_eq!(
            wanted(&bus),
            vec![EventKind::DeviceDeleted, EventKind::ProductDeleted]
        );
        bus.publish(Event::new(EventKind::DeviceConnected, 1));
        bus.publish(Event::new(EventKind::DeviceDeleted, 2));
        assert_eq!(deletions.recv().await.expect("sent").at, 2);
        assert_eq!(none.recv().await.expect("others get what is sent").at, 2);
        assert!(deletions.try_recv().is_err(), "the connect was not sent");

        // A receiver of every kind (the console's stream) wants everything.
        let all = bus.subscribe();
        assert_eq!(wanted(&bus).len(), EventKind::ALL.len());
        drop(all);
        assert_eq!(wanted(&bus).len(), 2);

        // So does an MQTT subscriber of the event topics, for good.
        bus.mqtt_interest().store(true, Ordering::SeqCst);
        assert!(bus.mqtt_wanted());
        assert_eq!(wanted(&bus).len(), EventKind::ALL.len());
        bus.mqtt_interest().store(false, Ordering::SeqCst);

        drop(deletions);
        drop(none);
        assert!(wanted(&bus).is_empty(), "dropped receivers want nothing");
    }

    #[tokio::test]
    async fn every_receiver_shares_one_event() {
        let bus = EventBus::new(16);
        bus.publish(Event::new(EventKind::PoolLow, 0));
        let (mut a, mut b) = (bus.subscribe(), bus.subscribe());
        bus.publish(Event::new(EventKind::PoolLow, 1));
        let (x, y) = (a.recv().await.expect("a"), b.recv().await.expect("b"));
        assert!(Arc::ptr_eq(&x, &y));
        assert_eq!(x.at, 1);
    }
}
