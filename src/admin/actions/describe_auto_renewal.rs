//! DescribeAutoRenewal [get]: whether a product renews expired codes
//! automatically, and its blacklist.

use serde_json::json;

use crate::admin::params::Params;
use crate::admin::render::{object, Data};
use crate::admin::{AdminContext, AdminError, Call};

#[derive(Debug)]
pub struct DescribeAutoRenewal {
    product_key: String,
}

impl DescribeAutoRenewal {
    pub fn parse(p: &mut Params) -> Result<Self, AdminError> {
        Ok(DescribeAutoRenewal {
            product_key: p.product_key()?,
        })
    }

    pub async fn apply(self, ctx: &AdminContext, _call: &Call) -> Result<Data, AdminError> {
        let pk = self.product_key.clone();
        let (enabled, blacklist) = ctx.query(move |l| l.auto_renewal(&pk)).await?;
        Ok(object(json!({
            "ProductKey": self.product_key,
            "Enabled": enabled,
            "Blacklist": blacklist,
            "BlacklistCount": blacklist.len() as u64,
        })))
    }
}
