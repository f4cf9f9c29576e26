//! RegisterDevices [create]: ProductKey, DeviceKeys (array or
//! comma-separated); returns `DeviceSecrets: [{DeviceKey, DeviceSecret}]`
//! (DeviceSecret is null for product-secret products, whose devices sign
//! with the ProductSecret).

use serde_json::{json, Value};

use crate::admin::params::Params;
use crate::admin::render::{object, Data};
use crate::admin::{AdminContext, AdminError, Call};
use crate::ledger::{Command, Outcome};

#[derive(Debug)]
pub struct RegisterDevices {
    product_key: String,
    device_keys: Vec<String>,
}

impl RegisterDevices {
    pub fn parse(p: &mut Params) -> Result<Self, AdminError> {
        Ok(RegisterDevices {
            product_key: p.product_key()?,
            device_keys: p.device_keys("DeviceKeys")?,
        })
    }

    pub async fn apply(self, ctx: &AdminContext, call: &Call) -> Result<Data, AdminError> {
        let command = Command::RegisterDevices {
            product_key: self.product_key,
            device_keys: self.device_keys,
        };
        match ctx.execute(call, command).await? {
            Outcome::DevicesRegistered {
                product_key,
                devices,
            } => {
                let secrets: Vec<Value> = devices
                    .iter()
                    .map(|(dk, s)| json!({ "DeviceKey": dk, "DeviceSecret": s }))
                    .collect();
                Ok(object(json!({
                    "ProductKey": product_key,
                    "DeviceSecrets": secrets,
                })))
            }
            other => Err(super::unexpected(&other)),
        }
    }
}
