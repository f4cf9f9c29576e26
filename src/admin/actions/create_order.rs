//! CreateOrder [create]: OrderId (optional), Quantity, ValiditySeconds,
//! ProductKey (optional: the codes are assigned to it at purchase).

use serde_json::Value;

use crate::admin::params::Params;
use crate::admin::render::{self, Data};
use crate::admin::{AdminContext, AdminError, Call};
use crate::ledger::{Command, Outcome};

/// Largest order (as the ledger enforces).
pub const MAX_QUANTITY: u64 = 100_000_000;
/// Longest validity: 100 years (as the ledger enforces).
pub const MAX_VALIDITY_SECS: u64 = 100 * 366 * 24 * 3600;

#[derive(Debug)]
pub struct CreateOrder {
    order_id: Option<String>,
    quantity: u64,
    validity_secs: u64,
    product_key: Option<String>,
}

impl CreateOrder {
    pub fn parse(p: &mut Params) -> Result<Self, AdminError> {
        Ok(CreateOrder {
            order_id: p.opt_device_key("OrderId")?,
            quantity: p.u64("Quantity", 1, MAX_QUANTITY)?,
            validity_secs: p.u64("ValiditySeconds", 1, MAX_VALIDITY_SECS)?,
            product_key: p.opt_product_key("ProductKey")?,
        })
    }

    pub async fn apply(self, ctx: &AdminContext, call: &Call) -> Result<Data, AdminError> {
        let command = Command::CreateOrder {
            order_id: self.order_id,
            quantity: self.quantity,
            validity_secs: self.validity_secs,
            product_key: self.product_key,
        };
        match ctx.execute(call, command).await? {
            Outcome::OrderCreated { order, assignment } => {
                let mut data = render::object(render::order(&order));
                data.insert(
                    "Assignment".into(),
                    assignment.as_ref().map_or(Value::Null, render::assignment),
                );
                Ok(data)
            }
            other => Err(super::unexpected(&other)),
        }
    }
}
