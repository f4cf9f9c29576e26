//! DescribeActivationHistory [list]: every code one device consumed,
//! oldest first (deleted devices keep their history).

use crate::admin::params::Params;
use crate::admin::render::{self, Data};
use crate::admin::{AdminContext, AdminError, Call};
use crate::ledger::PageRequest;

#[derive(Debug)]
pub struct DescribeActivationHistory {
    product_key: String,
    device_key: String,
    page: PageRequest,
}

impl DescribeActivationHistory {
    pub fn parse(p: &mut Params) -> Result<Self, AdminError> {
        Ok(DescribeActivationHistory {
            product_key: p.product_key()?,
            device_key: p.device_key()?,
            page: p.page()?,
        })
    }

    pub async fn apply(self, ctx: &AdminContext, _call: &Call) -> Result<Data, AdminError> {
        let page = ctx
            .query(move |l| l.history(&self.product_key, &self.device_key, self.page))
            .await?;
        Ok(render::page(&page, render::code))
    }
}
