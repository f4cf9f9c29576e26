//! DescribeAssignmentHistory [list]: every assignment, oldest first;
//! filters ProductKey (exact) and ProductName (case-insensitive part).

use crate::admin::params::Params;
use crate::admin::render::{self, Data};
use crate::admin::{AdminContext, AdminError, Call};
use crate::ledger::{AssignmentFilter, PageRequest};

#[derive(Debug)]
pub struct DescribeAssignmentHistory {
    filter: AssignmentFilter,
    page: PageRequest,
}

impl DescribeAssignmentHistory {
    pub fn parse(p: &mut Params) -> Result<Self, AdminError> {
        Ok(DescribeAssignmentHistory {
            filter: AssignmentFilter {
                product_key: p.opt_product_key("ProductKey")?,
                product_name: p.opt_str("ProductName")?,
            },
            page: p.page()?,
        })
    }

    pub async fn apply(self, ctx: &AdminContext, _call: &Call) -> Result<Data, AdminError> {
        let page = ctx
            .query(move |l| Ok(l.assignments(&self.filter, self.page)))
            .await?;
        Ok(render::page(&page, render::assignment))
    }
}
