//! Online enforcement (SPEC §3): when the code of an online device expires
//! it is renewed on the spot if allowed, otherwise the device is
//! disconnected; deleting a device or its product disconnects it too. Also
//! announces `device/expired` for every code that expires while the broker
//! runs.
//!
//! It watches the ledger's current-expiry index with the injected clock,
//! re-read when device records change (new codes: the ledger's device
//! generation), and the event stream for deletions. Should it fall behind
//! the stream (events dropped), it checks every online device against the
//! ledger instead.

use std::sync::Arc;

use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use crate::clock::{Clock, Millis};
use crate::credentials::client_id;
use crate::events::{Event, EventKind};
use crate::gate::{Gate, GateRefusal};
use crate::gateway::{DisconnectReason, Identity, OnlineRegistry};
use crate::ledger::{LedgerError, Removal};

/// How long the enforcer lets events gather after waking for one (at
/// 10,000 connects a second, about 100 at a time). A deletion disconnects
/// its devices at most this much later.
const EVENT_LINGER: std::time::Duration = std::time::Duration::from_millis(10);

pub struct Enforcer {
    pub gate: Arc<Gate>,
    pub online: Arc<OnlineRegistry>,
    pub clock: Clock,
}

impl Enforcer {
    /// Runs until the event stream closes.
    pub async fn run(self) {
        let ledger = self.gate.ledger().clone();
        let events = ledger.events().clone();
        // Of the events only deletions matter here: connects and
        // disconnects (most events) are not even sent to this task.
        let mut rx = events.subscribe_to(&[EventKind::DeviceDeleted, EventKind::ProductDeleted]);
        // New expiries (activations and renewals, here or through another
        // node) show as a new device generation.
        let mut changes = ledger.device_changes();
        // Deletions made through other nodes (etcd store): this node learns
        // them from its replica, not from its own events.
        let mut removals = ledger.replica_removals();
        // Expiries up to here are handled.
        let mut swept_until: Millis = self.clock.now();
        // The earliest expiry after `swept_until`, read at device generation
        // `known` (re-read only when device records change).
        let mut next: Option<Millis> = None;
        let mut known: Option<u64> = None;
        loop {
            let generation = *changes.borrow_and_update();
            if known != Some(generation) {
                known = Some(generation);
                // Index reads take the ledger's read lock, which waits while
                // a batch is being flushed: keep them off the async workers.
                let l = ledger.clone();
                let after = swept_until;
                next = tokio::task::spawn_blocking(move || l.next_expiry_after(after))
                    .await
                    .unwrap_or(None);
            }
            tokio::select! {
                _ = async {
                    match next {
                        Some(at) => self.clock.sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {}
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // A flood of activations commits a batch every few
                    // milliseconds: read the index once for many.
                    tokio::time::sleep(EVENT_LINGER).await;
                }
                rm = removals.recv() => match rm {
                    Ok(r) => self.on_removal(&r),
                    Err(RecvError::Lagged(n)) => self.resync(n).await,
                    // The ledger (which holds the sender) is gone.
                    Err(RecvError::Closed) => return,
                },
                ev = rx.recv() => match ev {
                    Ok(e) => {
                        self.on_event(&e);
                        // Let events gather (a connection flood brings tens
                        // of thousands a second, nearly all irrelevant here)
                        // and take them together.
                        tokio::time::sleep(EVENT_LINGER).await;
                        loop {
                            match rx.try_recv() {
                                Ok(e) => self.on_event(&e),
                                Err(TryRecvError::Lagged(n)) => self.resync(n).await,
                                Err(TryRecvError::Empty) => break,
                                Err(TryRecvError::Closed) => return,
                            }
                        }
                    }
                    Err(RecvError::Lagged(n)) => self.resync(n).await,
                    Err(RecvError::Closed) => return,
                },
            }
            let now = self.clock.now();
            if next.is_some_and(|at| at <= now) {
                let l = ledger.clone();
                let from = swept_until;
                let expired = tokio::task::spawn_blocking(move || l.expiring_between(from, now))
                    .await
                    .unwrap_or_default();
                for (expire_at, pk, dk) in expired {
                    events.publish(
                        Event::new(EventKind::DeviceExpired, now)
                            .device(&pk, &dk)
                            .with_time("ExpireAt", expire_at),
                    );
                    if self.online.is_online(&client_id(&pk, &dk)) {
                        self.renew_or_disconnect(&pk, &dk).await;
                    }
                }
                swept_until = now;
                known = None;
            }
        }
    }

    /// The event stream dropped `missed` events (this task fell behind):
    /// a deletion among them would go unseen, so every online device is
    /// checked against the ledger and those whose device or product no
    /// longer exists are disconnected.
    async fn resync(&self, missed: u64) {
        let online: Vec<(String, String)> = self
            .online
            .list()
            .into_iter()
            .filter_map(|s| match s.identity {
                Identity::Device {
                    product_key,
                    device_key,
                } => Some((product_key, device_key)),
                _ => None,
            })
            .collect();
        let checked = online.len();
        let ledger = self.gate.ledger().clone();
        // The state's read lock waits while a batch is flushed.
        let gone = tokio::task::spawn_blocking(move || {
            online
                .into_iter()
                .filter_map(|(pk, dk)| match ledger.device(&pk, &dk) {
                    Err(LedgerError::ProductNotFound(_)) => {
                        let why = format!("product {pk} was deleted");
                        Some((pk, dk, why))
                    }
                    Err(LedgerError::DeviceNotFound(..)) => {
                        let why = format!("device {dk} of product {pk} was deleted");
                        Some((pk, dk, why))
                    }
                    _ => None,
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        tracing::warn!(
            missed,
            checked,
            disconnected = gone.len(),
            "the enforcer fell behind the event stream; resynchronised online devices with the ledger"
        );
        for (pk, dk, why) in gone {
            self.online
                .disconnect_device(&pk, &dk, DisconnectReason::AdministrativeAction, &why);
        }
    }

    fn on_removal(&self, r: &Removal) {
        match r {
            Removal::Device {
                product_key,
                device_key,
            } => {
                self.online.disconnect_device(
                    product_key,
                    device_key,
                    DisconnectReason::AdministrativeAction,
                    &format!("device {device_key} of product {product_key} was deleted"),
                );
            }
            Removal::Product { product_key } => {
                self.online.disconnect_product(
                    product_key,
                    DisconnectReason::AdministrativeAction,
                    &format!("product {product_key} was deleted"),
                );
            }
        }
    }

    fn on_event(&self, e: &Event) {
        let pk = e.field("ProductKey").and_then(|v| v.as_str());
        let dk = e.field("DeviceKey").and_then(|v| v.as_str());
        match (e.kind, pk, dk) {
            (EventKind::DeviceDeleted, Some(pk), Some(dk)) => {
                self.online.disconnect_device(
                    pk,
                    dk,
                    DisconnectReason::AdministrativeAction,
                    &format!("device {dk} of product {pk} was deleted"),
                );
            }
            (EventKind::ProductDeleted, Some(pk), _) => {
                self.online.disconnect_product(
                    pk,
                    DisconnectReason::AdministrativeAction,
                    &format!("product {pk} was deleted"),
                );
            }
            _ => {}
        }
    }

    async fn renew_or_disconnect(&self, pk: &str, dk: &str) {
        match self.gate.renew_online(pk, dk).await {
            Ok(_) => {}
            Err(refusal) => {
                let reason = match refusal {
                    GateRefusal::QuotaExceeded(_) => DisconnectReason::QuotaExceeded,
                    GateRefusal::Unavailable(_) => DisconnectReason::UnspecifiedError,
                    _ => DisconnectReason::NotAuthorized,
                };
                tracing::info!(
                    product_key = pk,
                    device_key = dk,
                    reason = refusal.reason(),
                    "disconnecting device whose code expired"
                );
                self.online
                    .disconnect_device(pk, dk, reason, refusal.reason());
            }
        }
    }
}
