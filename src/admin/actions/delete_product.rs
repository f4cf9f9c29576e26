//! DeleteProduct [delete]: ProductKey, Confirm=true. Forfeits the
//! product's available codes and disconnects its devices.

use serde_json::json;

use crate::admin::params::Params;
use crate::admin::render::{object, Data};
use crate::admin::{AdminContext, AdminError, Call};
use crate::ledger::{Command, Outcome};

#[derive(Debug)]
pub struct DeleteProduct {
    product_key: String,
}

impl DeleteProduct {
    pub fn parse(p: &mut Params) -> Result<Self, AdminError> {
        let product_key = p.product_key()?;
        if p.opt_bool("Confirm")? != Some(true) {
            return Err(AdminError::invalid(
                "Confirm",
                "must be true: deleting a product forfeits its available codes and disconnects its devices",
            ));
        }
        Ok(DeleteProduct { product_key })
    }

    pub async fn apply(self, ctx: &AdminContext, call: &Call) -> Result<Data, AdminError> {
        let command = Command::DeleteProduct {
            product_key: self.product_key,
        };
        match ctx.execute(call, command).await? {
            Outcome::ProductDeleted {
                product_key,
                forfeited,
                devices,
            } => Ok(object(json!({
                "ProductKey": product_key,
                "Forfeited": forfeited,
                "DeviceCount": devices.len() as u64,
            }))),
            other => Err(super::unexpected(&other)),
        }
    }
}
