//! DescribeActivationSummary [get]: the broker's counters — Total, Consumed,
//! Available, Unassigned, Forfeited, NearExpiry (within WithinDays, default
//! the configured window) and Products.

use serde_json::json;

use crate::admin::params::Params;
use crate::admin::render::{object, Data};
use crate::admin::{AdminContext, AdminError, Call};

#[derive(Debug)]
pub struct DescribeActivationSummary {
    within_days: Option<u64>,
}

impl DescribeActivationSummary {
    pub fn parse(p: &mut Params) -> Result<Self, AdminError> {
        Ok(DescribeActivationSummary {
            within_days: p.opt_u64(
                "WithinDays",
                1,
                super::describe_near_expiry_devices::MAX_DAYS,
            )?,
        })
    }

    pub async fn apply(self, ctx: &AdminContext, _call: &Call) -> Result<Data, AdminError> {
        let days = self.within_days.unwrap_or(ctx.near_expiry_days);
        let window = crate::admin::days_ms(days);
        let s = ctx.query(move |l| Ok(l.summary(window))).await?;
        Ok(object(json!({
            "Total": s.total,
            "Consumed": s.consumed,
            "Available": s.available,
            "Unassigned": s.unassigned,
            "Forfeited": s.forfeited,
            "NearExpiry": s.near_expiry,
            "NearExpiryWithinDays": days,
            "Products": s.products,
        })))
    }
}
