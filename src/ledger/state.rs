//! The ledger's in-memory state, its indexes, and every rule of SPEC §2 as a
//! mutation of it. Only the writer thread mutates a `State`; each mutation
//! validates everything first, then changes memory and marks the records it
//! touched as dirty, so the writer can put exactly those into one batch.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::model::*;
use super::{AssignPreview, AuditEntry, Command, LedgerError, Outcome, Refusal};
use crate::clock::Millis;
use crate::credentials::{generate_secret, valid_device_key, valid_product_key};
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
    pub orders: BTreeMap<String, Order>,
    /// Order ids in purchase order; assignment takes the oldest codes first.
    pub order_seq: Vec<String>,
    pub products: BTreeMap<String, Product>,
    pub devices: BTreeMap<DeviceId, Device>,
    /// Consumed codes; the code with id `n` is at index `n - 1`.
    pub codes: Vec<CodeRecord>,
    /// Assignments; id `n` at index `n - 1`.
    pub assignments: Vec<Assignment>,
    pub blacklist: BTreeSet<DeviceId>,
    pub tokens: HashMap<String, TokenRecord>,
    /// The audit log; id `n` at index `n - 1`.
    pub audit: Vec<AuditRecord>,

    // Indexes, rebuilt on load and kept current by every mutation.
    pub codes_by_product: HashMap<String, Vec<u64>>,
    pub codes_by_order: HashMap<String, Vec<u64>>,
    pub codes_by_expiry: BTreeSet<(Millis, u64)>,
    pub codes_by_activation: BTreeSet<(Millis, u64)>,
    /// `(ExpireAt, ProductKey, DeviceKey)` of every live device's current
    /// code: near-expiry, expiry enforcement.
    pub current_expiry: BTreeSet<(Millis, String, String)>,
    /// Unassigned codes per allowance.
    pub unassigned: BTreeMap<Allowance, u64>,

    // Counters (SPEC §2), kept incrementally; `check_invariants` recomputes them.
    pub total: u64,
    pub available_assigned: u64,
    pub forfeited: u64,

    pub dirty: Dirty,
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

fn invalid(msg: impl Into<String>) -> LedgerError {
    LedgerError::InvalidParameter(msg.into())
}

fn check_product_key(pk: &str) -> Result<(), LedgerError> {
    if valid_product_key(pk) {
        Ok(())
    } else {
        Err(invalid(format!(
            "ProductKey {pk:?} must match [A-Za-z0-9_-]{{1,32}}"
        )))
    }
}

fn check_device_keys(keys: &[String]) -> Result<(), LedgerError> {
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

fn check_validity(secs: u64) -> Result<Allowance, LedgerError> {
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

    fn live_product_mut(&mut self, pk: &str) -> Result<&mut Product, LedgerError> {
        match self.products.get_mut(pk) {
            Some(p) if p.deleted_at.is_none() => Ok(p),
            _ => Err(LedgerError::ProductNotFound(pk.to_owned())),
        }
    }

    pub fn counters(&self) -> Counters {
        let unassigned: u64 = self.unassigned.values().sum();
        Counters {
            total: self.total,
            consumed: self.codes.len() as u64,
            available: unassigned + self.available_assigned,
            unassigned,
            forfeited: self.forfeited,
        }
    }

    /// Recomputes every counter from the records and checks the SPEC §2
    /// invariants and the indexes. Used by tests and after recovery.
    pub fn check_invariants(&self) -> Result<(), String> {
        let total: u64 = self.orders.values().map(|o| o.quantity).sum();
        let unassigned: u64 = self.orders.values().map(|o| o.unassigned).sum();
        let forfeited: u64 = self.products.values().map(|p| p.forfeited).sum();
        let mut available_assigned = 0;
        for p in self.products.values() {
            let consumed = self
                .codes_by_product
                .get(&p.product_key)
                .map_or(0, Vec::len) as u64;
            if consumed != p.consumed {
                return Err(format!(
                    "product {}: consumed {} but {} code records",
                    p.product_key, p.consumed, consumed
                ));
            }
            if p.total != p.consumed + p.available() + p.forfeited {
                return Err(format!(
                    "product {}: Total {} != Consumed {} + Available {} (+ Forfeited {})",
                    p.product_key,
                    p.total,
                    p.consumed,
                    p.available(),
                    p.forfeited
                ));
            }
            if p.deleted_at.is_none() {
                available_assigned += p.available();
            } else if p.available() != 0 {
                return Err(format!("deleted product {} still has codes", p.product_key));
            }
        }
        let c = self.counters();
        let recomputed = Counters {
            total,
            consumed: self.codes.len() as u64,
            available: unassigned + available_assigned,
            unassigned,
            forfeited,
        };
        if c != recomputed {
            return Err(format!("counters {c:?} != recomputed {recomputed:?}"));
        }
        if c.total != c.consumed + c.available + c.forfeited {
            return Err(format!(
                "Total {} != Consumed {} + Available {} + Forfeited {}",
                c.total, c.consumed, c.available, c.forfeited
            ));
        }
        let mut by_allowance: BTreeMap<Allowance, u64> = BTreeMap::new();
        for o in self.orders.values() {
            if o.unassigned > 0 {
                *by_allowance.entry(o.allowance).or_default() += o.unassigned;
            }
        }
        let nonzero: BTreeMap<Allowance, u64> = self
            .unassigned
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(a, n)| (*a, *n))
            .collect();
        if by_allowance != nonzero {
            return Err("unassigned index differs from orders".into());
        }
        for d in self.devices.values() {
            let mut per_period: Option<Millis> = None;
            for id in &d.codes {
                let Some(code) = self.code(*id) else {
                    return Err(format!("device {} lists missing code {id}", d.device_key));
                };
                if code.device_key != d.device_key || code.product_key != d.product_key {
                    return Err(format!("code {id} belongs to another device"));
                }
                if let Some(prev_expiry) = per_period {
                    if code.activate_at < prev_expiry {
                        return Err(format!(
                            "device {}/{} consumed code {id} while its previous code was valid",
                            d.product_key, d.device_key
                        ));
                    }
                }
                per_period = Some(code.expire_at);
            }
            if d.current_code != d.codes.last().copied() {
                return Err(format!("device {} current code mismatch", d.device_key));
            }
            let indexed = d.expire_at.is_some_and(|e| {
                self.current_expiry
                    .contains(&(e, d.product_key.clone(), d.device_key.clone()))
            });
            if indexed != (self.device_is_live(d) && d.expire_at.is_some()) {
                return Err(format!("expiry index wrong for {}", d.device_key));
            }
        }
        Ok(())
    }

    pub fn code(&self, id: u64) -> Option<&CodeRecord> {
        self.codes.get((id as usize).checked_sub(1)?)
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
            Err(e) => (e.code().to_owned(), e.to_string()),
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

    // ----- the connect decision -------------------------------------------

    /// SPEC §2 consumption: valid → admitted with no write; never activated
    /// → consume; expired → renew if allowed; otherwise the precise refusal.
    /// Returns the new code when one was consumed.
    pub fn connect(
        &mut self,
        pk: &str,
        dk: &str,
        now: Millis,
        events: &mut Vec<Event>,
        pool_low: u64,
    ) -> Result<(Millis, Option<CodeRecord>), Refusal> {
        let product = match self.products.get(pk) {
            Some(p) if p.deleted_at.is_none() => p,
            _ => return Err(Refusal::UnknownProduct(pk.to_owned())),
        };
        let id = dev_id(pk, dk);
        let device = self.devices.get(&id);
        if product.auth_mode == AuthMode::DeviceSecret
            && device.is_none_or(|d| d.deleted_at.is_some())
        {
            return Err(Refusal::UnknownDevice(pk.to_owned(), dk.to_owned()));
        }
        let kind = match device {
            None => CodeKind::Activation,
            Some(d) => match d.expire_at {
                None => CodeKind::Activation,
                Some(exp) if exp > now => {
                    if d.deleted_at.is_some() {
                        // A deleted device reconnecting within its validity
                        // comes back and consumes nothing.
                        self.undelete_device(&id, now);
                    }
                    return Ok((exp, None));
                }
                Some(_) => {
                    if !product.auto_renewal {
                        return Err(Refusal::RenewalDisabled(pk.to_owned()));
                    }
                    if self.blacklist.contains(&id) {
                        return Err(Refusal::Blacklisted(pk.to_owned(), dk.to_owned()));
                    }
                    CodeKind::Renewal
                }
            },
        };
        if product.available() == 0 {
            return Err(Refusal::NoCodeAvailable(pk.to_owned()));
        }
        if !self.devices.contains_key(&id) {
            self.devices.insert(
                id.clone(),
                Device {
                    product_key: pk.to_owned(),
                    device_key: dk.to_owned(),
                    secret: None,
                    created: now,
                    deleted_at: None,
                    current_code: None,
                    expire_at: None,
                    codes: Vec::new(),
                },
            );
        } else {
            self.undelete_device(&id, now);
        }
        let code = self.consume(&id, kind, now, events, pool_low);
        Ok((code.expire_at, Some(code)))
    }

    fn undelete_device(&mut self, id: &DeviceId, _now: Millis) {
        if let Some(d) = self.devices.get_mut(id) {
            if d.deleted_at.take().is_some() {
                if let Some(e) = d.expire_at {
                    self.current_expiry.insert((e, id.0.clone(), id.1.clone()));
                }
                self.dirty.devices.insert(id.clone());
            }
        }
    }

    /// Takes one code from the product's oldest lot for the device. The
    /// caller has checked that the product lives and has a code.
    fn consume(
        &mut self,
        id: &DeviceId,
        kind: CodeKind,
        now: Millis,
        events: &mut Vec<Event>,
        pool_low: u64,
    ) -> CodeRecord {
        let (pk, dk) = (&id.0, &id.1);
        let mut order_id = String::new();
        let mut validity = 0;
        let mut before = 0;
        let mut after = 0;
        if let Some(p) = self.products.get_mut(pk) {
            before = p.available();
            if let Some(lot) = p.pool.first_mut() {
                lot.remaining -= 1;
                order_id = lot.order_id.clone();
                if lot.remaining == 0 {
                    p.pool.remove(0);
                }
            }
            p.consumed += 1;
            validity = p.allowance.map_or(0, Allowance::validity_ms);
            after = before - 1;
        }
        self.available_assigned -= 1;
        self.dirty.products.insert(pk.clone());
        let code_id = self.codes.len() as u64 + 1;
        let code = CodeRecord {
            id: code_id,
            product_key: pk.clone(),
            device_key: dk.clone(),
            order_id: order_id.clone(),
            kind,
            activate_at: now,
            expire_at: now.saturating_add(validity),
            created: now,
            modified: now,
            name: None,
            description: None,
            expiring_notified: false,
        };
        self.codes.push(code.clone());
        self.codes_by_product
            .entry(pk.clone())
            .or_default()
            .push(code_id);
        self.codes_by_order
            .entry(order_id)
            .or_default()
            .push(code_id);
        self.codes_by_expiry.insert((code.expire_at, code_id));
        self.codes_by_activation.insert((code.activate_at, code_id));
        self.dirty.codes.insert(code_id);
        if let Some(d) = self.devices.get_mut(id) {
            if let Some(old) = d.expire_at {
                self.current_expiry.remove(&(old, pk.clone(), dk.clone()));
            }
            d.current_code = Some(code_id);
            d.expire_at = Some(code.expire_at);
            d.codes.push(code_id);
            self.current_expiry
                .insert((code.expire_at, pk.clone(), dk.clone()));
            self.dirty.devices.insert(id.clone());
        }
        let kind_event = match kind {
            CodeKind::Activation => EventKind::DeviceActivated,
            CodeKind::Renewal => EventKind::DeviceRenewed,
        };
        events.push(code_event(kind_event, now, &code));
        if before >= pool_low && after < pool_low {
            events.push(
                Event::new(EventKind::PoolLow, now)
                    .with("ProductKey", pk.as_str())
                    .with("Available", after)
                    .with("Threshold", pool_low),
            );
        }
        code
    }

    // ----- operator commands ------------------------------------------------

    pub fn apply(
        &mut self,
        command: &Command,
        now: Millis,
        events: &mut Vec<Event>,
    ) -> Result<Outcome, LedgerError> {
        match command {
            Command::CreateProduct {
                product_key,
                name,
                auth_mode,
            } => self.create_product(product_key, name, *auth_mode, now),
            Command::RegisterDevices {
                product_key,
                device_keys,
            } => self.register_devices(product_key, device_keys, now),
            Command::CreateOrder {
                order_id,
                quantity,
                validity_secs,
                product_key,
            } => self.create_order(
                order_id.as_deref(),
                *quantity,
                *validity_secs,
                product_key.as_deref(),
                now,
                events,
            ),
            Command::AssignCodes {
                product_key,
                quantity,
                validity_secs,
            } => {
                let plan = self.plan_assignment(product_key, *quantity, *validity_secs)?;
                let a = self.assign(product_key, plan, now, events);
                Ok(Outcome::CodesAssigned(a))
            }
            Command::SetAutoRenewal {
                product_key,
                enabled,
            } => {
                let p = self.live_product_mut(product_key)?;
                p.auto_renewal = *enabled;
                self.dirty.products.insert(product_key.clone());
                Ok(Outcome::AutoRenewalSet {
                    product_key: product_key.clone(),
                    enabled: *enabled,
                })
            }
            Command::AddBlacklist {
                product_key,
                device_keys,
            } => self.change_blacklist(product_key, device_keys, true),
            Command::RemoveBlacklist {
                product_key,
                device_keys,
            } => self.change_blacklist(product_key, device_keys, false),
            Command::DeleteDevice {
                product_key,
                device_key,
            } => self.delete_device(product_key, device_key, now, events),
            Command::DeleteProduct { product_key } => self.delete_product(product_key, now, events),
        }
    }

    fn create_product(
        &mut self,
        pk: &str,
        name: &str,
        auth_mode: AuthMode,
        now: Millis,
    ) -> Result<Outcome, LedgerError> {
        check_product_key(pk)?;
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 128 {
            return Err(invalid("Name must be 1 to 128 characters"));
        }
        match self.products.get(pk) {
            Some(p) if p.deleted_at.is_none() => {
                return Err(LedgerError::Conflict(format!(
                    "product {pk} already exists"
                )))
            }
            Some(_) => {
                return Err(LedgerError::Conflict(format!(
                    "product {pk} was deleted; a ProductKey is never reused"
                )))
            }
            None => {}
        }
        let p = Product {
            product_key: pk.to_owned(),
            name: name.to_owned(),
            auth_mode,
            secret: generate_secret(),
            allowance: None,
            auto_renewal: true,
            total: 0,
            consumed: 0,
            pool: Vec::new(),
            created: now,
            deleted_at: None,
            forfeited: 0,
        };
        self.products.insert(pk.to_owned(), p.clone());
        self.dirty.products.insert(pk.to_owned());
        Ok(Outcome::ProductCreated(p))
    }

    fn register_devices(
        &mut self,
        pk: &str,
        keys: &[String],
        now: Millis,
    ) -> Result<Outcome, LedgerError> {
        let mode = self.live_product(pk)?.auth_mode;
        check_device_keys(keys)?;
        for dk in keys {
            if let Some(d) = self.devices.get(&dev_id(pk, dk)) {
                if d.deleted_at.is_none() {
                    return Err(LedgerError::Conflict(format!(
                        "device {dk} of product {pk} is already registered"
                    )));
                }
            }
        }
        let mut out = Vec::with_capacity(keys.len());
        for dk in keys {
            let id = dev_id(pk, dk);
            let secret = (mode == AuthMode::DeviceSecret).then(generate_secret);
            if self.devices.contains_key(&id) {
                self.undelete_device(&id, now);
                if let Some(d) = self.devices.get_mut(&id) {
                    d.secret = secret.clone();
                }
            } else {
                self.devices.insert(
                    id.clone(),
                    Device {
                        product_key: pk.to_owned(),
                        device_key: dk.clone(),
                        secret: secret.clone(),
                        created: now,
                        deleted_at: None,
                        current_code: None,
                        expire_at: None,
                        codes: Vec::new(),
                    },
                );
            }
            self.dirty.devices.insert(id);
            out.push((dk.clone(), secret));
        }
        Ok(Outcome::DevicesRegistered {
            product_key: pk.to_owned(),
            devices: out,
        })
    }

    fn create_order(
        &mut self,
        order_id: Option<&str>,
        quantity: u64,
        validity_secs: u64,
        pk: Option<&str>,
        now: Millis,
        events: &mut Vec<Event>,
    ) -> Result<Outcome, LedgerError> {
        if quantity == 0 || quantity > MAX_ORDER_QUANTITY {
            return Err(invalid(format!(
                "Quantity must be between 1 and {MAX_ORDER_QUANTITY}"
            )));
        }
        let allowance = check_validity(validity_secs)?;
        let order_id = match order_id {
            Some(id) => {
                if !valid_device_key(id) {
                    return Err(invalid("OrderId must match [A-Za-z0-9_:-]{1,64}"));
                }
                if self.orders.contains_key(id) {
                    return Err(LedgerError::Conflict(format!("order {id} already exists")));
                }
                id.to_owned()
            }
            None => {
                let mut n = self.orders.len() as u64 + 1;
                loop {
                    let id = format!("ORD{n:08}");
                    if !self.orders.contains_key(&id) {
                        break id;
                    }
                    n += 1;
                }
            }
        };
        if let Some(pk) = pk {
            let p = self.live_product(pk)?;
            if let Some(a) = p.allowance {
                if a != allowance {
                    return Err(LedgerError::AllowanceMismatch {
                        product_key: pk.to_owned(),
                        product_validity_secs: a.validity_secs,
                        requested_validity_secs: validity_secs,
                    });
                }
            }
        }
        let order = Order {
            order_id: order_id.clone(),
            quantity,
            allowance,
            product_key: pk.map(str::to_owned),
            unassigned: quantity,
            created: now,
        };
        self.orders.insert(order_id.clone(), order);
        self.order_seq.push(order_id.clone());
        *self.unassigned.entry(allowance).or_default() += quantity;
        self.total += quantity;
        self.dirty.orders.insert(order_id.clone());
        let mut ev = Event::new(EventKind::CodesPurchased, now)
            .with("OrderId", order_id.as_str())
            .with("Quantity", quantity)
            .with("ValiditySeconds", validity_secs);
        if let Some(pk) = pk {
            ev = ev.with("ProductKey", pk);
        }
        events.push(ev);
        let assignment = match pk {
            Some(pk) => {
                // Assigned at purchase: the codes of this order go straight
                // to the product.
                let plan = AssignPlan {
                    allowance,
                    set_allowance: self.live_product(pk)?.allowance.is_none(),
                    quantity,
                    lots: vec![Lot {
                        order_id: order_id.clone(),
                        remaining: quantity,
                    }],
                };
                Some(self.assign(pk, plan, now, events))
            }
            None => None,
        };
        let order =
            self.orders.get(&order_id).cloned().ok_or_else(|| {
                LedgerError::Unavailable("order vanished while being created".into())
            })?;
        Ok(Outcome::OrderCreated { order, assignment })
    }

    /// Works out an assignment without changing anything (also `DryRun`).
    pub fn plan_assignment(
        &self,
        pk: &str,
        quantity: u64,
        validity_secs: Option<u64>,
    ) -> Result<AssignPlan, LedgerError> {
        let p = self.live_product(pk)?;
        let requested = validity_secs.map(check_validity).transpose()?;
        let allowance = match (p.allowance, requested) {
            (Some(a), Some(r)) if a != r => {
                return Err(LedgerError::AllowanceMismatch {
                    product_key: pk.to_owned(),
                    product_validity_secs: a.validity_secs,
                    requested_validity_secs: r.validity_secs,
                })
            }
            (Some(a), _) => a,
            (None, Some(r)) => r,
            (None, None) => {
                return Err(invalid(format!(
                    "product {pk} has no allowance yet: ValiditySeconds is required"
                )))
            }
        };
        if quantity == 0 {
            return Err(invalid("Quantity must be at least 1"));
        }
        let available = self.unassigned.get(&allowance).copied().unwrap_or(0);
        if quantity > available {
            return Err(LedgerError::InsufficientCodes {
                requested: quantity,
                available,
            });
        }
        let mut lots = Vec::new();
        let mut left = quantity;
        for id in &self.order_seq {
            if left == 0 {
                break;
            }
            let Some(o) = self.orders.get(id) else {
                continue;
            };
            if o.allowance != allowance || o.unassigned == 0 {
                continue;
            }
            let take = o.unassigned.min(left);
            lots.push(Lot {
                order_id: id.clone(),
                remaining: take,
            });
            left -= take;
        }
        Ok(AssignPlan {
            allowance,
            set_allowance: p.allowance.is_none(),
            quantity,
            lots,
        })
    }

    /// What `AssignActivationCodes` with `DryRun` reports.
    pub fn preview_assignment(
        &self,
        pk: &str,
        quantity: u64,
        validity_secs: Option<u64>,
    ) -> Result<AssignPreview, LedgerError> {
        let p = self.live_product(pk)?;
        let allowance = p
            .allowance
            .or_else(|| validity_secs.and_then(|s| check_validity(s).ok()));
        let max_assignable = allowance
            .and_then(|a| self.unassigned.get(&a).copied())
            .unwrap_or(0);
        let (orders, error) = match self.plan_assignment(pk, quantity, validity_secs) {
            Ok(plan) => (plan.lots, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        Ok(AssignPreview {
            product_key: pk.to_owned(),
            allowance,
            max_assignable,
            quantity,
            orders,
            error,
        })
    }

    fn assign(
        &mut self,
        pk: &str,
        plan: AssignPlan,
        now: Millis,
        events: &mut Vec<Event>,
    ) -> Assignment {
        for lot in &plan.lots {
            if let Some(o) = self.orders.get_mut(&lot.order_id) {
                o.unassigned -= lot.remaining;
                self.dirty.orders.insert(lot.order_id.clone());
            }
        }
        if let Some(n) = self.unassigned.get_mut(&plan.allowance) {
            *n -= plan.quantity;
            if *n == 0 {
                self.unassigned.remove(&plan.allowance);
            }
        }
        self.available_assigned += plan.quantity;
        let mut name = String::new();
        if let Some(p) = self.products.get_mut(pk) {
            if plan.set_allowance {
                p.allowance = Some(plan.allowance);
            }
            p.total += plan.quantity;
            for lot in &plan.lots {
                match p.pool.last_mut() {
                    Some(last) if last.order_id == lot.order_id => last.remaining += lot.remaining,
                    _ => p.pool.push(lot.clone()),
                }
            }
            name = p.name.clone();
        }
        self.dirty.products.insert(pk.to_owned());
        let a = Assignment {
            id: self.assignments.len() as u64 + 1,
            product_key: pk.to_owned(),
            product_name: name,
            quantity: plan.quantity,
            allowance: plan.allowance,
            orders: plan.lots,
            at: now,
        };
        self.assignments.push(a.clone());
        self.dirty.assignments.insert(a.id);
        events.push(
            Event::new(EventKind::CodesAssigned, now)
                .with("ProductKey", pk)
                .with("Quantity", a.quantity)
                .with("ValiditySeconds", a.allowance.validity_secs)
                .with("AssignmentId", a.id),
        );
        a
    }

    fn change_blacklist(
        &mut self,
        pk: &str,
        keys: &[String],
        add: bool,
    ) -> Result<Outcome, LedgerError> {
        self.live_product(pk)?;
        check_device_keys(keys)?;
        let mut changed = Vec::new();
        for dk in keys {
            let id = dev_id(pk, dk);
            let did = if add {
                self.blacklist.insert(id.clone())
            } else {
                self.blacklist.remove(&id)
            };
            if did {
                self.dirty.blacklist.insert(id);
                changed.push(dk.clone());
            }
        }
        Ok(Outcome::BlacklistChanged {
            product_key: pk.to_owned(),
            changed,
        })
    }

    fn delete_device(
        &mut self,
        pk: &str,
        dk: &str,
        now: Millis,
        events: &mut Vec<Event>,
    ) -> Result<Outcome, LedgerError> {
        self.live_product(pk)?;
        let id = dev_id(pk, dk);
        let Some(d) = self.devices.get_mut(&id).filter(|d| d.deleted_at.is_none()) else {
            return Err(LedgerError::DeviceNotFound(pk.to_owned(), dk.to_owned()));
        };
        d.deleted_at = Some(now);
        d.secret = None;
        if let Some(e) = d.expire_at {
            self.current_expiry.remove(&(e, id.0.clone(), id.1.clone()));
        }
        self.dirty.devices.insert(id);
        events.push(Event::new(EventKind::DeviceDeleted, now).device(pk, dk));
        Ok(Outcome::DeviceDeleted {
            product_key: pk.to_owned(),
            device_key: dk.to_owned(),
        })
    }

    fn delete_product(
        &mut self,
        pk: &str,
        now: Millis,
        events: &mut Vec<Event>,
    ) -> Result<Outcome, LedgerError> {
        let p = self.live_product_mut(pk)?;
        let forfeited = p.available();
        p.pool.clear();
        p.forfeited = forfeited;
        p.deleted_at = Some(now);
        self.available_assigned -= forfeited;
        self.forfeited += forfeited;
        self.dirty.products.insert(pk.to_owned());
        let start = (pk.to_owned(), String::new());
        let mut devices = Vec::new();
        for ((dpk, dk), d) in self.devices.range(start..) {
            if dpk != pk {
                break;
            }
            if d.deleted_at.is_none() {
                devices.push(dk.clone());
                if let Some(e) = d.expire_at {
                    self.current_expiry.remove(&(e, dpk.clone(), dk.clone()));
                }
            }
        }
        events.push(
            Event::new(EventKind::ProductDeleted, now)
                .with("ProductKey", pk)
                .with("Forfeited", forfeited),
        );
        Ok(Outcome::ProductDeleted {
            product_key: pk.to_owned(),
            forfeited,
            devices,
        })
    }

    /// Marks every current code expiring in `(now, now + window]` that was
    /// not announced yet, and returns them.
    pub fn take_expiring(
        &mut self,
        now: Millis,
        window: Millis,
        events: &mut Vec<Event>,
    ) -> Vec<CodeRecord> {
        let lo = (now.saturating_add(1), String::new(), String::new());
        let hi = now.saturating_add(window);
        let ids: Vec<u64> = self
            .current_expiry
            .range(lo..)
            .take_while(|(e, _, _)| *e <= hi)
            .filter_map(|(_, pk, dk)| {
                self.devices
                    .get(&(pk.clone(), dk.clone()))
                    .and_then(|d| d.current_code)
            })
            .collect();
        let mut out = Vec::new();
        for id in ids {
            let Some(c) = id
                .checked_sub(1)
                .and_then(|i| self.codes.get_mut(i as usize))
            else {
                continue;
            };
            if c.expiring_notified {
                continue;
            }
            c.expiring_notified = true;
            c.modified = now;
            self.dirty.codes.insert(id);
            events.push(code_event(EventKind::DeviceExpiring, now, c));
            out.push(c.clone());
        }
        out
    }
}

/// A worked-out assignment.
#[derive(Debug, Clone)]
pub struct AssignPlan {
    pub allowance: Allowance,
    pub set_allowance: bool,
    pub quantity: u64,
    pub lots: Vec<Lot>,
}

pub fn code_event(kind: EventKind, at: Millis, c: &CodeRecord) -> Event {
    Event::new(kind, at)
        .device(&c.product_key, &c.device_key)
        .with("CodeId", c.id)
        .with("OrderId", c.order_id.as_str())
        .with_time("ActivateAt", c.activate_at)
        .with_time("ExpireAt", c.expire_at)
}
