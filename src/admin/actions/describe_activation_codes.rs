//! DescribeActivationCodes [list]: consumed codes; filters ProductKey,
//! ProductName, DeviceKey, OrderId, ActivateFrom/To, ExpireFrom/To.

use crate::admin::params::Params;
use crate::admin::render::{self, Data};
use crate::admin::{AdminContext, AdminError, Call};
use crate::ledger::{CodeFilter, PageRequest};

#[derive(Debug)]
pub struct DescribeActivationCodes {
    filter: CodeFilter,
    page: PageRequest,
}

impl DescribeActivationCodes {
    pub fn parse(p: &mut Params) -> Result<Self, AdminError> {
        Ok(DescribeActivationCodes {
            filter: super::code_filter(p)?,
            page: p.page()?,
        })
    }

    pub async fn apply(self, ctx: &AdminContext, _call: &Call) -> Result<Data, AdminError> {
        let page = ctx
            .query(move |l| Ok(l.codes(&self.filter, self.page)))
            .await?;
        Ok(render::page(&page, render::code))
    }
}
