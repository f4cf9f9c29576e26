//! `setup`: creates a product and an order of activation codes assigned to
//! it through the admin topics (SPEC §4), then prints what a flood needs.

use std::time::Duration;

use activation_client::admin::{AdminClient, Login};
use activation_client::credentials::valid_product_key;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use super::secs;
use crate::cli::SetupArgs;
use crate::devices::DeviceSecret;

/// What setup created.
#[derive(Debug, Clone)]
pub struct SetupResult {
    pub product_key: String,
    pub auth_mode: String,
    /// `product-secret` mode.
    pub product_secret: Option<String>,
    /// `device-secret` mode: the registered devices' secrets.
    pub device_secrets: Vec<DeviceSecret>,
    pub order: Value,
    /// A ready `activation-sim flood` command line.
    pub flood_command: String,
}

/// Writes `bytes` to `path`, readable by its owner only (0600), also when
/// the file already existed with wider permissions.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// The flood command line for what setup created.
pub fn flood_command(args: &SetupArgs, secret: Option<&str>) -> String {
    let mut cmd = format!(
        "activation-sim flood --host {} --port {} --product-key {}",
        args.device_host, args.device_port, args.product_key
    );
    match secret {
        Some(s) => cmd.push_str(&format!(" --product-secret {s}")),
        None => cmd.push_str(&format!(" --secrets {}", args.secrets_out.display())),
    }
    cmd.push_str(&format!(" --devices {}", args.devices));
    if args.start != 1 {
        cmd.push_str(&format!(" --start {}", args.start));
    }
    if args.prefix != "sim-" {
        cmd.push_str(&format!(" --prefix {}", args.prefix));
    }
    cmd
}

pub async fn run(args: &SetupArgs) -> Result<SetupResult> {
    if !valid_product_key(&args.product_key) {
        bail!(
            "ProductKey {:?} does not match [A-Za-z0-9_-]{{1,32}}",
            args.product_key
        );
    }
    let timeout = secs(args.timeout).max(Duration::from_millis(100));
    let mut admin = AdminClient::connect(&Login {
        host: args.host.clone(),
        port: args.port,
        account: args.account.clone(),
        password: args.password.clone(),
        timeout,
    })
    .await
    .with_context(|| format!("the accounts listener {}:{}", args.host, args.port))?;
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| args.product_key.clone());
    let created = admin
        .call(json!({
            "Action": "CreateProduct",
            "ProductKey": args.product_key,
            "Name": name,
            "AuthMode": args.auth_mode,
        }))
        .await?;
    let product_secret = created
        .get("ProductSecret")
        .and_then(Value::as_str)
        .map(str::to_owned);
    if args.auth_mode == "product-secret" && product_secret.is_none() {
        bail!("CreateProduct answered OK without a ProductSecret: {created}");
    }

    let mut device_secrets = Vec::new();
    if args.auth_mode == "device-secret" {
        let end = args
            .start
            .checked_add(args.devices)
            .context("--start + --devices overflows")?;
        let keys: Vec<String> = (args.start..end)
            .map(|i| format!("{}{}", args.prefix, i))
            .collect();
        for chunk in keys.chunks(100) {
            let resp = admin
                .call(json!({
                    "Action": "RegisterDevices",
                    "ProductKey": args.product_key,
                    "DeviceKeys": chunk,
                }))
                .await?;
            let list = resp
                .get("DeviceSecrets")
                .cloned()
                .ok_or_else(|| anyhow!("RegisterDevices answered without DeviceSecrets"))?;
            let secrets: Vec<DeviceSecret> = serde_json::from_value(list).context(
                "RegisterDevices: DeviceSecrets is not a list of DeviceKey/DeviceSecret",
            )?;
            device_secrets.extend(secrets);
        }
        let file = json!({
            "DeviceSecrets": device_secrets
                .iter()
                .map(|d| json!({"DeviceKey": d.device_key, "DeviceSecret": d.device_secret}))
                .collect::<Vec<_>>()
        });
        write_private(&args.secrets_out, format!("{file:#}\n").as_bytes())
            .with_context(|| format!("writing {}", args.secrets_out.display()))?;
    }

    let quantity = args.codes.unwrap_or(args.devices);
    let order = admin
        .call(json!({
            "Action": "CreateOrder",
            "Quantity": quantity,
            "ValiditySeconds": args.validity,
            "ProductKey": args.product_key,
        }))
        .await?;
    admin.close().await;

    // A device-secret product has a ProductSecret too, but its devices
    // sign with their own secrets: the flood must use the secrets file.
    let flood_secret = match args.auth_mode.as_str() {
        "product-secret" => product_secret.as_deref(),
        _ => None,
    };
    let flood_command = flood_command(args, flood_secret);
    Ok(SetupResult {
        product_key: args.product_key.clone(),
        auth_mode: args.auth_mode.clone(),
        product_secret,
        device_secrets,
        order,
        flood_command,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn prints_a_flood_command() {
        let cli = crate::cli::Cli::try_parse_from([
            "activation-sim",
            "setup",
            "--password",
            "pw",
            "--product-key",
            "pk1",
            "--devices",
            "50",
            "--prefix",
            "d-",
        ])
        .expect("parse");
        let crate::cli::Command::Setup(args) = cli.command else {
            panic!("setup");
        };
        let cmd = flood_command(&args, Some("abc"));
        assert_eq!(
            cmd,
            "activation-sim flood --host 127.0.0.1 --port 1883 --product-key pk1 \
             --product-secret abc --devices 50 --prefix d-"
        );
        // The printed command parses.
        let argv: Vec<&str> = cmd.split(' ').collect();
        crate::cli::Cli::try_parse_from(argv).expect("flood command parses");
    }
}
