//! `setup`: creates a product and an order of activation codes assigned to
//! it through the admin topics (SPEC §4), then prints what a flood needs.

use std::collections::HashMap;
use std::time::Duration;

use activation_broker::credentials::valid_product_key;
use anyhow::{anyhow, bail, Context, Result};
use rand::Rng;
use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet, QoS, SubscribeReasonCode};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

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

/// A request/response client on `admin/v1/{account}/...`.
pub struct AdminClient {
    client: AsyncClient,
    account: String,
    responses: mpsc::Receiver<Value>,
    stash: HashMap<String, Value>,
    timeout: Duration,
    driver: tokio::task::JoinHandle<()>,
}

impl AdminClient {
    /// Connects with the account's credentials and subscribes to its
    /// response topic.
    pub async fn connect(
        host: &str,
        port: u16,
        account: &str,
        password: &str,
        timeout: Duration,
    ) -> Result<Self> {
        let id = format!(
            "activation-sim-setup-{:08x}",
            rand::thread_rng().gen::<u32>()
        );
        let mut opts = MqttOptions::new(id, host, port);
        opts.set_credentials(account, password);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
        let (client, mut eventloop) = AsyncClient::new(opts, 16);
        let response_topic = format!("admin/v1/{account}/response");

        let connack = tokio::time::timeout(timeout, eventloop.poll())
            .await
            .map_err(|_| anyhow!("no CONNACK from {host}:{port} within {timeout:?}"))?;
        match connack {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {}
            Ok(other) => bail!("expected CONNACK from {host}:{port}, got {other:?}"),
            Err(ConnectionError::ConnectionRefused(code)) => bail!(
                "the accounts listener {host}:{port} refused account {account:?}: {code:?} \
                 (check --account/--password or ACTIVATION_ADMIN_ACCOUNT/ACTIVATION_ADMIN_PASSWORD)"
            ),
            Err(e) => bail!("connecting to the accounts listener {host}:{port}: {e}"),
        }

        let (tx, responses) = mpsc::channel(64);
        let (suback_tx, suback_rx) = oneshot::channel();
        let topic = response_topic.clone();
        let driver = tokio::spawn(async move {
            let mut suback_tx = Some(suback_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        if let Some(s) = suback_tx.take() {
                            let _ = s.send(ack.return_codes);
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == topic => {
                        match serde_json::from_slice::<Value>(&p.payload) {
                            Ok(v) => {
                                if tx.send(v).await.is_err() {
                                    return;
                                }
                            }
                            Err(e) => eprintln!("ignoring a response that is not JSON: {e}"),
                        }
                    }
                    // Our own DISCONNECT (`close`): the end, not an error.
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("admin connection lost: {e}");
                        return;
                    }
                }
            }
        });
        client
            .subscribe(response_topic.clone(), QoS::AtLeastOnce)
            .await
            .context("subscribing to the response topic")?;
        let codes = tokio::time::timeout(timeout, suback_rx)
            .await
            .map_err(|_| anyhow!("no SUBACK for {response_topic} within {timeout:?}"))?
            .map_err(|_| anyhow!("admin connection closed before SUBACK"))?;
        if codes
            .iter()
            .any(|c| matches!(c, SubscribeReasonCode::Failure))
        {
            bail!("the broker refused the subscription to {response_topic}");
        }
        Ok(AdminClient {
            client,
            account: account.to_owned(),
            responses,
            stash: HashMap::new(),
            timeout,
            driver,
        })
    }

    /// Sends `request` (a JSON object with "Action") and returns the response
    /// with the same RequestId; an error unless its Code is "OK".
    pub async fn call(&mut self, mut request: Value) -> Result<Value> {
        let action = request
            .get("Action")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned();
        let request_id = format!("sim-{:016x}", rand::thread_rng().gen::<u64>());
        if let Some(obj) = request.as_object_mut() {
            obj.insert("RequestId".into(), Value::String(request_id.clone()));
        }
        let topic = format!("admin/v1/{}/request", self.account);
        self.client
            .publish(topic, QoS::AtLeastOnce, false, request.to_string())
            .await
            .with_context(|| format!("sending {action}"))?;
        let response = if let Some(v) = self.stash.remove(&request_id) {
            v
        } else {
            let deadline = tokio::time::Instant::now() + self.timeout;
            loop {
                let v = tokio::time::timeout_at(deadline, self.responses.recv())
                    .await
                    .map_err(|_| anyhow!("no response to {action} within {:?}", self.timeout))?
                    .ok_or_else(|| anyhow!("admin connection closed while waiting for {action}"))?;
                match v.get("RequestId").and_then(Value::as_str) {
                    Some(id) if id == request_id => break v,
                    Some(id) => {
                        self.stash.insert(id.to_owned(), v);
                    }
                    None => {}
                }
            }
        };
        match response.get("Code").and_then(Value::as_str) {
            Some("OK") => Ok(response),
            code => bail!(
                "{action} failed: {} {}",
                code.unwrap_or("(no Code)"),
                response
                    .get("Message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
            ),
        }
    }

    pub async fn close(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.driver).await;
    }
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
    let mut admin = AdminClient::connect(
        &args.host,
        args.port,
        &args.account,
        &args.password,
        timeout,
    )
    .await?;
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
