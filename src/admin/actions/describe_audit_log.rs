//! DescribeAuditLog [list]: operator mutations, newest first; filters
//! Account, ActionName, From/To.

use crate::admin::params::Params;
use crate::admin::render::{self, Data};
use crate::admin::{AdminContext, AdminError, Call};
use crate::ledger::{AuditFilter, PageRequest};

#[derive(Debug)]
pub struct DescribeAuditLog {
    filter: AuditFilter,
    page: PageRequest,
}

impl DescribeAuditLog {
    pub fn parse(p: &mut Params) -> Result<Self, AdminError> {
        Ok(DescribeAuditLog {
            filter: AuditFilter {
                account: p.opt_str("Account")?,
                action: p.opt_str("ActionName")?,
                from: p.opt_time("From")?,
                to: p.opt_time("To")?,
            },
            page: p.page()?,
        })
    }

    pub async fn apply(self, ctx: &AdminContext, _call: &Call) -> Result<Data, AdminError> {
        let page = ctx
            .query(move |l| Ok(l.audit_log(&self.filter, self.page)))
            .await?;
        Ok(render::page(&page, render::audit))
    }
}
