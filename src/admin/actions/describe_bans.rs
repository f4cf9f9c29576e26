//! DescribeBans [list]: the source addresses the gate refuses now after
//! repeated failed credential checks: Source, Failures, Since, Until (UTC),
//! Reason (the last failure). No parameters.

use serde_json::{json, Value};

use crate::admin::params::Params;
use crate::admin::render::{self, Data};
use crate::admin::{AdminContext, AdminError, Call};
use crate::gate::Ban;

#[derive(Debug)]
pub struct DescribeBans;

impl DescribeBans {
    pub fn parse(_p: &mut Params) -> Result<Self, AdminError> {
        Ok(DescribeBans)
    }

    pub async fn apply(self, ctx: &AdminContext, _call: &Call) -> Result<Data, AdminError> {
        let bans = ctx.gate()?.bans();
        let mut data = Data::new();
        data.insert("TotalCount".into(), json!(bans.len()));
        data.insert("Items".into(), Value::Array(bans.iter().map(ban).collect()));
        Ok(data)
    }
}

/// A ban as the admin API shows it.
pub fn ban(b: &Ban) -> Value {
    json!({
        "Source": b.source.to_string(),
        "Failures": b.failures,
        "Since": render::time(b.since),
        "Until": render::time(b.until),
        "Reason": b.reason,
    })
}
