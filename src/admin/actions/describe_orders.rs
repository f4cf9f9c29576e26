//! DescribeOrders [list]: orders in purchase order; filters OrderId
//! (exact: NotFound.Order if unknown), ProductKey, UnassignedOnly.

use crate::admin::params::Params;
use crate::admin::render::{self, Data};
use crate::admin::{AdminContext, AdminError, Call};
use crate::ledger::{OrderFilter, Page, PageRequest};

#[derive(Debug)]
pub struct DescribeOrders {
    order_id: Option<String>,
    filter: OrderFilter,
    page: PageRequest,
}

impl DescribeOrders {
    pub fn parse(p: &mut Params) -> Result<Self, AdminError> {
        Ok(DescribeOrders {
            order_id: p.opt_device_key("OrderId")?,
            filter: OrderFilter {
                product_key: p.opt_product_key("ProductKey")?,
                unassigned_only: p.opt_bool("UnassignedOnly")?.unwrap_or(false),
            },
            page: p.page()?,
        })
    }

    pub async fn apply(self, ctx: &AdminContext, _call: &Call) -> Result<Data, AdminError> {
        let page = ctx
            .query(move |l| match &self.order_id {
                Some(id) => {
                    let o = l.order(id)?;
                    let keep = self.filter.product_key.is_none()
                        || o.product_key == self.filter.product_key;
                    let keep = keep && (!self.filter.unassigned_only || o.unassigned > 0);
                    let items: Vec<_> = Some(o).filter(|_| keep).into_iter().collect();
                    let total = items.len() as u64;
                    Ok(Page {
                        items: if self.page.number == 1 {
                            items
                        } else {
                            Vec::new()
                        },
                        page_number: self.page.number,
                        page_size: self.page.size,
                        total,
                    })
                }
                None => Ok(l.orders(&self.filter, self.page)),
            })
            .await?;
        Ok(render::page(&page, render::order))
    }
}
