//! The list of simulated devices: generated keys sharing a ProductSecret, or
//! DeviceKeys and DeviceSecrets from a RegisterDevices response.

use std::path::Path;
use std::sync::Arc;

use activation_client::credentials::{valid_device_key, valid_product_key};
use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::cli::CommonArgs;

/// One simulated device.
#[derive(Debug, Clone)]
pub struct Device {
    pub product_key: Arc<str>,
    pub device_key: String,
    pub secret: Arc<str>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct DeviceSecret {
    #[serde(rename = "DeviceKey")]
    pub device_key: String,
    #[serde(rename = "DeviceSecret")]
    pub device_secret: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SecretsFile {
    Response {
        #[serde(rename = "DeviceSecrets")]
        device_secrets: Vec<DeviceSecret>,
    },
    Bare(Vec<DeviceSecret>),
}

/// Parses a secrets file: `{"DeviceSecrets":[...]}` (a RegisterDevices
/// response, other keys ignored) or a bare array.
pub fn parse_secrets(json: &str) -> Result<Vec<DeviceSecret>> {
    let parsed: SecretsFile = serde_json::from_str(json).context(
        "expected {\"DeviceSecrets\":[{\"DeviceKey\":..,\"DeviceSecret\":..}]} or a bare array \
         of such objects",
    )?;
    let list = match parsed {
        SecretsFile::Response { device_secrets } => device_secrets,
        SecretsFile::Bare(v) => v,
    };
    for s in &list {
        if !valid_device_key(&s.device_key) {
            bail!(
                "DeviceKey {:?} does not match [A-Za-z0-9_:-]{{1,64}}",
                s.device_key
            );
        }
    }
    Ok(list)
}

pub fn read_secrets(path: &Path) -> Result<Vec<DeviceSecret>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_secrets(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The devices a run uses, after the worker slice.
pub fn device_list(args: &CommonArgs) -> Result<Vec<Device>> {
    if !args.unchecked_keys && !valid_product_key(&args.product_key) {
        bail!(
            "ProductKey {:?} does not match [A-Za-z0-9_-]{{1,32}}",
            args.product_key
        );
    }
    let pk: Arc<str> = Arc::from(args.product_key.as_str());
    let mut devices = match (&args.secrets, &args.product_secret) {
        (Some(path), _) => {
            let secrets = read_secrets(path)?;
            if secrets.is_empty() {
                bail!("{} lists no devices", path.display());
            }
            let n = args
                .devices
                .map(|n| n.min(secrets.len() as u64) as usize)
                .unwrap_or(secrets.len());
            secrets
                .into_iter()
                .take(n)
                .map(|s| Device {
                    product_key: pk.clone(),
                    device_key: s.device_key,
                    secret: Arc::from(s.device_secret.as_str()),
                })
                .collect::<Vec<_>>()
        }
        (None, Some(secret)) => {
            let n = args.devices.unwrap_or(100);
            let secret: Arc<str> = Arc::from(secret.as_str());
            let end = args
                .start
                .checked_add(n)
                .context("--start + --devices overflows")?;
            let mut v = Vec::with_capacity(n as usize);
            for i in args.start..end {
                let dk = format!("{}{}", args.prefix, i);
                if !args.unchecked_keys && !valid_device_key(&dk) {
                    bail!("DeviceKey {dk:?} does not match [A-Za-z0-9_:-]{{1,64}}: check --prefix");
                }
                v.push(Device {
                    product_key: pk.clone(),
                    device_key: dk,
                    secret: secret.clone(),
                });
            }
            v
        }
        (None, None) => bail!("give --product-secret or --secrets FILE"),
    };
    if let Some((offset, count)) = args.worker_slice {
        let len = devices.len() as u64;
        let from = offset.min(len) as usize;
        let to = offset.saturating_add(count).min(len) as usize;
        devices = devices.drain(from..to).collect();
    }
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_register_devices_response() {
        let json = r#"{"RequestId":"r1","Code":"OK","Message":"",
            "DeviceSecrets":[{"DeviceKey":"d1","DeviceSecret":"s1"},
                             {"DeviceKey":"d:2","DeviceSecret":"s2"}]}"#;
        let s = parse_secrets(json).expect("parse");
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].device_key, "d:2");
        assert_eq!(s[1].device_secret, "s2");
    }

    #[test]
    fn parses_bare_array() {
        let s = parse_secrets(r#"[{"DeviceKey":"a","DeviceSecret":"x"}]"#).expect("parse");
        assert_eq!(
            s,
            vec![DeviceSecret {
                device_key: "a".into(),
                device_secret: "x".into()
            }]
        );
    }

    #[test]
    fn rejects_bad_secrets_files() {
        assert!(parse_secrets("{}").is_err());
        assert!(parse_secrets(r#"{"DeviceSecrets":[{"DeviceKey":"a"}]}"#).is_err());
        assert!(parse_secrets(r#"[{"DeviceKey":"a b","DeviceSecret":"x"}]"#).is_err());
        assert!(parse_secrets("not json").is_err());
    }

    fn args(extra: &[&str]) -> CommonArgs {
        use clap::Parser;
        let mut argv = vec!["activation-sim", "flood", "--product-key", "pk"];
        argv.extend_from_slice(extra);
        match crate::cli::Cli::try_parse_from(argv)
            .expect("parse")
            .command
        {
            crate::cli::Command::Flood(f) => f.common,
            _ => panic!("flood"),
        }
    }

    #[test]
    fn generates_keys_and_slices() {
        let a = args(&[
            "--product-secret",
            "s",
            "--devices",
            "5",
            "--start",
            "10",
            "--prefix",
            "d-",
        ]);
        let d = device_list(&a).expect("list");
        let keys: Vec<_> = d.iter().map(|d| d.device_key.as_str()).collect();
        assert_eq!(keys, ["d-10", "d-11", "d-12", "d-13", "d-14"]);
        let mut b = a.clone();
        b.worker_slice = Some((3, 10));
        let keys: Vec<_> = device_list(&b)
            .expect("list")
            .into_iter()
            .map(|d| d.device_key)
            .collect();
        assert_eq!(keys, ["d-13", "d-14"]);
        let bad = args(&["--product-secret", "s", "--prefix", "bad/"]);
        assert!(device_list(&bad).is_err());
    }

    #[test]
    fn takes_devices_from_secrets_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.json");
        std::fs::write(
            &path,
            r#"{"DeviceSecrets":[{"DeviceKey":"a","DeviceSecret":"x"},
                {"DeviceKey":"b","DeviceSecret":"y"},{"DeviceKey":"c","DeviceSecret":"z"}]}"#,
        )
        .expect("write");
        let p = path.display().to_string();
        let a = args(&["--secrets", &p, "--devices", "2"]);
        let d = device_list(&a).expect("list");
        assert_eq!(d.len(), 2);
        assert_eq!((d[1].device_key.as_str(), &*d[1].secret), ("b", "y"));
        let all = device_list(&args(&["--secrets", &p])).expect("list");
        assert_eq!(all.len(), 3);
    }
}
