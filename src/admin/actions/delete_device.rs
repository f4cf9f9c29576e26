//! DeleteDevice [delete]: ProductKey, DeviceKey. The device's code is not
//! returned; the broker disconnects it if online.

use serde_json::json;

use crate::admin::params::Params;
use crate::admin::render::{object, Data};
use crate::admin::{AdminContext, AdminError, Call};
use crate::ledger::{Command, Outcome};

#[derive(Debug)]
pub struct DeleteDevice {
    product_key: String,
    device_key: String,
}

impl DeleteDevice {
    pub fn parse(p: &mut Params) -> Result<Self, AdminError> {
        Ok(DeleteDevice {
            product_key: p.product_key()?,
            device_key: p.device_key()?,
        })
    }

    pub async fn apply(self, ctx: &AdminContext, call: &Call) -> Result<Data, AdminError> {
        let command = Command::DeleteDevice {
            product_key: self.product_key,
            device_key: self.device_key,
        };
        match ctx.execute(call, command).await? {
            Outcome::DeviceDeleted {
                product_key,
                device_key,
            } => Ok(object(
                json!({ "ProductKey": product_key, "DeviceKey": device_key }),
            )),
            other => Err(super::unexpected(&other)),
        }
    }
}
