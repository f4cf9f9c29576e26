//! DescribeDevices [list]: live devices of one product, by DeviceKey;
//! filter DeviceKeyPrefix.

use crate::admin::params::Params;
use crate::admin::render::{self, Data};
use crate::admin::{AdminContext, AdminError, Call};
use crate::ledger::{DeviceFilter, PageRequest};

#[derive(Debug)]
pub struct DescribeDevices {
    filter: DeviceFilter,
    page: PageRequest,
}

impl DescribeDevices {
    pub fn parse(p: &mut Params) -> Result<Self, AdminError> {
        Ok(DescribeDevices {
            filter: DeviceFilter {
                product_key: p.product_key()?,
                device_key_prefix: p.opt_str("DeviceKeyPrefix")?,
            },
            page: p.page()?,
        })
    }

    pub async fn apply(self, ctx: &AdminContext, _call: &Call) -> Result<Data, AdminError> {
        let now = ctx.now();
        let page = ctx
            .query(move |l| l.devices(&self.filter, self.page))
            .await?;
        Ok(render::page(&page, |d| render::device(d, now)))
    }
}
