//! DescribeProducts [list]: live products with their counters; filters
//! ProductKey (exact) and Name (case-insensitive part).

use crate::admin::params::Params;
use crate::admin::render::{self, Data};
use crate::admin::{AdminContext, AdminError, Call};
use crate::ledger::{PageRequest, ProductFilter};

#[derive(Debug)]
pub struct DescribeProducts {
    filter: ProductFilter,
    page: PageRequest,
}

impl DescribeProducts {
    pub fn parse(p: &mut Params) -> Result<Self, AdminError> {
        Ok(DescribeProducts {
            filter: ProductFilter {
                product_key: p.opt_product_key("ProductKey")?,
                name: p.opt_str("Name")?,
            },
            page: p.page()?,
        })
    }

    pub async fn apply(self, ctx: &AdminContext, _call: &Call) -> Result<Data, AdminError> {
        let page = ctx
            .query(move |l| Ok(l.products(&self.filter, self.page)))
            .await?;
        Ok(render::page(&page, render::product))
    }
}
