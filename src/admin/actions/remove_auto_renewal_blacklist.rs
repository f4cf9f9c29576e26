//! RemoveAutoRenewalBlacklist [update]: ProductKey, DeviceKeys. Removes devices from the product's
//! auto-renewal blacklist; `Changed` lists the DeviceKeys actually removed.

use crate::admin::params::Params;
use crate::admin::render::Data;
use crate::admin::{AdminContext, AdminError, Call};
use crate::ledger::Command;

#[derive(Debug)]
pub struct RemoveAutoRenewalBlacklist {
    product_key: String,
    device_keys: Vec<String>,
}

impl RemoveAutoRenewalBlacklist {
    pub fn parse(p: &mut Params) -> Result<Self, AdminError> {
        Ok(RemoveAutoRenewalBlacklist {
            product_key: p.product_key()?,
            device_keys: p.device_keys("DeviceKeys")?,
        })
    }

    pub async fn apply(self, ctx: &AdminContext, call: &Call) -> Result<Data, AdminError> {
        let command = Command::RemoveBlacklist {
            product_key: self.product_key,
            device_keys: self.device_keys,
        };
        super::add_auto_renewal_blacklist::apply_blacklist_change(ctx, call, command).await
    }
}
