//! SetAutoRenewal [update]: ProductKey, Enabled.

use serde_json::json;

use crate::admin::params::Params;
use crate::admin::render::{object, Data};
use crate::admin::{AdminContext, AdminError, Call};
use crate::ledger::{Command, Outcome};

#[derive(Debug)]
pub struct SetAutoRenewal {
    product_key: String,
    enabled: bool,
}

impl SetAutoRenewal {
    pub fn parse(p: &mut Params) -> Result<Self, AdminError> {
        Ok(SetAutoRenewal {
            product_key: p.product_key()?,
            enabled: p.bool("Enabled")?,
        })
    }

    pub async fn apply(self, ctx: &AdminContext, call: &Call) -> Result<Data, AdminError> {
        let command = Command::SetAutoRenewal {
            product_key: self.product_key,
            enabled: self.enabled,
        };
        match ctx.execute(call, command).await? {
            Outcome::AutoRenewalSet {
                product_key,
                enabled,
            } => Ok(object(
                json!({ "ProductKey": product_key, "Enabled": enabled }),
            )),
            other => Err(super::unexpected(&other)),
        }
    }
}
