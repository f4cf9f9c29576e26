//! Assigning unassigned codes to a product: planning (also `DryRun`) and
//! applying an assignment.
use super::model::*;
use super::state::*;
use super::{AssignPreview, LedgerError};
use crate::clock::Millis;
use crate::events::{Event, EventKind};

impl State {
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

    pub(super) fn assign(
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
}

/// A worked-out assignment.
#[derive(Debug, Clone)]
pub struct AssignPlan {
    pub allowance: Allowance,
    pub set_allowance: bool,
    pub quantity: u64,
    pub lots: Vec<Lot>,
}
