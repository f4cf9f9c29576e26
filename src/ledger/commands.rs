//! Operator commands as mutations of the state: products, devices,
//! orders, the blacklist, deletions.
use super::assignment::AssignPlan;
use super::model::*;
use super::state::*;
use super::{Command, LedgerError, Outcome};
use crate::clock::Millis;
use crate::credentials::{generate_secret, valid_device_key};
use crate::events::{Event, EventKind};

impl State {
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

    pub(super) fn create_product(
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

    pub(super) fn register_devices(
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

    pub(super) fn create_order(
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

    pub(super) fn change_blacklist(
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

    pub(super) fn delete_device(
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

    pub(super) fn delete_product(
        &mut self,
        pk: &str,
        now: Millis,
        events: &mut Vec<Event>,
    ) -> Result<Outcome, LedgerError> {
        self.live_product(pk)?;
        let in_lanes = self.forfeit_lanes(pk);
        let p = self.live_product_mut(pk)?;
        let forfeited = p.available() + in_lanes;
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
}
