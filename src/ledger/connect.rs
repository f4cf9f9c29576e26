//! The connect decision (SPEC §2 consumption and renewal) and the
//! near-expiry marking, as mutations of the state.
use super::model::*;
use super::state::*;
use super::Refusal;
use crate::clock::Millis;
use crate::events::{Event, EventKind};

impl State {
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
        if self.product_available(product) == 0 {
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

    pub(super) fn undelete_device(&mut self, id: &DeviceId, _now: Millis) {
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
    pub(super) fn consume(
        &mut self,
        id: &DeviceId,
        kind: CodeKind,
        now: Millis,
        events: &mut Vec<Event>,
        pool_low: u64,
    ) -> CodeRecord {
        let (pk, dk) = (&id.0, &id.1);
        let before = self
            .products
            .get(pk)
            .map_or(0, |p| self.product_available(p));
        let validity = self
            .products
            .get(pk)
            .and_then(|p| p.allowance)
            .map_or(0, Allowance::validity_ms);
        let (order_id, code_id) = match self.lane_mode.clone() {
            Some(mode) => self.take_from_lane(pk, &mode),
            None => (self.take_from_pool(pk), self.codes.len() as u64 + 1),
        };
        let after = before.saturating_sub(1);
        self.available_assigned -= 1;
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
        self.index_code(&code);
        self.put_code(code.clone());
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

    /// Takes one code from the product's oldest lot; returns its order.
    fn take_from_pool(&mut self, pk: &str) -> String {
        let mut order_id = String::new();
        if let Some(p) = self.products.get_mut(pk) {
            order_id = take_oldest(&mut p.pool);
            p.consumed += 1;
        }
        self.dirty.products.insert(pk.to_owned());
        order_id
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
            let Some(c) = (id as usize)
                .checked_sub(1)
                .and_then(|i| self.codes.get_mut(i))
                .and_then(Option::as_mut)
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
