//! The operator CLI over the admin topics (SPEC §4), like mosquitto_ctrl:
//!
//! ```text
//! activation-broker admin [--host H] [--port P] [--account A] [--password PW] <Action> [--Param value ...]
//! activation-broker admin --http http://127.0.0.1:8080 [--account A] [--password PW] <Action> ...
//! activation-broker admin events [--kind device/activated] [--count N]
//! activation-broker admin hash-password [--password PW]     # else reads stdin
//! activation-broker admin actions                           # lists the actions
//! ```
//!
//! Host, port, account and password also come from `ACTIVATION_ADMIN_HOST`,
//! `ACTIVATION_ADMIN_PORT`, `ACTIVATION_ADMIN_ACCOUNT` and
//! `ACTIVATION_ADMIN_PASSWORD`, and may stand before or after the command
//! (clap global options). `--http URL` (`ACTIVATION_ADMIN_HTTP`) sends
//! actions to the HTTP API (`POST /api/v1`, Basic credentials) instead; the
//! output and exit codes are the same (a refused login is exit code 2). Each action is a subcommand whose options are
//! the parameter names (`activation-broker admin ACTION --help` is the
//! action's help); which of them an action takes is the broker's to check.
//! `--Param value` becomes a parameter: `true`/`false` a boolean, numeric
//! parameters numbers, `[...]`/`{...}` JSON, `--DeviceKeys a,b` an array,
//! and a `--Flag` with no value `true`. The response is printed as pretty
//! JSON; the exit code is 0 when its `Code` is `OK`, 1 for any other code,
//! 2 when the request could not be made (usage, connection, login,
//! timeout).

use std::io::{BufRead, Write};
use std::time::Duration;

use activation_client::admin::{self, EVENTS_FILTER, EVENTS_PREFIX};
use activation_client::http::HttpClient;
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
    about = "Operator CLI over the admin topics (or the HTTP API with --http)",
    after_help = "Examples:\n  activation-broker admin DescribeActivationSummary\n  activation-broker admin CreateOrder --Quantity 100 --ValiditySeconds 31536000 --ProductKey p1\n  activation-broker admin AssignActivationCodes --ProductKey p1 --Quantity 10 --DryRun\n  activation-broker admin events --kind device/activated\n  activation-broker admin hash-password < password.txt",
    subcommand_required = true,
    allow_external_subcommands = true
)]
pub struct AdminCliArgs {
    #[command(flatten)]
    pub connection: Connection,
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// Where and as whom to connect; given before or after the command.
#[derive(clap::Args, Debug, Clone)]
pub struct Connection {
    /// Accounts listener host.
    #[arg(
        long,
        global = true,
        env = "ACTIVATION_ADMIN_HOST",
        default_value = "127.0.0.1"
    )]
    pub host: String,
    /// Accounts listener port.
    #[arg(
        long,
        global = true,
        env = "ACTIVATION_ADMIN_PORT",
        default_value_t = 1884
    )]
    pub port: u16,
    /// Account name.
    #[arg(
        long,
        global = true,
        env = "ACTIVATION_ADMIN_ACCOUNT",
        default_value = "admin"
    )]
    pub account: String,
    /// Account password (`hash-password`: the password to hash).
    #[arg(
        long,
        global = true,
        env = "ACTIVATION_ADMIN_PASSWORD",
        hide_env_values = true
    )]
    pub password: Option<String>,
    /// Seconds to wait for the connection and the response.
    #[arg(long, global = true, default_value_t = 10)]
    pub timeout: u64,
    /// Send actions to the HTTP API at this address (http://host:port)
    /// instead of the accounts listener; the same output.
    #[arg(long, global = true, env = "ACTIVATION_ADMIN_HTTP", value_name = "URL")]
    pub http: Option<String>,
}

/// What `admin` does.
#[derive(Debug, Clone, PartialEq)]
pub enum AdminCommand {
    /// An action (e.g. DescribeProducts) with its `--Param value` pairs.
    Action {
        name: String,
        params: Map<String, Value>,
    },
    /// Streams events (`--kind`, `--count`).
    Events {
        kind: Option<String>,
        count: Option<u64>,
    },
    /// Prints the argon2 hash of `--password` (given on the command line,
    /// never taken from the environment) or of a line read from stdin.
    HashPassword { password: Option<String> },
    /// Lists the actions.
    Actions,
    /// A command that is none of these; `help` when `--help` followed it.
    Unknown { name: String, help: bool },
}

impl AdminCliArgs {
    /// Parses `admin`'s arguments (without the program and `admin`).
    pub fn try_parse_from<I, T>(args: I) -> Result<AdminCliArgs, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(clap::Parser)]
        #[command(name = "admin")]
        struct Admin {
            #[command(flatten)]
            args: AdminCliArgs,
        }
        let argv = std::iter::once(std::ffi::OsString::from("admin"))
            .chain(args.into_iter().map(Into::into));
        <Admin as clap::Parser>::try_parse_from(argv).map(|a| a.args)
    }
}

/// One subcommand per action, taking every parameter name; `--help`
/// prints the action's own help.
fn action_command(name: &'static str) -> clap::Command {
    let help = super::actions::help(name).unwrap_or_default();
    let params = super::actions::parameter_names()
        .into_iter()
        .chain(["RequestId"])
        .map(|p| {
            clap::Arg::new(p)
                .long(p)
                .num_args(0..=1)
                .default_missing_value("true")
                .allow_negative_numbers(true)
                .action(clap::ArgAction::Set)
        });
    clap::Command::new(name)
        .about(help.lines().next().unwrap_or_default().to_owned())
        .override_help(help)
        .args(params)
}

impl clap::Subcommand for AdminCommand {
    fn augment_subcommands(cmd: clap::Command) -> clap::Command {
        let actions = super::ACTIONS.iter().map(|(name, _)| action_command(name));
        cmd.subcommands(actions)
            .subcommand(
                clap::Command::new("events")
                    .about("Stream events, one JSON line each")
                    .arg(
                        clap::Arg::new("kind")
                            .long("kind")
                            .help("Only this kind (e.g. device/activated)"),
                    )
                    .arg(
                        clap::Arg::new("count")
                            .long("count")
                            .value_parser(clap::value_parser!(u64))
                            .help("Stop after this many"),
                    ),
            )
            .subcommand(
                clap::Command::new("hash-password")
                    .about("Print the argon2 hash of --password, or of a line read from stdin"),
            )
            .subcommand(clap::Command::new("actions").about("List the actions"))
    }

    fn augment_subcommands_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_subcommands(cmd)
    }

    fn has_subcommand(name: &str) -> bool {
        ["events", "hash-password", "actions"].contains(&name)
            || super::ACTIONS.iter().any(|(n, _)| *n == name)
    }
}

impl clap::FromArgMatches for AdminCommand {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let Some((name, sub)) = m.subcommand() else {
            return Err(clap::Error::new(clap::error::ErrorKind::MissingSubcommand));
        };
        Ok(match name {
            "events" => AdminCommand::Events {
                kind: sub.get_one::<String>("kind").cloned(),
                count: sub.get_one::<u64>("count").copied(),
            },
            "hash-password" => AdminCommand::HashPassword {
                password: (sub.value_source("password")
                    == Some(clap::parser::ValueSource::CommandLine))
                .then(|| sub.get_one::<String>("password").cloned())
                .flatten(),
            },
            "actions" => AdminCommand::Actions,
            _ if <Self as clap::Subcommand>::has_subcommand(name) => {
                let mut params = Map::new();
                for p in super::actions::parameter_names()
                    .into_iter()
                    .chain(["RequestId"])
                {
                    if let Some(v) = sub.get_one::<String>(p) {
                        params.insert(p.to_owned(), convert(p, v));
                    }
                }
                AdminCommand::Action {
                    name: name.to_owned(),
                    params,
                }
            }
            _ => AdminCommand::Unknown {
                name: name.to_owned(),
                help: sub
                    .try_get_raw("")
                    .ok()
                    .flatten()
                    .into_iter()
                    .flatten()
                    .any(|a| a == "--help" || a == "-h"),
            },
        })
    }

    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

/// Runs the CLI; returns the process exit code. Errors are printed here.
pub async fn run(args: AdminCliArgs) -> anyhow::Result<i32> {
    let result = match args.command.clone() {
        AdminCommand::HashPassword { password } => hash_password_command(password),
        AdminCommand::Actions => print_out(&super::actions::list()).map(|()| 0),
        AdminCommand::Events { kind, count } => events_command(&args, kind, count).await,
        AdminCommand::Action { name, mut params } => {
            params.insert("Action".into(), Value::String(name));
            request_command(&args, params).await
        }
        AdminCommand::Unknown { name, help: true } => {
            print_out(&format!(
                "unknown action {name:?}; `activation-broker admin actions` lists them\n"
            ))
            .map(|()| 0)
        }
        AdminCommand::Unknown { name, help: false } => Err(anyhow!(
            "unknown command {name:?}: give an action (see `activation-broker admin actions`), events or hash-password"
        )),
    };
    match result {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            Ok(EXIT_FAILURE)
        }
    }
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

/// A parameter's value from the command line, typed.
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

/// Prints the argon2 hash of `password`, or of a line read from stdin.
pub fn hash_password_command(password: Option<String>) -> anyhow::Result<i32> {
    let password = match password {
        Some(p) => p,
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

async fn request_command(args: &AdminCliArgs, params: Map<String, Value>) -> anyhow::Result<i32> {
    let response = request(args, params).await?;
    print_out(&format!("{}\n", super::envelope_text(&response, true)))?;
    let ok = response.get("Code").and_then(Value::as_str) == Some("OK");
    Ok(if ok { 0 } else { EXIT_NOT_OK })
}

/// Sends one request (over HTTP with `--http`) and waits for its response.
pub async fn request(args: &AdminCliArgs, params: Map<String, Value>) -> anyhow::Result<Value> {
    let login = login(args)?;
    match &args.connection.http {
        None => admin::request_once(&login, params).await,
        Some(url) => Ok(HttpClient::new(url, login.timeout)?
            .with_basic(&login.account, &login.password)
            .action(params)
            .await?),
    }
}

async fn events_command(
    args: &AdminCliArgs,
    kind: Option<String>,
    count: Option<u64>,
) -> anyhow::Result<i32> {
    if args.connection.http.is_some() {
        bail!("events come over MQTT only: drop --http (and ACTIVATION_ADMIN_HTTP) for `events`");
    }
    let filter = match kind {
        None => EVENTS_FILTER.to_owned(),
        Some(k) => {
            if !EventKind::ALL.iter().any(|e| e.as_str() == k) {
                let kinds: Vec<&str> = EventKind::ALL.iter().map(|e| e.as_str()).collect();
                bail!("--kind {k:?} is not one of {}", kinds.join(", "));
            }
            format!("{EVENTS_PREFIX}{k}")
        }
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
    let args = &args.connection;
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

    fn parse(args: &[&str]) -> Result<AdminCliArgs, clap::Error> {
        AdminCliArgs::try_parse_from(args)
    }

    #[test]
    fn connection_options_go_before_or_after_the_command() {
        let a = parse(&[
            "DescribeProducts",
            "--Name",
            "x",
            "--port",
            "1999",
            "--password=pw",
        ])
        .expect("parses");
        assert_eq!(
            (a.connection.port, a.connection.password.as_deref()),
            (1999, Some("pw"))
        );
        let AdminCommand::Action { name, params } = a.command else {
            panic!("an action");
        };
        assert_eq!(name, "DescribeProducts");
        assert_eq!(Value::Object(params), json!({"Name": "x"}));
        let a = parse(&["--port", "7", "events", "--kind", "k", "--count", "2"]).expect("parses");
        assert_eq!(a.connection.port, 7);
        assert_eq!(
            a.command,
            AdminCommand::Events {
                kind: Some("k".into()),
                count: Some(2)
            }
        );
        assert!(parse(&["DescribeProducts", "--port", "x"]).is_err());
        assert!(parse(&["DescribeProducts", "--timeout"]).is_err());
        assert!(parse(&[]).is_err());
    }

    #[test]
    fn params_are_typed() {
        let a = parse(&[
            "DescribeProducts",
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
        ])
        .expect("parses");
        let AdminCommand::Action { params, .. } = a.command else {
            panic!("an action");
        };
        assert_eq!(
            Value::Object(params),
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
        assert!(parse(&["DescribeProducts", "p1"]).is_err());
        assert!(parse(&["DescribeProducts", "--Quantity", "1", "--Quantity", "2"]).is_err());
        assert!(parse(&["DescribeProducts", "--NoSuchParameter", "1"]).is_err());
    }

    #[test]
    fn hash_password_takes_only_a_password_given_on_the_command_line() {
        let a = parse(&["hash-password", "--password", "pw"]).expect("parses");
        assert_eq!(
            a.command,
            AdminCommand::HashPassword {
                password: Some("pw".into())
            }
        );
        let a = parse(&["--password", "pw", "hash-password"]).expect("parses");
        assert_eq!(
            a.command,
            AdminCommand::HashPassword {
                password: Some("pw".into())
            }
        );
    }

    #[test]
    fn unknown_commands_are_kept_for_a_clear_error() {
        let a = parse(&["describe"]).expect("parses");
        assert_eq!(
            a.command,
            AdminCommand::Unknown {
                name: "describe".into(),
                help: false
            }
        );
        let a = parse(&["Nope", "--help"]).expect("parses");
        assert_eq!(
            a.command,
            AdminCommand::Unknown {
                name: "Nope".into(),
                help: true
            }
        );
    }
}
