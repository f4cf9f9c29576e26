//! DescribeUnassignedActivationCodes [list]: unassigned quantity per
//! allowance, with the orders holding them; optional ValiditySeconds filter.

use serde_json::json;

use crate::admin::params::Params;
use crate::admin::render::{self, Data};
use crate::admin::{AdminContext, AdminError, Call};
use crate::ledger::{Page, PageRequest};

#[derive(Debug)]
pub struct DescribeUnassignedActivationCodes {
    validity_secs: Option<u64>,
    page: PageRequest,
}

impl DescribeUnassignedActivationCodes {
    pub fn parse(p: &mut Params) -> Result<Self, AdminError> {
        Ok(DescribeUnassignedActivationCodes {
            validity_secs: p.opt_u64(
                "ValiditySeconds",
                1,
                super::create_order::MAX_VALIDITY_SECS,
            )?,
            page: p.page()?,
        })
    }

    pub async fn apply(self, ctx: &AdminContext, _call: &Call) -> Result<Data, AdminError> {
        let groups = ctx.query(|l| Ok(l.unassigned())).await?;
        let groups: Vec<_> = groups
            .into_iter()
            .filter(|g| {
                self.validity_secs
                    .is_none_or(|v| g.allowance.validity_secs == v)
            })
            .collect();
        let total_quantity: u64 = groups.iter().map(|g| g.quantity).sum();
        let offset = (self.page.number - 1).saturating_mul(self.page.size);
        let page = Page {
            items: groups
                .iter()
                .skip(usize::try_from(offset).unwrap_or(usize::MAX))
                .take(self.page.size as usize)
                .cloned()
                .collect(),
            page_number: self.page.number,
            page_size: self.page.size,
            total: groups.len() as u64,
        };
        let mut data = render::page(&page, |g| {
            json!({
                "Allowance": render::allowance(Some(g.allowance)),
                "Quantity": g.quantity,
                "Orders": render::lots(&g.orders),
            })
        });
        data.insert("TotalQuantity".into(), total_quantity.into());
        Ok(data)
    }
}
