//! AssignActivationCodes [update]: ProductKey, Quantity, ValiditySeconds
//! (needed while the product has no allowance), DryRun. Irrevocable.
//!
//! A dry run changes nothing and answers what the assignment would do:
//! `MaxAssignable`, the `Allowance` and the `Orders` the codes would come
//! from. If the assignment would fail, the dry run answers with that error
//! code (e.g. `InsufficientActivationCodes`) and the same data.

use serde_json::json;

use super::create_order::{MAX_QUANTITY, MAX_VALIDITY_SECS};
use crate::admin::params::Params;
use crate::admin::render::{self, Data};
use crate::admin::{AdminContext, AdminError, Call};
use crate::ledger::{Command, Outcome};

#[derive(Debug)]
pub struct AssignActivationCodes {
    product_key: String,
    quantity: u64,
    validity_secs: Option<u64>,
    dry_run: bool,
}

impl AssignActivationCodes {
    pub fn parse(p: &mut Params) -> Result<Self, AdminError> {
        Ok(AssignActivationCodes {
            product_key: p.product_key()?,
            quantity: p.u64("Quantity", 1, MAX_QUANTITY)?,
            validity_secs: p.opt_u64("ValiditySeconds", 1, MAX_VALIDITY_SECS)?,
            dry_run: p.opt_bool("DryRun")?.unwrap_or(false),
        })
    }

    pub async fn apply(self, ctx: &AdminContext, call: &Call) -> Result<Data, AdminError> {
        if self.dry_run {
            let (pk, q, v) = (self.product_key.clone(), self.quantity, self.validity_secs);
            let preview = ctx.query(move |l| l.preview_assignment(&pk, q, v)).await?;
            let data = render::object(json!({
                "DryRun": true,
                "ProductKey": preview.product_key,
                "Quantity": preview.quantity,
                "MaxAssignable": preview.max_assignable,
                "Allowance": render::allowance(preview.allowance),
                "Orders": render::lots(&preview.orders),
            }));
            return match preview.error {
                None => Ok(data),
                Some(e) => Err(AdminError::from(e).with_data(data)),
            };
        }
        let command = Command::AssignCodes {
            product_key: self.product_key,
            quantity: self.quantity,
            validity_secs: self.validity_secs,
        };
        match ctx.execute(call, command).await? {
            Outcome::CodesAssigned(a) => Ok(render::object(render::assignment(&a))),
            other => Err(super::unexpected(&other)),
        }
    }
}
