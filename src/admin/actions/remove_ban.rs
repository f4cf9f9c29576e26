//! RemoveBan [delete]: Source (an IP address). Lifts the gate's ban of that
//! source and forgets its failed checks; `Ban` is the ban lifted. Not
//! banned: `BanNotFound`. Recorded in the audit log either way.

use std::net::IpAddr;

use crate::admin::params::Params;
use crate::admin::render::Data;
use crate::admin::{AdminContext, AdminError, Call};

#[derive(Debug)]
pub struct RemoveBan {
    source: IpAddr,
}

impl RemoveBan {
    pub fn parse(p: &mut Params) -> Result<Self, AdminError> {
        let source = p.str("Source")?;
        let source = source.trim().parse().map_err(|_| {
            AdminError::invalid("Source", format!("{source:?} is not an IP address"))
        })?;
        Ok(RemoveBan { source })
    }

    pub async fn apply(self, ctx: &AdminContext, call: &Call) -> Result<Data, AdminError> {
        let by = format!("account {}", call.account);
        let result = match ctx.gate()?.remove_ban(self.source, &by) {
            Some(b) => {
                let mut data = Data::new();
                data.insert("Ban".into(), super::describe_bans::ban(&b));
                Ok(data)
            }
            None => Err(AdminError::new(
                "BanNotFound",
                format!("source {} is not banned", self.source),
            )),
        };
        ctx.audited(call, result).await
    }
}
