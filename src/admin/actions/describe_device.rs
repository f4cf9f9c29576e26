//! DescribeDevice [get]: one live device, its current code and whether it
//! is on the product's auto-renewal blacklist.

use serde_json::Value;

use crate::admin::params::Params;
use crate::admin::render::{self, Data};
use crate::admin::{AdminContext, AdminError, Call};

#[derive(Debug)]
pub struct DescribeDevice {
    product_key: String,
    device_key: String,
}

impl DescribeDevice {
    pub fn parse(p: &mut Params) -> Result<Self, AdminError> {
        Ok(DescribeDevice {
            product_key: p.product_key()?,
            device_key: p.device_key()?,
        })
    }

    pub async fn apply(self, ctx: &AdminContext, _call: &Call) -> Result<Data, AdminError> {
        let now = ctx.now();
        let (device, current, blacklisted) = ctx
            .query(move |l| {
                let d = l.device(&self.product_key, &self.device_key)?;
                let current = match d.current_code {
                    Some(_) => {
                        let page = crate::ledger::PageRequest::new(d.codes.len().max(1) as u64, 1)?;
                        l.history(&self.product_key, &self.device_key, page)?
                            .items
                            .into_iter()
                            .next()
                    }
                    None => None,
                };
                let (_, list) = l.auto_renewal(&self.product_key)?;
                let blacklisted = list.binary_search(&self.device_key).is_ok();
                Ok((d, current, blacklisted))
            })
            .await?;
        let mut data = render::object(render::device(&device, now));
        data.insert(
            "CurrentCode".into(),
            current.as_ref().map_or(Value::Null, render::code),
        );
        data.insert("Blacklisted".into(), blacklisted.into());
        Ok(data)
    }
}
