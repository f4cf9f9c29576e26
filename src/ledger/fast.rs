//! The read view of the connect fast path: what the gate needs to check a
//! signature and to admit a device that already holds a valid code. The
//! writer updates it only after a batch is flushed, so it never shows
//! anything that is not durable, and readers never wait for the writer.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use parking_lot::RwLock;
use tokio::sync::watch;

use super::model::{AuthMode, Device, Product};
use super::state::State;
use super::SecretLookup;
use crate::clock::Millis;

const SHARDS: usize = 64;

struct ProductEntry {
    mode: AuthMode,
    secret: Arc<str>,
}

struct DeviceEntry {
    secret: Option<Arc<str>>,
    expire_at: Option<Millis>,
}

/// ProductKey → DeviceKey → entry, sharded by DeviceKey so lookups borrow
/// `&str` without allocating and readers rarely share a lock.
type DeviceShard = HashMap<Box<str>, HashMap<Box<str>, DeviceEntry>>;

pub struct FastView {
    products: RwLock<HashMap<Box<str>, ProductEntry>>,
    devices: Box<[RwLock<DeviceShard>]>,
    /// Bumped after every committed batch that changed a device record;
    /// watchers wake on it ([`FastView::watch_generation`]).
    generation: watch::Sender<u64>,
}

fn shard_of(dk: &str) -> usize {
    let mut h = DefaultHasher::new();
    dk.hash(&mut h);
    (h.finish() as usize) % SHARDS
}

impl FastView {
    pub fn build(state: &State) -> FastView {
        let view = FastView {
            products: RwLock::new(HashMap::new()),
            devices: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            generation: watch::Sender::new(0),
        };
        view.refresh_all(state);
        view
    }

    /// Replaces the whole view with `state`'s records. Each map is built
    /// aside and swapped in, so a reader never finds a live product or
    /// device missing meanwhile (a replica reloaded under load).
    pub fn refresh_all(&self, state: &State) {
        let fresh = FastView {
            products: RwLock::new(HashMap::new()),
            devices: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            generation: watch::Sender::new(0),
        };
        for p in state.products.values() {
            fresh.put_product(p);
        }
        for d in state.devices.values() {
            fresh.put_device(d);
        }
        *self.products.write() = std::mem::take(&mut *fresh.products.write());
        for (mine, new) in self.devices.iter().zip(fresh.devices.iter()) {
            *mine.write() = std::mem::take(&mut *new.write());
        }
        self.devices_changed();
    }

    /// Marks that device records changed (after they are in the view).
    pub fn devices_changed(&self) {
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// A number that changes whenever device records change, and wakes its
    /// receivers when it does.
    pub fn watch_generation(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn put_product(&self, p: &Product) {
        let mut products = self.products.write();
        if p.deleted_at.is_some() {
            products.remove(p.product_key.as_str());
        } else {
            products.insert(
                p.product_key.as_str().into(),
                ProductEntry {
                    mode: p.auth_mode,
                    secret: p.secret.as_str().into(),
                },
            );
        }
    }

    pub fn put_device(&self, d: &Device) {
        let mut shard = self.devices[shard_of(&d.device_key)].write();
        if d.deleted_at.is_some() {
            if let Some(m) = shard.get_mut(d.product_key.as_str()) {
                m.remove(d.device_key.as_str());
            }
            return;
        }
        shard
            .entry(d.product_key.as_str().into())
            .or_default()
            .insert(
                d.device_key.as_str().into(),
                DeviceEntry {
                    secret: d.secret.as_deref().map(Arc::from),
                    expire_at: d.expire_at,
                },
            );
    }

    pub fn secret_for(&self, pk: &str, dk: &str) -> SecretLookup {
        let (mode, product_secret) = match self.products.read().get(pk) {
            Some(p) => (p.mode, p.secret.clone()),
            None => return SecretLookup::UnknownProduct,
        };
        match mode {
            AuthMode::ProductSecret => SecretLookup::Secret(product_secret),
            AuthMode::DeviceSecret => {
                let shard = self.devices[shard_of(dk)].read();
                match shard
                    .get(pk)
                    .and_then(|m| m.get(dk))
                    .and_then(|d| d.secret.clone())
                {
                    Some(s) => SecretLookup::Secret(s),
                    None => SecretLookup::UnknownDevice,
                }
            }
        }
    }

    /// `Some(expire_at)` if the live device of a live product holds a code
    /// valid at `now`.
    pub fn valid_until(&self, pk: &str, dk: &str, now: Millis) -> Option<Millis> {
        if !self.products.read().contains_key(pk) {
            return None;
        }
        let shard = self.devices[shard_of(dk)].read();
        let exp = shard.get(pk)?.get(dk)?.expire_at?;
        (exp > now).then_some(exp)
    }
}
