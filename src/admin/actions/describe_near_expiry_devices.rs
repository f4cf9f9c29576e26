//! DescribeNearExpiryDevices [list]: live devices whose current code
//! expires within WithinDays (default: the configured window, 30 days),
//! soonest first, with the DescribeActivationCodes filters.

use crate::admin::params::Params;
use crate::admin::render::{self, Data};
use crate::admin::{days_ms, AdminContext, AdminError, Call};
use crate::ledger::{CodeFilter, PageRequest};

/// Largest WithinDays (100 years).
pub const MAX_DAYS: u64 = 36_600;

#[derive(Debug)]
pub struct DescribeNearExpiryDevices {
    within_days: Option<u64>,
    filter: CodeFilter,
    page: PageRequest,
}

impl DescribeNearExpiryDevices {
    pub fn parse(p: &mut Params) -> Result<Self, AdminError> {
        Ok(DescribeNearExpiryDevices {
            within_days: p.opt_u64("WithinDays", 1, MAX_DAYS)?,
            filter: super::code_filter(p)?,
            page: p.page()?,
        })
    }

    pub async fn apply(self, ctx: &AdminContext, _call: &Call) -> Result<Data, AdminError> {
        let days = self.within_days.unwrap_or(ctx.near_expiry_days);
        let window = days_ms(days);
        let page = ctx
            .query(move |l| Ok(l.near_expiry(window, &self.filter, self.page)))
            .await?;
        let mut data = render::page(&page, render::code);
        data.insert("WithinDays".into(), days.into());
        Ok(data)
    }
}
