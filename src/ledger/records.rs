//! The seam between the ledger's rules (`state.rs`) and a store: a `State`
//! is built from the store's records (`from_records`), hands its changed
//! records to the store as key/value writes (`drain_dirty`), and — for a
//! store several nodes share — takes in records another node committed
//! (`apply_remote`). Keys and values are `store.rs`'s layout whatever the
//! store (sled's tree, etcd's keys under a prefix).

use super::model::*;
use super::state::{dev_id, Dirty, State};
use super::store::{self, decode, encode};
use super::LedgerError;
use crate::clock::Millis;

/// One write of a batch: a record put (`Some`) or removed (`None`).
pub type Write = (Vec<u8>, Option<Vec<u8>>);

fn corrupt(msg: impl Into<String>) -> LedgerError {
    LedgerError::Corrupt(msg.into())
}

/// What a remote change did that the online enforcement must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    Device {
        product_key: String,
        device_key: String,
    },
    Product {
        product_key: String,
    },
}

impl State {
    /// Builds the state from every record of a store and its indexes.
    pub fn from_records<I>(records: I) -> Result<State, LedgerError>
    where
        I: IntoIterator<Item = Result<(Vec<u8>, Vec<u8>), LedgerError>>,
    {
        let mut st = State::default();
        let mut orders = Vec::new();
        for item in records {
            let (k, v) = item?;
            match k.first() {
                Some(&store::ORDER) => orders.push(decode::<Order>(&v)?),
                _ => st.put_record(&k, &v)?,
            }
        }
        // Without lanes (sled, or etcd before any), code ids are dense.
        if st.lanes.is_empty() && st.code_ids == 0 {
            if let Some(i) = st.codes.iter().position(Option::is_none) {
                return Err(corrupt(format!(
                    "code records are not dense: no code with id {}",
                    i + 1
                )));
            }
        }
        for (i, a) in st.assignments.iter().enumerate() {
            if a.id != i as u64 + 1 {
                return Err(corrupt("assignment records are not dense"));
            }
        }
        for (i, a) in st.audit.iter().enumerate() {
            if a.id != i as u64 + 1 {
                return Err(corrupt("audit records are not dense"));
            }
        }
        orders.sort_by(|a, b| (a.created, &a.order_id).cmp(&(b.created, &b.order_id)));
        for o in orders {
            st.total += o.quantity;
            if o.unassigned > 0 {
                *st.unassigned.entry(o.allowance).or_default() += o.unassigned;
            }
            st.order_seq.push(o.order_id.clone());
            st.orders.insert(o.order_id.clone(), o);
        }
        let mut available_assigned = 0;
        for p in st.products.values() {
            st.forfeited += p.forfeited;
            if p.deleted_at.is_none() {
                available_assigned += st.product_available(p);
            }
        }
        st.available_assigned = available_assigned;
        let codes = std::mem::take(&mut st.codes);
        for c in codes.iter().flatten() {
            st.index_code(c);
        }
        st.codes = codes;
        let live: Vec<(Millis, String, String)> = st
            .devices
            .values()
            .filter(|d| st.device_is_live(d))
            .filter_map(|d| {
                d.expire_at
                    .map(|e| (e, d.product_key.clone(), d.device_key.clone()))
            })
            .collect();
        st.current_expiry.extend(live);
        Ok(st)
    }

    /// Loading: one record other than an order, without indexes.
    fn put_record(&mut self, k: &[u8], v: &[u8]) -> Result<(), LedgerError> {
        match k.first() {
            Some(&store::PRODUCT) => {
                let p: Product = decode(v)?;
                self.products.insert(p.product_key.clone(), p);
            }
            Some(&store::DEVICE) => {
                let d: Device = decode(v)?;
                self.devices
                    .insert(dev_id(&d.product_key, &d.device_key), d);
            }
            Some(&store::CODE) => {
                let c: CodeRecord = decode(v)?;
                if c.id == 0 || !self.put_code(c) {
                    return Err(corrupt("a code record with id 0 or a repeated id"));
                }
            }
            Some(&store::LANE) => {
                let l: Lane = decode(v)?;
                self.lanes
                    .insert((l.product_key.clone(), l.node.clone()), l);
            }
            Some(&store::CODE_IDS) => self.code_ids = decode(v)?,
            Some(&store::ASSIGNMENT) => self.assignments.push(decode(v)?),
            Some(&store::BLACKLIST) => {
                let id = store::split_pair(k).ok_or_else(|| corrupt("corrupt blacklist key"))?;
                self.blacklist.insert(id);
            }
            Some(&store::AUDIT) => self.audit.push(decode(v)?),
            Some(&store::TOKEN) => {
                let token = String::from_utf8_lossy(&k[1..]).into_owned();
                self.tokens.insert(token, decode(v)?);
            }
            _ => {
                return Err(corrupt(format!(
                    "unknown record key {:?}",
                    String::from_utf8_lossy(k)
                )))
            }
        }
        Ok(())
    }

    /// Takes in records another node committed (in commit order), keeping
    /// every index and counter current. Returns the devices and products
    /// the change deleted. An `Err` means the records do not follow from
    /// this state (a gap): the caller reloads the whole state.
    /// The products and devices it touched are added to `touched`.
    pub fn apply_remote(
        &mut self,
        writes: &[Write],
        touched: &mut Dirty,
    ) -> Result<Vec<Removal>, LedgerError> {
        let mut removed = Vec::new();
        for (k, v) in writes {
            match (k.first(), v) {
                (Some(&store::BLACKLIST), v) => {
                    let id =
                        store::split_pair(k).ok_or_else(|| corrupt("corrupt blacklist key"))?;
                    if v.is_some() {
                        self.blacklist.insert(id);
                    } else {
                        self.blacklist.remove(&id);
                    }
                }
                (_, None) => return Err(corrupt("a record was removed by another node")),
                (Some(&store::ORDER), Some(v)) => self.remote_order(decode(v)?),
                (Some(&store::PRODUCT), Some(v)) => {
                    let p: Product = decode(v)?;
                    touched.products.insert(p.product_key.clone());
                    if let Some(r) = self.remote_product(p) {
                        removed.push(r);
                    }
                }
                (Some(&store::DEVICE), Some(v)) => {
                    let d: Device = decode(v)?;
                    touched
                        .devices
                        .insert(dev_id(&d.product_key, &d.device_key));
                    if let Some(r) = self.remote_device(d) {
                        removed.push(r);
                    }
                }
                (Some(&store::CODE), Some(v)) => self.remote_code(decode(v)?)?,
                (Some(&store::LANE), Some(v)) => {
                    let l: Lane = decode(v)?;
                    touched.products.insert(l.product_key.clone());
                    self.remote_lane(l);
                }
                (Some(&store::CODE_IDS), Some(v)) => self.code_ids = decode(v)?,
                (Some(&store::ASSIGNMENT), Some(v)) => {
                    let a: Assignment = decode(v)?;
                    put_dense(&mut self.assignments, a.id, a, "assignment")?;
                }
                (Some(&store::AUDIT), Some(v)) => {
                    let a: AuditRecord = decode(v)?;
                    put_dense(&mut self.audit, a.id, a, "audit")?;
                }
                (Some(&store::TOKEN), Some(v)) => {
                    let token = String::from_utf8_lossy(&k[1..]).into_owned();
                    self.tokens.insert(token, decode(v)?);
                }
                _ => {
                    return Err(corrupt(format!(
                        "unknown record key {:?}",
                        String::from_utf8_lossy(k)
                    )))
                }
            }
        }
        Ok(removed)
    }

    pub(super) fn remote_order(&mut self, o: Order) {
        if let Some(old) = self.orders.get(&o.order_id) {
            self.total -= old.quantity;
            if let Some(n) = self.unassigned.get_mut(&old.allowance) {
                *n -= old.unassigned.min(*n);
                if *n == 0 {
                    self.unassigned.remove(&old.allowance);
                }
            }
        } else {
            let at = self
                .order_seq
                .iter()
                .position(|id| {
                    self.orders
                        .get(id)
                        .is_some_and(|x| (x.created, &x.order_id) > (o.created, &o.order_id))
                })
                .unwrap_or(self.order_seq.len());
            self.order_seq.insert(at, o.order_id.clone());
        }
        self.total += o.quantity;
        if o.unassigned > 0 {
            *self.unassigned.entry(o.allowance).or_default() += o.unassigned;
        }
        self.orders.insert(o.order_id.clone(), o);
    }

    pub(super) fn remote_product(&mut self, p: Product) -> Option<Removal> {
        let pk = p.product_key.clone();
        let available_before = self.live_available(&pk);
        let was_live = match self.products.get(&pk) {
            Some(old) => {
                self.forfeited -= old.forfeited;
                old.deleted_at.is_none()
            }
            None => false,
        };
        self.forfeited += p.forfeited;
        let live = p.deleted_at.is_none();
        self.products.insert(pk.clone(), p);
        self.available_assigned =
            self.available_assigned - available_before + self.live_available(&pk);
        if was_live && !live {
            let gone: Vec<(Millis, String, String)> = self
                .current_expiry
                .iter()
                .filter(|(_, dpk, _)| *dpk == pk)
                .cloned()
                .collect();
            for e in gone {
                self.current_expiry.remove(&e);
            }
            return Some(Removal::Product { product_key: pk });
        }
        None
    }

    pub(super) fn remote_device(&mut self, d: Device) -> Option<Removal> {
        let id = dev_id(&d.product_key, &d.device_key);
        let was_live = match self.devices.get(&id) {
            Some(old) => {
                if let Some(e) = old.expire_at {
                    self.current_expiry.remove(&(e, id.0.clone(), id.1.clone()));
                }
                old.deleted_at.is_none()
            }
            None => false,
        };
        let live = self.device_is_live(&d);
        if live {
            if let Some(e) = d.expire_at {
                self.current_expiry.insert((e, id.0.clone(), id.1.clone()));
            }
        }
        let deleted = was_live && d.deleted_at.is_some();
        self.devices.insert(id.clone(), d);
        deleted.then_some(Removal::Device {
            product_key: id.0,
            device_key: id.1,
        })
    }

    /// Another node's lane, or this node's as etcd holds it.
    pub(super) fn remote_lane(&mut self, l: Lane) {
        let pk = l.product_key.clone();
        let available_before = self.live_available(&pk);
        self.lanes.insert((pk.clone(), l.node.clone()), l);
        self.available_assigned =
            self.available_assigned - available_before + self.live_available(&pk);
    }

    pub(super) fn remote_code(&mut self, c: CodeRecord) -> Result<(), LedgerError> {
        if c.id == 0 {
            return Err(corrupt("a code record with id 0"));
        }
        // An existing code changes only its notes (expiry announced).
        let new = self.code(c.id).is_none();
        if new {
            self.index_code(&c);
        }
        self.put_code(c);
        Ok(())
    }

    /// Hands every dirty record to `sink` as one write and clears the
    /// dirty set; returns what was dirty.
    pub fn drain_dirty(&mut self, sink: &mut dyn FnMut(Write)) -> Result<Dirty, LedgerError> {
        let dirty = std::mem::take(&mut self.dirty);
        for id in &dirty.orders {
            if let Some(o) = self.orders.get(id) {
                sink((store::str_key(store::ORDER, id), Some(encode(o)?)));
            }
        }
        for pk in &dirty.products {
            if let Some(p) = self.products.get(pk) {
                sink((store::str_key(store::PRODUCT, pk), Some(encode(p)?)));
            }
        }
        for id in &dirty.devices {
            if let Some(d) = self.devices.get(id) {
                sink((
                    store::pair_key(store::DEVICE, &id.0, &id.1),
                    Some(encode(d)?),
                ));
            }
        }
        for id in &dirty.codes {
            if let Some(c) = self.code(*id) {
                sink((store::id_key(store::CODE, *id), Some(encode(c)?)));
            }
        }
        for key in &dirty.lanes {
            if let Some(l) = self.lanes.get(key) {
                sink((
                    store::pair_key(store::LANE, &key.0, &key.1),
                    Some(encode(l)?),
                ));
            }
        }
        if dirty.code_ids {
            sink((vec![store::CODE_IDS], Some(encode(&self.code_ids)?)));
        }
        for id in &dirty.assignments {
            if let Some(a) = id
                .checked_sub(1)
                .and_then(|i| self.assignments.get(i as usize))
            {
                sink((store::id_key(store::ASSIGNMENT, *id), Some(encode(a)?)));
            }
        }
        for id in &dirty.blacklist {
            let key = store::pair_key(store::BLACKLIST, &id.0, &id.1);
            let present = self.blacklist.contains(id);
            sink((key, present.then(Vec::new)));
        }
        for id in &dirty.audit {
            if let Some(a) = id.checked_sub(1).and_then(|i| self.audit.get(i as usize)) {
                sink((store::id_key(store::AUDIT, *id), Some(encode(a)?)));
            }
        }
        for t in &dirty.tokens {
            if let Some(r) = self.tokens.get(t) {
                sink((store::str_key(store::TOKEN, t), Some(encode(r)?)));
            }
        }
        Ok(dirty)
    }
}

/// Puts record `id` (ids are dense from 1) at its place: replaces an
/// existing one or appends the next; anything else is a gap.
pub(super) fn put_dense<T>(v: &mut Vec<T>, id: u64, rec: T, what: &str) -> Result<(), LedgerError> {
    let next = v.len() as u64 + 1;
    match id.checked_sub(1).and_then(|i| v.get_mut(i as usize)) {
        Some(slot) => *slot = rec,
        None if id == next => v.push(rec),
        None => {
            return Err(corrupt(format!(
                "{what} record {id} arrived before record {next}"
            )))
        }
    }
    Ok(())
}
