//! CreateOrder [create]: OrderId (optional), Quantity, ValiditySeconds,
//! ProductKey (optional: the codes are assigned to it at purchase).

use serde_json::Value;

use crate::admin::params::Params;
use crate::admin::render::{self, Data};
use crate::admin::{AdminContext, AdminError, Call};
use crate::ledger::{Command, Outcome};

/// Largest order and longest validity (100 years): the ledger's limits,
/// checked here first so a request gets the parameter's name in its error.
pub use crate::ledger::{MAX_ORDER_QUANTITY as MAX_QUANTITY, MAX_VALIDITY_SECS};

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
