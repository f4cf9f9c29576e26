//! The internal event stream. The ledger, the gate and the connection layer
//! publish here; the admin plane relays it to `admin/v1/events/{kind}`.

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
/// the JSON object `{"Event": kind, "At": time, ...fields}`.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: EventKind,
    pub at: Millis,
    pub fields: serde_json::Map<String, serde_json::Value>,
    /// Times, rendered as `YYYY-MM-DD HH:MM:SS` only when the event is.
    pub times: Vec<(&'static str, Millis)>,
}

impl Event {
    pub fn new(kind: EventKind, at: Millis) -> Self {
        Event {
            kind,
            at,
            fields: serde_json::Map::new(),
            times: Vec::new(),
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.fields.insert(key.to_owned(), value.into());
        self
    }

    /// A time field, formatted when the event is rendered.
    pub fn with_time(mut self, key: &'static str, at: Millis) -> Self {
        self.times.push((key, at));
        self
    }

    pub fn device(self, product_key: &str, device_key: &str) -> Self {
        self.with("ProductKey", product_key)
            .with("DeviceKey", device_key)
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("Event".into(), self.kind.as_str().into());
        m.insert("At".into(), format_time(self.at).into());
        for (k, v) in &self.fields {
            m.insert(k.clone(), v.clone());
        }
        for (k, t) in &self.times {
            m.insert((*k).to_owned(), format_time(*t).into());
        }
        serde_json::Value::Object(m)
    }
}

/// A cheap, cloneable publisher. Publishing never blocks; with no
/// subscriber the event is dropped.
#[derive(Clone, Debug)]
pub struct EventBus {
    tx: broadcast::Sender<Event>,
}

impl EventBus {
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(16));
        EventBus { tx }
    }

    pub fn publish(&self, event: Event) {
        let _ = self.tx.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus::new(65_536)
    }
}
