//! CreateProduct [create]: ProductKey, Name (default: the ProductKey),
//! AuthMode (`product-secret` (default) | `device-secret`); returns the
//! ProductSecret.

use serde_json::json;

use crate::admin::params::Params;
use crate::admin::render::{self, Data};
use crate::admin::{AdminContext, AdminError, Call};
use crate::ledger::{AuthMode, Command, Outcome};

#[derive(Debug)]
pub struct CreateProduct {
    product_key: String,
    name: Option<String>,
    auth_mode: AuthMode,
}

impl CreateProduct {
    pub fn parse(p: &mut Params) -> Result<Self, AdminError> {
        let product_key = p.product_key()?;
        let name = super::product_name(p)?;
        let auth_mode = match p.opt_str("AuthMode")? {
            None => AuthMode::ProductSecret,
            Some(m) => AuthMode::parse(&m).ok_or_else(|| {
                AdminError::invalid("AuthMode", "must be product-secret or device-secret")
            })?,
        };
        Ok(CreateProduct {
            product_key,
            name,
            auth_mode,
        })
    }

    pub async fn apply(self, ctx: &AdminContext, call: &Call) -> Result<Data, AdminError> {
        let name = self.name.unwrap_or_else(|| self.product_key.clone());
        let command = Command::CreateProduct {
            product_key: self.product_key,
            name,
            auth_mode: self.auth_mode,
        };
        match ctx.execute(call, command).await? {
            Outcome::ProductCreated(p) => {
                let mut data = render::object(render::product(&p));
                render::merge(&mut data, json!({ "ProductSecret": p.secret }));
                Ok(data)
            }
            other => Err(super::unexpected(&other)),
        }
    }
}
