//! The ledger's in-memory state, its indexes, and every rule of SPEC §2 as a
//! mutation of it. Only the writer thread mutates a `State`; each mutation
//! validates everything first, then changes memory and marks the records it
//! touched as dirty, so the writer can put exactly those into one batch.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::model::*;
use super::{AuditEntry, LedgerError, Outcome};
use crate::clock::Millis;
use crate::credentials::{valid_device_key, valid_product_key};
use crate::events::{Event, EventKind};

/// Most DeviceKeys one request may name.
pub const MAX_KEYS_PER_REQUEST: usize = 1000;
/// Most codes one order may buy.
pub const MAX_ORDER_QUANTITY: u64 = 100_000_000;
/// Longest validity an allowance may have: 100 years.
pub const MAX_VALIDITY_SECS: u64 = 100 * 366 * 24 * 3600;

pub type DeviceId = (String, String);

#[derive(Default)]
pub struct State {
    pub(super) orders: BTreeMap<String, Order>,
    /// Order ids in purchase order; assignment takes the oldest codes first.
    pub(super) order_seq: Vec<String>,
    pub(super) products: BTreeMap<String, Product>,
    pub(super) devices: BTreeMap<DeviceId, Device>,
    /// Consumed codes; the code with id `n` is at index `n - 1`. Dense on
    /// sled; on etcd the ids a lane reserved but did not use are holes.
    pub(super) codes: Vec<Option<CodeRecord>>,
    /// How many codes `codes` holds.
    pub(super) code_count: u64,
    /// Lanes by (ProductKey, node) (etcd store only).
    pub(super) lanes: BTreeMap<(String, String), Lane>,
    /// The next code id no lane reserved (the `CODE_IDS` record; 0 when
    /// absent: then the next after the newest code).
    pub(super) code_ids: u64,
    /// Set on the etcd store: this node consumes through its lanes.
    pub(super) lane_mode: Option<LaneMode>,
    /// Assignments; id `n` at index `n - 1`.
    pub(super) assignments: Vec<Assignment>,
    pub(super) blacklist: BTreeSet<DeviceId>,
    pub(super) tokens: HashMap<String, TokenRecord>,
    /// The audit log; id `n` at index `n - 1`.
    pub(super) audit: Vec<AuditRecord>,

    // Indexes, rebuilt on load and kept current by every mutation.
    pub(super) codes_by_product: HashMap<String, Vec<u64>>,
    pub(super) codes_by_order: HashMap<String, Vec<u64>>,
    pub(super) codes_by_expiry: BTreeSet<(Millis, u64)>,
    pub(super) codes_by_activation: BTreeSet<(Millis, u64)>,
    /// `(ExpireAt, ProductKey, DeviceKey)` of every live device's current
    /// code: near-expiry, expiry enforcement.
    pub(super) current_expiry: BTreeSet<(Millis, String, String)>,
    /// Unassigned codes per allowance.
    pub(super) unassigned: BTreeMap<Allowance, u64>,

    // Counters (SPEC §2), kept incrementally; `check_invariants` recomputes them.
    pub(super) total: u64,
    pub(super) available_assigned: u64,
    pub(super) forfeited: u64,

    pub(super) dirty: Dirty,
}

/// Records changed since the last commit.
#[derive(Default)]
pub struct Dirty {
    pub orders: BTreeSet<String>,
    pub products: BTreeSet<String>,
    pub devices: BTreeSet<DeviceId>,
    pub codes: BTreeSet<u64>,
    pub assignments: BTreeSet<u64>,
    pub blacklist: BTreeSet<DeviceId>,
    pub tokens: BTreeSet<String>,
    pub audit: BTreeSet<u64>,
    pub lanes: BTreeSet<(String, String)>,
    pub code_ids: bool,
}

/// How a node consumes codes on the etcd store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneMode {
    /// This node's name: its lanes are `(ProductKey, node)`.
    pub node: String,
    /// Most codes (and code ids) one reservation moves to a lane.
    pub block: u64,
}

impl Dirty {
    /// How many records are dirty (the writes of a batch).
    pub fn len(&self) -> usize {
        self.orders.len()
            + self.products.len()
            + self.devices.len()
            + self.codes.len()
            + self.assignments.len()
            + self.blacklist.len()
            + self.tokens.len()
            + self.audit.len()
            + self.lanes.len()
            + usize::from(self.code_ids)
    }

    pub fn is_empty(&self) -> bool {
        self.orders.is_empty()
            && self.products.is_empty()
            && self.devices.is_empty()
            && self.codes.is_empty()
            && self.assignments.is_empty()
            && self.blacklist.is_empty()
            && self.tokens.is_empty()
            && self.audit.is_empty()
            && self.lanes.is_empty()
            && !self.code_ids
    }
}

/// The SPEC §2 counters of the whole broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    pub total: u64,
    pub consumed: u64,
    pub available: u64,
    pub unassigned: u64,
    pub forfeited: u64,
}

pub(super) fn invalid(msg: impl Into<String>) -> LedgerError {
    LedgerError::InvalidParameter(msg.into())
}

pub(super) fn check_product_key(pk: &str) -> Result<(), LedgerError> {
    if valid_product_key(pk) {
        Ok(())
    } else {
        Err(invalid(format!(
            "ProductKey {pk:?} must match [A-Za-z0-9_-]{{1,32}}"
        )))
    }
}

pub(super) fn check_device_keys(keys: &[String]) -> Result<(), LedgerError> {
    if keys.is_empty() {
        return Err(invalid("DeviceKeys must name at least one device"));
    }
    if keys.len() > MAX_KEYS_PER_REQUEST {
        return Err(invalid(format!(
            "DeviceKeys may name at most {MAX_KEYS_PER_REQUEST} devices"
        )));
    }
    let mut seen = BTreeSet::new();
    for dk in keys {
        if !valid_device_key(dk) {
            return Err(invalid(format!(
                "DeviceKey {dk:?} must match [A-Za-z0-9_:-]{{1,64}}"
            )));
        }
        if !seen.insert(dk.as_str()) {
            return Err(invalid(format!("DeviceKey {dk} is listed twice")));
        }
    }
    Ok(())
}

pub(super) fn check_validity(secs: u64) -> Result<Allowance, LedgerError> {
    if secs == 0 || secs > MAX_VALIDITY_SECS {
        return Err(invalid(format!(
            "ValiditySeconds must be between 1 and {MAX_VALIDITY_SECS}"
        )));
    }
    Ok(Allowance {
        validity_secs: secs,
    })
}

pub(super) fn dev_id(pk: &str, dk: &str) -> DeviceId {
    (pk.to_owned(), dk.to_owned())
}

impl State {
    pub(super) fn device_is_live(&self, d: &Device) -> bool {
        d.deleted_at.is_none()
            && self
                .products
                .get(&d.product_key)
                .is_some_and(|p| p.deleted_at.is_none())
    }

    pub fn live_product(&self, pk: &str) -> Result<&Product, LedgerError> {
        match self.products.get(pk) {
            Some(p) if p.deleted_at.is_none() => Ok(p),
            _ => Err(LedgerError::ProductNotFound(pk.to_owned())),
        }
    }

    pub(super) fn live_product_mut(&mut self, pk: &str) -> Result<&mut Product, LedgerError> {
        match self.products.get_mut(pk) {
            Some(p) if p.deleted_at.is_none() => Ok(p),
            _ => Err(LedgerError::ProductNotFound(pk.to_owned())),
        }
    }

    pub fn counters(&self) -> Counters {
        let unassigned: u64 = self.unassigned.values().sum();
        Counters {
            total: self.total,
            consumed: self.code_count,
            available: unassigned + self.available_assigned,
            unassigned,
            forfeited: self.forfeited,
        }
    }

    /// Adds a consumed code to the code indexes (by product, order, expiry
    /// and activation time); `codes` itself is the caller's.
    pub(super) fn index_code(&mut self, c: &CodeRecord) {
        self.codes_by_product
            .entry(c.product_key.clone())
            .or_default()
            .push(c.id);
        self.codes_by_order
            .entry(c.order_id.clone())
            .or_default()
            .push(c.id);
        self.codes_by_expiry.insert((c.expire_at, c.id));
        self.codes_by_activation.insert((c.activate_at, c.id));
    }

    pub fn code(&self, id: u64) -> Option<&CodeRecord> {
        self.codes.get((id as usize).checked_sub(1)?)?.as_ref()
    }

    /// Every consumed code, by id.
    pub(super) fn all_codes(&self) -> impl DoubleEndedIterator<Item = &CodeRecord> + '_ {
        self.codes.iter().flatten()
    }

    /// Puts a code at its id (replacing one there); `true` if it is new.
    /// The caller indexes a new code.
    pub(super) fn put_code(&mut self, c: CodeRecord) -> bool {
        let Some(i) = (c.id as usize).checked_sub(1) else {
            return false;
        };
        if self.codes.len() <= i {
            self.codes.resize(i + 1, None);
        }
        let new = self.codes[i].is_none();
        self.codes[i] = Some(c);
        if new {
            self.code_count += 1;
        }
        new
    }

    /// The lanes of product `pk`.
    pub(super) fn lanes_of<'a>(&'a self, pk: &str) -> impl Iterator<Item = &'a Lane> + 'a {
        let pk = pk.to_owned();
        self.lanes
            .range((pk.clone(), String::new())..)
            .take_while(move |((lpk, _), _)| *lpk == pk)
            .map(|(_, l)| l)
    }

    /// A product's available codes: its pool and every lane's.
    pub fn product_available(&self, p: &Product) -> u64 {
        p.available()
            + self
                .lanes_of(&p.product_key)
                .map(Lane::available)
                .sum::<u64>()
    }

    /// A product's consumed codes: from its pool and from every lane.
    pub fn product_consumed(&self, p: &Product) -> u64 {
        p.consumed
            + self
                .lanes_of(&p.product_key)
                .map(|l| l.consumed)
                .sum::<u64>()
    }

    /// Available codes of `pk` counted in the broker's Available: those of
    /// a live product, pool and lanes.
    pub(super) fn live_available(&self, pk: &str) -> u64 {
        match self.products.get(pk) {
            Some(p) if p.deleted_at.is_none() => self.product_available(p),
            _ => 0,
        }
    }

    /// The product as the admin plane shows it: lanes counted in
    /// (Consumed, and their lots in the pool), so every answer is the
    /// same whether codes sit in lanes or not.
    pub fn product_view(&self, p: &Product) -> Product {
        let mut v = p.clone();
        for l in self.lanes_of(&p.product_key) {
            v.consumed += l.consumed;
            v.pool
                .extend(l.lots.iter().filter(|x| x.remaining > 0).cloned());
        }
        v
    }

    /// Consumes on the etcd store through this node's lanes.
    pub fn set_lane_mode(&mut self, mode: LaneMode) {
        self.lane_mode = Some(mode);
    }

    /// Appends one entry to the audit log.
    pub fn record_audit(
        &mut self,
        entry: AuditEntry,
        result: &Result<Outcome, LedgerError>,
        now: Millis,
    ) {
        let (code, message) = match result {
            Ok(_) => ("OK".to_owned(), String::new()),
            Err(e) => ((entry.code_of)(e).to_owned(), e.to_string()),
        };
        self.append_audit(entry, code, message, now);
    }

    /// Appends one entry with its result code and message to the audit log.
    pub fn append_audit(&mut self, entry: AuditEntry, code: String, message: String, now: Millis) {
        let id = self.audit.len() as u64 + 1;
        self.audit.push(AuditRecord {
            id,
            at: now,
            account: entry.account,
            action: entry.action,
            parameters: entry.parameters,
            code,
            message,
        });
        self.dirty.audit.insert(id);
    }
}

pub fn code_event(kind: EventKind, at: Millis, c: &CodeRecord) -> Event {
    Event::new(kind, at)
        .device(&c.product_key, &c.device_key)
        .with("CodeId", c.id)
        .with("OrderId", c.order_id.as_str())
        .with_time("ActivateAt", c.activate_at)
        .with_time("ExpireAt", c.expire_at)
}
