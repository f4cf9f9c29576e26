//! AddAutoRenewalBlacklist [update]: ProductKey, DeviceKeys. Adds devices to the product's
//! auto-renewal blacklist; `Changed` lists the DeviceKeys newly listed.

use serde_json::json;

use crate::admin::params::Params;
use crate::admin::render::{object, Data};
use crate::admin::{AdminContext, AdminError, Call};
use crate::ledger::{Command, Outcome};

#[derive(Debug)]
pub struct AddAutoRenewalBlacklist {
    product_key: String,
    device_keys: Vec<String>,
}

impl AddAutoRenewalBlacklist {
    pub fn parse(p: &mut Params) -> Result<Self, AdminError> {
        Ok(AddAutoRenewalBlacklist {
            product_key: p.product_key()?,
            device_keys: p.device_keys("DeviceKeys")?,
        })
    }

    pub async fn apply(self, ctx: &AdminContext, call: &Call) -> Result<Data, AdminError> {
        let command = Command::AddBlacklist {
            product_key: self.product_key,
            device_keys: self.device_keys,
        };
        apply_blacklist_change(ctx, call, command).await
    }
}

/// Applies an Add/RemoveBlacklist command and renders `ProductKey` and
/// `Changed` (shared with RemoveAutoRenewalBlacklist).
pub(super) async fn apply_blacklist_change(
    ctx: &AdminContext,
    call: &Call,
    command: Command,
) -> Result<Data, AdminError> {
    match ctx.execute(call, command).await? {
        Outcome::BlacklistChanged {
            product_key,
            changed,
        } => Ok(object(
            json!({ "ProductKey": product_key, "Changed": changed }),
        )),
        other => Err(super::unexpected(&other)),
    }
}
