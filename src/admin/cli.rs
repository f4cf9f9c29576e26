//! The operator CLI over the admin topics (SPEC §4), like mosquitto_ctrl:
//!
//! ```text
//! activation-broker admin [--host H] [--port P] [--account A] [--password PW] <Action> [--Param value ...]
//! activation-broker admin events [--kind device/activated] [--count N]
//! activation-broker admin hash-password [--password PW]     # else reads stdin
//! activation-broker admin actions                           # lists the actions
//! ```
//!
//! Host, port, account and password also come from `ACTIVATION_ADMIN_HOST`,
//! `ACTIVATION_ADMIN_PORT`, `ACTIVATION_ADMIN_ACCOUNT` and
//! `ACTIVATION_ADMIN_PASSWORD`. `--Param value` pairs become the request's
//! parameters: `true`/`false` become booleans, numeric parameters numbers,
//! `[...]`/`{...}` JSON, `--DeviceKeys a,b` an array, and a `--Flag` with
//! no value `true`. The response is printed as pretty JSON; the exit code
//! is 0 when its `Code` is `OK`, 1 for any other code, 2 when the request
//! could not be made (usage, connection, login, timeout).

use std::io::{BufRead, Write};
use std::time::Duration;

use activation_client::admin::{self, EVENTS_FILTER, EVENTS_PREFIX};
use anyhow::{anyhow, bail, Context};
use rumqttc::v5::mqttbytes::v5::Packet;
use serde_json::{Map, Value};

use super::accounts::hash_password;
use crate::events::EventKind;

/// Exit code when the response's Code is not OK.
pub const EXIT_NOT_OK: i32 = 1;
/// Exit code when no response could be had.
pub const EXIT_FAILURE: i32 = 2;

/// Parameters whose values are numbers.
const NUMERIC_PARAMS: &[&str] = &[
    "Quantity",
    "ValiditySeconds",
    "PageNumber",
    "PageSize",
    "WithinDays",
];
/// Parameters that are lists of keys.
const LIST_PARAMS: &[&str] = &["DeviceKeys"];

#[derive(clap::Args, Debug, Clone)]
#[command(
    about = "Operator CLI over the admin topics",
    after_help = "Examples:\n  activation-broker admin DescribeActivationSummary\n  activation-broker admin CreateOrder --Quantity 100 --ValiditySeconds 31536000 --ProductKey p1\n  activation-broker admin AssignActivationCodes --ProductKey p1 --Quantity 10 --DryRun\n  activation-broker admin events --kind device/activated\n  activation-broker admin hash-password < password.txt"
)]
pub struct AdminCliArgs {
    /// Accounts listener host.
    #[arg(long, env = "ACTIVATION_ADMIN_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Accounts listener port.
    #[arg(long, env = "ACTIVATION_ADMIN_PORT", default_value_t = 1884)]
    pub port: u16,
    /// Account name.
    #[arg(long, env = "ACTIVATION_ADMIN_ACCOUNT", default_value = "admin")]
    pub account: String,
    /// Account password.
    #[arg(long, env = "ACTIVATION_ADMIN_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Seconds to wait for the connection and the response.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
    /// An action (e.g. DescribeProducts), `events`, `hash-password` or `actions`.
    pub action: String,
    /// `--Param value` pairs for the action.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    pub params: Vec<String>,
}

/// Runs the CLI; returns the process exit code. Errors are printed here.
pub async fn run(mut args: AdminCliArgs) -> anyhow::Result<i32> {
    if args.action != "hash-password" {
        if let Err(e) = take_trailing_options(&mut args) {
            eprintln!("error: {e:#}");
            return Ok(EXIT_FAILURE);
        }
    }
    let result = match args.action.as_str() {
        "hash-password" => {
            // `admin hash-password --password PW`: clap takes `--password`
            // as the connection option. Use it when it was given on the
            // command line, never the account password from the environment.
            let mut params = args.params.clone();
            let on_command_line =
                std::env::args().any(|a| a == "--password" || a.starts_with("--password="));
            if let (Some(p), true) = (&args.password, on_command_line) {
                if !params.iter().any(|a| a.starts_with("--password")) {
                    params = vec!["--password".to_owned(), p.clone()];
                }
            }
            hash_password_command(&params)
        }
        "actions" => print_out(&super::actions::list()).map(|()| 0),
        "events" => events_command(&args).await,
        _ => request_command(&args).await,
    };
    match result {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            Ok(EXIT_FAILURE)
        }
    }
}

/// `activation-broker admin [OPTIONS] <Action> … --help` (clap would show
/// the general help): the action's help, from the raw command line `argv`
/// (program name first). `None` when this is not such a command line.
pub fn action_help(argv: &[String]) -> Option<String> {
    let mut it = argv.iter().skip(1);
    it.by_ref().find(|a| *a == "admin")?;
    let mut action = None;
    let mut rest = Vec::new();
    while let Some(a) = it.next() {
        if action.is_some() {
            rest.push(a);
        } else if ["--host", "--port", "--account", "--password", "--timeout"].contains(&a.as_str())
        {
            it.next();
        } else if !a.starts_with('-') {
            action = Some(a);
        }
    }
    let action = action?;
    if !rest.iter().any(|a| *a == "--help" || *a == "-h") {
        return None;
    }
    Some(super::actions::help(action).unwrap_or_else(|| {
        format!("unknown action {action:?}; `activation-broker admin actions` lists them\n")
    }))
}

/// Connection options given after the action (`--host`, `--port`,
/// `--account`, `--password`, `--timeout`) are options, not parameters:
/// parameters are PascalCase.
fn take_trailing_options(args: &mut AdminCliArgs) -> anyhow::Result<()> {
    let mut rest = Vec::new();
    let mut it = std::mem::take(&mut args.params).into_iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.strip_prefix("--") {
            Some(n) => match n.split_once('=') {
                Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
                None => (n.to_owned(), None),
            },
            None => {
                rest.push(arg);
                continue;
            }
        };
        if !["host", "port", "account", "password", "timeout"].contains(&name.as_str()) {
            rest.push(arg);
            continue;
        }
        let value = match inline {
            Some(v) => v,
            None => it.next().ok_or_else(|| anyhow!("--{name} needs a value"))?,
        };
        match name.as_str() {
            "host" => args.host = value,
            "port" => {
                args.port = value
                    .parse()
                    .map_err(|_| anyhow!("--port {value:?} is not a port"))?
            }
            "account" => args.account = value,
            "password" => args.password = Some(value),
            _ => {
                args.timeout = value
                    .parse()
                    .map_err(|_| anyhow!("--timeout {value:?} is not a number of seconds"))?
            }
        }
    }
    args.params = rest;
    Ok(())
}

/// Writes to stdout; a closed pipe (`| head`) is not an error worth a panic.
fn print_out(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(anyhow!("writing to stdout: {e}")),
    }
}

/// `--Param value` pairs → the request's parameters.
pub fn parse_params(args: &[String]) -> anyhow::Result<Map<String, Value>> {
    let mut params = Map::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        let Some(name) = arg.strip_prefix("--") else {
            bail!("expected --Param, found {arg:?}");
        };
        let (name, value) = match name.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => {
                let next = args.get(i + 1).filter(|v| !looks_like_flag(v));
                if next.is_some() {
                    i += 1;
                }
                (name.to_owned(), next.cloned())
            }
        };
        if name.is_empty() {
            bail!("empty parameter name in {arg:?}");
        }
        let value = match value {
            None => Value::Bool(true),
            Some(v) => convert(&name, &v),
        };
        if params.insert(name.clone(), value).is_some() {
            bail!("--{name} is given twice");
        }
        i += 1;
    }
    Ok(params)
}

/// `--Name` (not a negative number).
fn looks_like_flag(s: &str) -> bool {
    s.starts_with("--") && s.len() > 2 && !s[2..].starts_with(|c: char| c.is_ascii_digit())
}

fn convert(name: &str, v: &str) -> Value {
    if v == "true" || v == "false" {
        return Value::Bool(v == "true");
    }
    if NUMERIC_PARAMS.contains(&name) {
        if let Ok(n) = v.parse::<i64>() {
            return Value::from(n);
        }
        if let Ok(n) = v.parse::<u64>() {
            return Value::from(n);
        }
    }
    if v.starts_with('[') || v.starts_with('{') {
        if let Ok(j) = serde_json::from_str::<Value>(v) {
            return j;
        }
    }
    if LIST_PARAMS.contains(&name) {
        return Value::Array(
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_owned()))
                .collect(),
        );
    }
    Value::String(v.to_owned())
}

/// Prints the argon2 hash of `--password` or of a line read from stdin.
pub fn hash_password_command(params: &[String]) -> anyhow::Result<i32> {
    let params = parse_params(params)?;
    let password = match params.get("password") {
        Some(Value::String(p)) => p.clone(),
        Some(_) => bail!("--password needs a value"),
        None => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("reading the password from stdin")?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    if password.is_empty() {
        bail!("empty password");
    }
    print_out(&format!("{}\n", hash_password(&password)))?;
    Ok(0)
}

async fn request_command(args: &AdminCliArgs) -> anyhow::Result<i32> {
    if !args.action.starts_with(|c: char| c.is_ascii_uppercase()) {
        bail!(
            "unknown command {:?}: give an action (see `activation-broker admin actions`), events or hash-password",
            args.action
        );
    }
    let mut params = parse_params(&args.params)?;
    params.insert("Action".into(), Value::String(args.action.clone()));
    let response = request(args, params).await?;
    print_out(&format!("{}\n", super::envelope_text(&response, true)))?;
    let ok = response.get("Code").and_then(Value::as_str) == Some("OK");
    Ok(if ok { 0 } else { EXIT_NOT_OK })
}

/// Sends one request and waits for its response.
pub async fn request(args: &AdminCliArgs, params: Map<String, Value>) -> anyhow::Result<Value> {
    admin::request_once(&login(args)?, params).await
}

async fn events_command(args: &AdminCliArgs) -> anyhow::Result<i32> {
    let params = parse_params(&args.params)?;
    let filter = match params.get("kind") {
        None => EVENTS_FILTER.to_owned(),
        Some(Value::String(k)) => {
            if !EventKind::ALL.iter().any(|e| e.as_str() == k) {
                let kinds: Vec<&str> = EventKind::ALL.iter().map(|e| e.as_str()).collect();
                bail!("--kind {k:?} is not one of {}", kinds.join(", "));
            }
            format!("{EVENTS_PREFIX}{k}")
        }
        Some(_) => bail!("--kind needs an event kind"),
    };
    let count = match params.get("count") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                .ok_or_else(|| anyhow!("--count needs a number"))?,
        ),
    };
    let login = login(args)?;
    let (client, mut el) = login.session("cli");
    login
        .connect_and_subscribe(&client, &mut el, &filter)
        .await?;
    let stdout = std::io::stdout();
    let mut seen = 0u64;
    while count.is_none_or(|c| seen < c) {
        if let Packet::Publish(p) = login.next_packet(&mut el).await? {
            let line = match serde_json::from_slice::<Value>(&p.payload) {
                Ok(v) => v.to_string(),
                Err(_) => String::from_utf8_lossy(&p.payload).into_owned(),
            };
            let mut out = stdout.lock();
            match writeln!(out, "{line}").and_then(|()| out.flush()) {
                Ok(()) => {}
                // The reader is gone (`| head -n 5`): stop quietly.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break,
                Err(e) => return Err(anyhow!("writing to stdout: {e}")),
            }
            seen += 1;
        }
    }
    let _ = client.try_disconnect();
    Ok(0)
}

/// The account's login from the connection options.
fn login(args: &AdminCliArgs) -> anyhow::Result<admin::Login> {
    let password = args
        .password
        .clone()
        .ok_or_else(|| anyhow!("no password: give --password or set ACTIVATION_ADMIN_PASSWORD"))?;
    Ok(admin::Login {
        host: args.host.clone(),
        port: args.port,
        account: args.account.clone(),
        password,
        timeout: Duration::from_secs(args.timeout.max(1)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn connection_options_after_the_action_are_options() {
        let mut args = AdminCliArgs {
            host: "127.0.0.1".into(),
            port: 1884,
            account: "admin".into(),
            password: None,
            timeout: 10,
            action: "DescribeProducts".into(),
            params: strings(&[
                "--Name",
                "x",
                "--port",
                "1999",
                "--password=pw",
                "--kind",
                "k",
            ]),
        };
        take_trailing_options(&mut args).expect("options");
        assert_eq!((args.port, args.password.as_deref()), (1999, Some("pw")));
        assert_eq!(args.params, strings(&["--Name", "x", "--kind", "k"]));
        args.params = strings(&["--port", "x"]);
        assert!(take_trailing_options(&mut args).is_err());
        args.params = strings(&["--timeout"]);
        assert!(take_trailing_options(&mut args).is_err());
    }

    #[test]
    fn params_are_typed() {
        let p = parse_params(&strings(&[
            "--ProductKey",
            "p1",
            "--Quantity",
            "10",
            "--DryRun",
            "--DeviceKeys",
            "a,b",
            "--OrderId",
            "123",
            "--Enabled=false",
            "--PageSize",
            "-5",
        ]))
        .expect("parses");
        assert_eq!(
            Value::Object(p),
            json!({
                "ProductKey": "p1",
                "Quantity": 10,
                "DryRun": true,
                "DeviceKeys": ["a", "b"],
                "OrderId": "123",
                "Enabled": false,
                "PageSize": -5,
            })
        );
        assert!(parse_params(&strings(&["p1"])).is_err());
        assert!(parse_params(&strings(&["--A", "1", "--A", "2"])).is_err());
    }
}
