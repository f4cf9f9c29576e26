//! Operator queries (SPEC §4 Describe*), served from the in-memory indexes
//! under a read lock: per-product, per-order and per-device code lists, the
//! activation and expiry indexes, and the current-expiry index for
//! near-expiry. Every list is paginated in a stable order.

use std::collections::BTreeMap;

use serde::Serialize;

use super::model::*;
use super::state::State;
use super::{AssignPreview, Ledger, LedgerError};
use crate::clock::Millis;

pub const MAX_PAGE_SIZE: u64 = 100;
pub const DEFAULT_PAGE_SIZE: u64 = 30;

/// `PageNumber` (from 1) and `PageSize` (1..=100).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    pub number: u64,
    pub size: u64,
}

impl Default for PageRequest {
    fn default() -> Self {
        PageRequest {
            number: 1,
            size: DEFAULT_PAGE_SIZE,
        }
    }
}

impl PageRequest {
    pub fn new(number: u64, size: u64) -> Result<Self, LedgerError> {
        if number == 0 {
            return Err(LedgerError::InvalidParameter(
                "PageNumber must be at least 1".into(),
            ));
        }
        if size == 0 || size > MAX_PAGE_SIZE {
            return Err(LedgerError::InvalidParameter(format!(
                "PageSize must be between 1 and {MAX_PAGE_SIZE}"
            )));
        }
        Ok(PageRequest { number, size })
    }

    fn offset(&self) -> u64 {
        (self.number - 1).saturating_mul(self.size)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub page_number: u64,
    pub page_size: u64,
    pub total: u64,
}

impl<T> Page<T> {
    fn empty(page: PageRequest, total: u64) -> Self {
        Page {
            items: Vec::new(),
            page_number: page.number,
            page_size: page.size,
            total,
        }
    }
}

/// Counts every item and keeps those of the page.
fn paginate<T>(iter: impl Iterator<Item = T>, page: PageRequest) -> Page<T> {
    let offset = page.offset();
    let mut items = Vec::new();
    let mut total = 0u64;
    for item in iter {
        if total >= offset && (items.len() as u64) < page.size {
            items.push(item);
        }
        total += 1;
    }
    Page {
        items,
        page_number: page.number,
        page_size: page.size,
        total,
    }
}

/// A page of a list whose length is known, without visiting what is skipped.
fn slice_page<T: Clone>(all: &[T], page: PageRequest) -> Page<T> {
    let total = all.len() as u64;
    let offset = page.offset();
    if offset >= total {
        return Page::empty(page, total);
    }
    let end = offset.saturating_add(page.size).min(total);
    Page {
        items: all[offset as usize..end as usize].to_vec(),
        page_number: page.number,
        page_size: page.size,
        total,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub total: u64,
    pub consumed: u64,
    pub available: u64,
    pub unassigned: u64,
    pub forfeited: u64,
    pub near_expiry: u64,
    pub products: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnassignedGroup {
    pub allowance: Allowance,
    pub quantity: u64,
    /// Orders holding unassigned codes of this allowance, with how many.
    pub orders: Vec<Lot>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProductFilter {
    /// Exact ProductKey.
    pub product_key: Option<String>,
    /// Case-insensitive part of the name.
    pub name: Option<String>,
}

/// Filters of consumed codes; every bound is inclusive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CodeFilter {
    pub product_key: Option<String>,
    pub product_name: Option<String>,
    pub device_key: Option<String>,
    pub order_id: Option<String>,
    pub activate_from: Option<Millis>,
    pub activate_to: Option<Millis>,
    pub expire_from: Option<Millis>,
    pub expire_to: Option<Millis>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AssignmentFilter {
    pub product_key: Option<String>,
    /// Case-insensitive part of the product's name.
    pub product_name: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderFilter {
    pub product_key: Option<String>,
    /// Only orders that still hold unassigned codes.
    pub unassigned_only: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceFilter {
    pub product_key: String,
    /// DeviceKeys starting with this.
    pub device_key_prefix: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    pub account: Option<String>,
    pub action: Option<String>,
    pub from: Option<Millis>,
    pub to: Option<Millis>,
}

fn contains_ci(haystack: &str, needle: &str) -> bool {
    haystack.to_lowercase().contains(&needle.to_lowercase())
}

fn within(v: Millis, from: Option<Millis>, to: Option<Millis>) -> bool {
    from.is_none_or(|f| v >= f) && to.is_none_or(|t| v <= t)
}

impl CodeFilter {
    fn matches(&self, st: &State, c: &CodeRecord) -> bool {
        self.product_key
            .as_ref()
            .is_none_or(|pk| *pk == c.product_key)
            && self
                .device_key
                .as_ref()
                .is_none_or(|dk| *dk == c.device_key)
            && self.order_id.as_ref().is_none_or(|o| *o == c.order_id)
            && within(c.activate_at, self.activate_from, self.activate_to)
            && within(c.expire_at, self.expire_from, self.expire_to)
            && self.product_name.as_ref().is_none_or(|n| {
                st.products
                    .get(&c.product_key)
                    .is_some_and(|p| contains_ci(&p.name, n))
            })
    }

    fn only_index_keys(&self) -> bool {
        self.product_name.is_none()
            && self.activate_from.is_none()
            && self.activate_to.is_none()
            && self.expire_from.is_none()
            && self.expire_to.is_none()
    }
}

impl State {
    fn ids_page(&self, ids: &[u64], page: PageRequest) -> Page<CodeRecord> {
        let p = slice_page(ids, page);
        Page {
            items: p
                .items
                .iter()
                .filter_map(|id| self.code(*id).cloned())
                .collect(),
            page_number: p.page_number,
            page_size: p.page_size,
            total: p.total,
        }
    }

    pub fn query_codes(&self, f: &CodeFilter, page: PageRequest) -> Page<CodeRecord> {
        // Pick the narrowest index, then filter what remains.
        let list: Option<&[u64]> = if let (Some(pk), Some(dk)) = (&f.product_key, &f.device_key) {
            Some(
                self.devices
                    .get(&(pk.clone(), dk.clone()))
                    .map_or(&[][..], |d| d.codes.as_slice()),
            )
        } else if let Some(o) = &f.order_id {
            Some(self.codes_by_order.get(o).map_or(&[][..], Vec::as_slice))
        } else if let Some(pk) = &f.product_key {
            Some(self.codes_by_product.get(pk).map_or(&[][..], Vec::as_slice))
        } else {
            None
        };
        if let Some(ids) = list {
            let exact = f.only_index_keys()
                && (f.order_id.is_none() || (f.product_key.is_none() && f.device_key.is_none()));
            if exact {
                return self.ids_page(ids, page);
            }
            return paginate(
                ids.iter()
                    .filter_map(|id| self.code(*id))
                    .filter(|c| f.matches(self, c))
                    .cloned(),
                page,
            );
        }
        if f.activate_from.is_some() || f.activate_to.is_some() {
            let lo = (f.activate_from.unwrap_or(Millis::MIN), 0);
            let hi = (f.activate_to.unwrap_or(Millis::MAX), u64::MAX);
            return paginate(
                self.codes_by_activation
                    .range(lo..=hi)
                    .filter_map(|(_, id)| self.code(*id))
                    .filter(|c| f.matches(self, c))
                    .cloned(),
                page,
            );
        }
        if f.expire_from.is_some() || f.expire_to.is_some() {
            let lo = (f.expire_from.unwrap_or(Millis::MIN), 0);
            let hi = (f.expire_to.unwrap_or(Millis::MAX), u64::MAX);
            return paginate(
                self.codes_by_expiry
                    .range(lo..=hi)
                    .filter_map(|(_, id)| self.code(*id))
                    .filter(|c| f.matches(self, c))
                    .cloned(),
                page,
            );
        }
        if f.product_name.is_some() || self.code_count != self.codes.len() as u64 {
            return paginate(
                self.all_codes().filter(|c| f.matches(self, c)).cloned(),
                page,
            );
        }
        // Dense: the page is a slice.
        let page = slice_page(&self.codes, page);
        Page {
            items: page.items.into_iter().flatten().collect(),
            page_number: page.page_number,
            page_size: page.page_size,
            total: page.total,
        }
    }

    pub fn near_expiry_count(&self, now: Millis, window: Millis) -> u64 {
        let lo = (now.saturating_add(1), String::new(), String::new());
        let hi = now.saturating_add(window);
        self.current_expiry
            .range(lo..)
            .take_while(|(e, _, _)| *e <= hi)
            .count() as u64
    }

    pub fn query_near_expiry(
        &self,
        now: Millis,
        window: Millis,
        f: &CodeFilter,
        page: PageRequest,
    ) -> Page<CodeRecord> {
        let from = now
            .saturating_add(1)
            .max(f.expire_from.unwrap_or(Millis::MIN));
        let to = now
            .saturating_add(window)
            .min(f.expire_to.unwrap_or(Millis::MAX));
        if from > to {
            return Page::empty(page, 0);
        }
        paginate(
            self.current_expiry
                .range((from, String::new(), String::new())..)
                .take_while(|(e, _, _)| *e <= to)
                .filter_map(|(_, pk, dk)| {
                    let d = self.devices.get(&(pk.clone(), dk.clone()))?;
                    self.code(d.current_code?)
                })
                .filter(|c| f.matches(self, c))
                .cloned(),
            page,
        )
    }
}

impl Ledger {
    pub fn summary(&self, near_expiry_window_ms: Millis) -> Summary {
        let now = self.clock().now();
        let st = self.read();
        let c = st.counters();
        Summary {
            total: c.total,
            consumed: c.consumed,
            available: c.available,
            unassigned: c.unassigned,
            forfeited: c.forfeited,
            near_expiry: st.near_expiry_count(now, near_expiry_window_ms),
            products: st
                .products
                .values()
                .filter(|p| p.deleted_at.is_none())
                .count() as u64,
        }
    }

    pub fn unassigned(&self) -> Vec<UnassignedGroup> {
        let st = self.read();
        let mut groups: BTreeMap<Allowance, UnassignedGroup> = BTreeMap::new();
        for id in &st.order_seq {
            let Some(o) = st.orders.get(id) else { continue };
            if o.unassigned == 0 {
                continue;
            }
            let g = groups
                .entry(o.allowance)
                .or_insert_with(|| UnassignedGroup {
                    allowance: o.allowance,
                    quantity: 0,
                    orders: Vec::new(),
                });
            g.quantity += o.unassigned;
            g.orders.push(Lot {
                order_id: o.order_id.clone(),
                remaining: o.unassigned,
            });
        }
        groups.into_values().collect()
    }

    /// Live products, by ProductKey.
    pub fn products(&self, f: &ProductFilter, page: PageRequest) -> Page<Product> {
        let st = self.read();
        if let Some(pk) = &f.product_key {
            return paginate(
                st.products
                    .get(pk)
                    .filter(|p| p.deleted_at.is_none())
                    .filter(|p| f.name.as_ref().is_none_or(|n| contains_ci(&p.name, n)))
                    .map(|p| st.product_view(p))
                    .into_iter(),
                page,
            );
        }
        paginate(
            st.products
                .values()
                .filter(|p| p.deleted_at.is_none())
                .filter(|p| f.name.as_ref().is_none_or(|n| contains_ci(&p.name, n)))
                .map(|p| st.product_view(p)),
            page,
        )
    }

    /// Every lane (etcd store): which node holds how many of a product's
    /// codes and has consumed how many.
    pub fn lanes(&self) -> Vec<super::Lane> {
        self.read().lanes.values().cloned().collect()
    }

    /// A live product.
    pub fn product(&self, pk: &str) -> Result<Product, LedgerError> {
        let st = self.read();
        st.live_product(pk).map(|p| st.product_view(p))
    }

    /// Consumed codes matching `f`, by Id (by ActivateAt or ExpireAt when
    /// only a time range narrows the search).
    pub fn codes(&self, f: &CodeFilter, page: PageRequest) -> Page<CodeRecord> {
        self.read().query_codes(f, page)
    }

    /// Every code one device consumed, oldest first. Deleted devices keep
    /// their history.
    pub fn history(
        &self,
        pk: &str,
        dk: &str,
        page: PageRequest,
    ) -> Result<Page<CodeRecord>, LedgerError> {
        let st = self.read();
        st.live_product(pk)?;
        let d = st
            .devices
            .get(&(pk.to_owned(), dk.to_owned()))
            .ok_or_else(|| LedgerError::DeviceNotFound(pk.to_owned(), dk.to_owned()))?;
        Ok(st.ids_page(&d.codes, page))
    }

    /// Current codes of live devices expiring within `window_ms` from now,
    /// soonest first.
    pub fn near_expiry(
        &self,
        window_ms: Millis,
        f: &CodeFilter,
        page: PageRequest,
    ) -> Page<CodeRecord> {
        let now = self.clock().now();
        self.read().query_near_expiry(now, window_ms, f, page)
    }

    pub fn assignments(&self, f: &AssignmentFilter, page: PageRequest) -> Page<Assignment> {
        let st = self.read();
        paginate(
            st.assignments
                .iter()
                .filter(|a| f.product_key.as_ref().is_none_or(|pk| *pk == a.product_key))
                .filter(|a| {
                    f.product_name
                        .as_ref()
                        .is_none_or(|n| contains_ci(&a.product_name, n))
                })
                .cloned(),
            page,
        )
    }

    /// Orders in purchase order.
    pub fn orders(&self, f: &OrderFilter, page: PageRequest) -> Page<Order> {
        let st = self.read();
        paginate(
            st.order_seq
                .iter()
                .filter_map(|id| st.orders.get(id))
                .filter(|o| f.product_key.is_none() || o.product_key == f.product_key)
                .filter(|o| !f.unassigned_only || o.unassigned > 0)
                .cloned(),
            page,
        )
    }

    pub fn order(&self, order_id: &str) -> Result<Order, LedgerError> {
        self.read()
            .orders
            .get(order_id)
            .cloned()
            .ok_or_else(|| LedgerError::OrderNotFound(order_id.to_owned()))
    }

    /// Live devices of one product, by DeviceKey.
    pub fn devices(
        &self,
        f: &DeviceFilter,
        page: PageRequest,
    ) -> Result<Page<Device>, LedgerError> {
        let st = self.read();
        st.live_product(&f.product_key)?;
        let prefix = f.device_key_prefix.clone().unwrap_or_default();
        let start = (f.product_key.clone(), prefix.clone());
        Ok(paginate(
            st.devices
                .range(start..)
                .take_while(|((pk, dk), _)| *pk == f.product_key && dk.starts_with(&prefix))
                .map(|(_, d)| d)
                .filter(|d| d.deleted_at.is_none())
                .cloned(),
            page,
        ))
    }

    /// A live device.
    pub fn device(&self, pk: &str, dk: &str) -> Result<Device, LedgerError> {
        let st = self.read();
        st.live_product(pk)?;
        st.devices
            .get(&(pk.to_owned(), dk.to_owned()))
            .filter(|d| d.deleted_at.is_none())
            .cloned()
            .ok_or_else(|| LedgerError::DeviceNotFound(pk.to_owned(), dk.to_owned()))
    }

    /// The audit log, newest first.
    pub fn audit_log(&self, f: &AuditFilter, page: PageRequest) -> Page<AuditRecord> {
        let st = self.read();
        paginate(
            st.audit
                .iter()
                .rev()
                .filter(|a| f.account.as_ref().is_none_or(|x| *x == a.account))
                .filter(|a| f.action.as_ref().is_none_or(|x| *x == a.action))
                .filter(|a| within(a.at, f.from, f.to))
                .cloned(),
            page,
        )
    }

    /// `(enabled, blacklisted DeviceKeys)` of a product.
    pub fn auto_renewal(&self, pk: &str) -> Result<(bool, Vec<String>), LedgerError> {
        let st = self.read();
        let enabled = st.live_product(pk)?.auto_renewal;
        let list = st
            .blacklist
            .range((pk.to_owned(), String::new())..)
            .take_while(|(p, _)| p == pk)
            .map(|(_, dk)| dk.clone())
            .collect();
        Ok((enabled, list))
    }

    /// What an assignment would do (`DryRun`).
    pub fn preview_assignment(
        &self,
        pk: &str,
        quantity: u64,
        validity_secs: Option<u64>,
    ) -> Result<AssignPreview, LedgerError> {
        self.read().preview_assignment(pk, quantity, validity_secs)
    }

    /// Live devices whose current code expires in `(after, until]`, soonest first.
    pub fn expiring_between(&self, after: Millis, until: Millis) -> Vec<(Millis, String, String)> {
        let st = self.read();
        st.current_expiry
            .range((after.saturating_add(1), String::new(), String::new())..)
            .take_while(|(e, _, _)| *e <= until)
            .cloned()
            .collect()
    }

    /// The first expiry of a live device's current code after `after`.
    pub fn next_expiry_after(&self, after: Millis) -> Option<Millis> {
        self.read()
            .current_expiry
            .range((after.saturating_add(1), String::new(), String::new())..)
            .next()
            .map(|(e, _, _)| *e)
    }

    /// Broker counters and the SPEC §2 invariants, recomputed from the records.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.read().check_invariants()
    }

    pub fn counters(&self) -> super::state::Counters {
        self.read().counters()
    }
}
