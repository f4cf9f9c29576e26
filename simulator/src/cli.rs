//! Command line of `activation-sim` (SPEC §5).

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::report::Expectation;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "activation-sim",
    version,
    about = "Load simulator for the activation broker: simulated devices connect with \
             signed credentials and are counted by CONNACK outcome"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// A command; worker processes get theirs as JSON ([`WORKER_SPEC_ENV`]).
#[derive(Debug, Clone, Subcommand, Serialize, Deserialize)]
pub enum Command {
    /// New devices connect (at --rate) and hold their connection for --hold seconds.
    Flood(FloodArgs),
    /// Connect all devices (at --rate), drop them all abruptly, and have all reconnect at
    /// once (bounded only by --concurrency). The summary is the reconnect phase.
    Storm(StormArgs),
    /// Random devices connect at --rate and disconnect at random for --duration seconds.
    Churn(ChurnArgs),
    /// Connected devices publish telemetry to devices/{ProductKey}/{DeviceKey}/telemetry.
    Publish(PublishArgs),
    /// Create a product and an order of codes assigned to it over the admin topics.
    Setup(SetupArgs),
}

/// Which MQTT client drives a device connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum Engine {
    /// rumqttc's event loop, or the bound-socket client when --source-ip is given.
    Auto,
    /// rumqttc's AsyncClient/EventLoop (cannot bind a source address).
    Rumqttc,
    /// The simulator's own client on a bound tokio socket, speaking MQTT with
    /// rumqttc's packet codec.
    Socket,
}

/// What devices send as Client Identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum ClientIdMode {
    Full,
    Empty,
}

/// Options shared by every load scenario.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct CommonArgs {
    /// Broker host (device listener).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Broker port (device listener).
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// MQTT protocol version: 4 (3.1.1) or 5.
    #[arg(long, default_value_t = 5, value_parser = parse_protocol)]
    pub protocol: u8,
    /// ProductKey of the simulated devices.
    #[arg(long, env = "ACTIVATION_PRODUCT_KEY")]
    pub product_key: String,
    /// ProductSecret (product-secret auth mode).
    #[arg(
        long,
        env = "ACTIVATION_PRODUCT_SECRET",
        required_unless_present = "secrets",
        conflicts_with = "secrets",
        hide_env_values = true
    )]
    pub product_secret: Option<String>,
    /// Device secrets for a device-secret product: the JSON returned by
    /// RegisterDevices ({"DeviceSecrets":[{"DeviceKey","DeviceSecret"}]}) or a
    /// bare array of such objects. Devices are taken from the file in order.
    #[arg(long, value_name = "FILE")]
    pub secrets: Option<PathBuf>,
    /// Number of devices (with --secrets: at most this many from the file;
    /// default all of it).
    #[arg(long)]
    pub devices: Option<u64>,
    /// First device number: DeviceKey = prefix + number.
    #[arg(long, default_value_t = 1)]
    pub start: u64,
    /// DeviceKey prefix.
    #[arg(long, default_value = "sim-")]
    pub prefix: String,
    /// Connect attempts per second over all devices (token bucket shared by
    /// all tasks); 0 = unlimited.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Most connect attempts in flight at once (TCP connect to CONNACK).
    #[arg(long, default_value_t = 1000)]
    pub concurrency: usize,
    /// Seconds over which the connect rate rises linearly from 0 to --rate.
    #[arg(long, default_value_t = 0.0)]
    pub ramp_up: f64,
    /// MQTT keep alive in seconds (0 = off).
    #[arg(long, default_value_t = 60)]
    pub keepalive: u16,
    /// Local address to connect from (repeatable; clients take them round-robin),
    /// e.g. 127.0.0.2 to pass the 64k ephemeral-port limit per address.
    #[arg(long = "source-ip", value_name = "IP")]
    pub source_ip: Vec<IpAddr>,
    /// Seconds to wait for a CONNACK (TCP connect included).
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
    /// Write the summary as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write each DeviceKey that got CONNACK 0 to this file, one per line,
    /// as it arrives (unbuffered; the file is emptied when the run starts).
    #[arg(long, value_name = "FILE")]
    pub accepted_file: Option<PathBuf>,
    /// Spread the devices over N child processes and merge their reports.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Assertion on the summary; exit code 2 if any fails. Counters: attempted,
    /// accepted, refused, refused:0xNN, errors, timeouts, server_disconnects,
    /// messages_acked; operators =, >=, <=. E.g. --expect accepted=100
    /// --expect refused:0x97=5.
    #[arg(long, value_name = "COUNTER=N")]
    #[serde(skip)]
    pub expect: Vec<Expectation>,
    /// Client Identifier to send: `full` = {ProductKey}.{DeviceKey}, `empty` =
    /// none (clean session; the broker assigns the id, SPEC §3).
    #[arg(long, value_enum, default_value_t = ClientIdMode::Full)]
    pub client_id: ClientIdMode,
    /// MQTT client implementation (only `socket` sees MQTT 5 Reason Strings of
    /// refusals).
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    pub engine: Engine,
    /// Seconds added to the credential timestamp (negative: in the past), to
    /// exercise the broker's freshness window.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub clock_skew: f64,
    /// Do not check ProductKey/DeviceKey syntax locally, to exercise the
    /// broker's refusal of malformed identifiers.
    #[arg(long)]
    pub unchecked_keys: bool,
    /// No live progress on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// Workers: take devices [OFFSET, OFFSET+COUNT) of the list.
    #[arg(skip)]
    pub worker_slice: Option<(u64, u64)>,
    /// Workers: progress as JSON lines on stdout, raw histogram in --json.
    #[arg(skip)]
    pub worker_mode: bool,
}

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct FloodArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Seconds each accepted device stays connected before a clean
    /// DISCONNECT (0 = right after CONNACK).
    #[arg(long, default_value_t = 10.0)]
    pub hold: f64,
}

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct StormArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Seconds between the last initial CONNACK and the drop.
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,
    /// Seconds reconnected devices stay before a clean DISCONNECT.
    #[arg(long, default_value_t = 0.0)]
    pub hold: f64,
    /// Also print the initial connect phase's summary (always in --json).
    #[arg(long)]
    pub show_initial: bool,
}

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct ChurnArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Seconds to run.
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// Mean seconds a device stays online (uniform in 0..2x). To sustain
    /// --rate, have at least rate x (online + offline) devices.
    #[arg(long, default_value_t = 5.0)]
    pub online: f64,
    /// Mean seconds a device rests offline before it may be picked again
    /// (uniform in 0..2x).
    #[arg(long, default_value_t = 1.0)]
    pub offline: f64,
    /// Fraction of disconnects that drop the connection without DISCONNECT.
    #[arg(long, default_value_t = 0.5)]
    pub abrupt: f64,
}

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct PublishArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Messages per device.
    #[arg(long, default_value_t = 10)]
    pub messages: u64,
    /// Milliseconds between two messages of a device.
    #[arg(long, default_value_t = 1000)]
    pub interval: u64,
    /// QoS of the telemetry (0 or 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    /// Payload size in bytes (a JSON object padded to this size).
    #[arg(long, default_value_t = 64)]
    pub payload_size: usize,
    /// Seconds to wait for outstanding PUBACKs after the last message.
    #[arg(long, default_value_t = 10.0)]
    pub ack_timeout: f64,
    /// Topic to publish to; {ProductKey} and {DeviceKey} are replaced.
    #[arg(long, default_value = "devices/{ProductKey}/{DeviceKey}/telemetry")]
    pub topic: String,
}

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct SetupArgs {
    /// Accounts (admin) listener host.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Accounts (admin) listener port.
    #[arg(long, default_value_t = 1884)]
    pub port: u16,
    /// Account name.
    #[arg(long, env = "ACTIVATION_ADMIN_ACCOUNT", default_value = "admin")]
    pub account: String,
    /// Account password.
    #[arg(long, env = "ACTIVATION_ADMIN_PASSWORD", hide_env_values = true)]
    pub password: String,
    /// ProductKey to create.
    #[arg(long, default_value = "simprod")]
    pub product_key: String,
    /// Product name (default: the ProductKey).
    #[arg(long)]
    pub name: Option<String>,
    /// Auth mode of the product.
    #[arg(long, value_parser = ["product-secret", "device-secret"], default_value = "product-secret")]
    pub auth_mode: String,
    /// Activation codes to buy for the product (default: --devices).
    #[arg(long)]
    pub codes: Option<u64>,
    /// Validity of each code in seconds once consumed.
    #[arg(long, default_value_t = 31_536_000)]
    pub validity: u64,
    /// Devices the printed flood command will use (device-secret: registered).
    #[arg(long, default_value_t = 1000)]
    pub devices: u64,
    /// First device number of the printed command / registered devices.
    #[arg(long, default_value_t = 1)]
    pub start: u64,
    /// DeviceKey prefix of the printed command / registered devices.
    #[arg(long, default_value = "sim-")]
    pub prefix: String,
    /// device-secret: where to write the RegisterDevices secrets.
    #[arg(long, default_value = "device-secrets.json")]
    pub secrets_out: PathBuf,
    /// Device listener host for the printed command.
    #[arg(long, default_value = "127.0.0.1")]
    pub device_host: String,
    /// Device listener port for the printed command.
    #[arg(long, default_value_t = 1883)]
    pub device_port: u16,
    /// Seconds to wait for each admin response.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
}

fn parse_protocol(s: &str) -> Result<u8, String> {
    match s {
        "4" | "3.1.1" => Ok(4),
        "5" | "5.0" => Ok(5),
        _ => Err(format!("protocol must be 4 or 5, not {s:?}")),
    }
}

impl Command {
    /// The load-scenario options, `None` for `setup`.
    pub fn common(&self) -> Option<&CommonArgs> {
        match self {
            Command::Flood(a) => Some(&a.common),
            Command::Storm(a) => Some(&a.common),
            Command::Churn(a) => Some(&a.common),
            Command::Publish(a) => Some(&a.common),
            Command::Setup(_) => None,
        }
    }

    pub fn common_mut(&mut self) -> Option<&mut CommonArgs> {
        match self {
            Command::Flood(a) => Some(&mut a.common),
            Command::Storm(a) => Some(&mut a.common),
            Command::Churn(a) => Some(&mut a.common),
            Command::Publish(a) => Some(&mut a.common),
            Command::Setup(_) => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Command::Flood(_) => "flood",
            Command::Storm(_) => "storm",
            Command::Churn(_) => "churn",
            Command::Publish(_) => "publish",
            Command::Setup(_) => "setup",
        }
    }
}

/// The environment variable through which a worker process gets its
/// command (JSON), instead of a command line.
pub const WORKER_SPEC_ENV: &str = "ACTIVATION_SIM_WORKER_SPEC";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_flood_command() {
        let cli = Cli::try_parse_from([
            "activation-sim",
            "flood",
            "--product-key",
            "pk1",
            "--product-secret",
            "s",
            "--devices",
            "10",
            "--source-ip",
            "127.0.0.2",
            "--source-ip",
            "127.0.0.3",
            "--expect",
            "accepted=10",
            "--expect",
            "refused:0x97=0",
            "--protocol",
            "4",
            "--clock-skew",
            "-600",
        ])
        .expect("parse");
        let Command::Flood(f) = &cli.command else {
            panic!("not flood");
        };
        assert_eq!(f.common.devices, Some(10));
        assert_eq!(f.common.protocol, 4);
        assert_eq!(f.common.source_ip.len(), 2);
        assert_eq!(f.common.expect.len(), 2);
        // A worker's command (JSON) reads back to the same options.
        let json = serde_json::to_string(&cli.command).expect("serialize");
        let again: Command = serde_json::from_str(&json).expect("deserialize");
        let Command::Flood(g) = again else {
            panic!("not flood");
        };
        assert_eq!(g.common.source_ip, f.common.source_ip);
        assert_eq!(g.common.clock_skew, -600.0);
        assert_eq!(g.common.devices, Some(10));
        assert_eq!(g.hold, f.hold);
        assert!(g.common.expect.is_empty());
    }

    #[test]
    fn requires_a_secret() {
        assert!(Cli::try_parse_from(["activation-sim", "flood", "--product-key", "p"]).is_err());
        assert!(Cli::try_parse_from([
            "activation-sim",
            "flood",
            "--product-key",
            "p",
            "--protocol",
            "3"
        ])
        .is_err());
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
