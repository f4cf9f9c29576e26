//! The servers under test, each a child process on loopback: the
//! activation broker (product, codes and accounts set up before it
//! starts), Mosquitto (anonymous or with a password file) and rumqttd's
//! stock `Server` listener.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;

use super::child::{free_port, ChildGuard};
use super::load::{command_topic, plain_connect, signed_connect, subscribe, Device};
use activation_broker::clock::Clock;
use activation_broker::ledger::{self, AuthMode, Ledger, LedgerOptions, Outcome};
use activation_client::broker::{BrokerProcess, BrokerStart};
use activation_client::credentials::{client_id, sign};

/// The product every bench device belongs to.
pub const PRODUCT: &str = "bench";

/// The activation-broker binary: `arg`, or the one next to the running bench.
pub fn broker_bin(arg: Option<&Path>) -> anyhow::Result<PathBuf> {
    let bin = match arg {
        Some(p) => p.to_owned(),
        None => std::env::current_exe()?.with_file_name("activation-broker"),
    };
    if !bin.is_file() {
        bail!(
            "{} not found: build it first (cargo build --release --bins) or pass --broker-bin",
            bin.display()
        );
    }
    Ok(bin)
}

/// An account on the accounts listener allowed to subscribe to `subscribe`.
pub struct Account {
    pub name: String,
    pub password: String,
    pub subscribe: Vec<String>,
}

/// How the activation broker is set up.
pub struct BrokerSpec {
    /// Activation codes of the product (one per device that will connect).
    pub codes: u64,
    /// `[devices] io_threads` (0: one per CPU).
    pub io_threads: usize,
    pub account: Option<Account>,
    /// `[router]` settings (TOML lines) other than the defaults.
    pub router: Option<String>,
}

impl BrokerSpec {
    /// What differs from the embedded default config, in one sentence.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "the activation broker runs its embedded default config except: loopback ports, `[devices] io_threads = {}` (0: one per CPU), and the gate's rate limits and bans off (`source_rate = 0`, `device_rate = 0`, `ban_after_failures = 0`: every CONNECT comes from a few 127.x addresses and each device reconnects within seconds)",
            self.io_threads
        );
        if let Some(r) = &self.router {
            s += &format!("; `[router] {}`", r.replace('\n', ", "));
        }
        if let Some(a) = &self.account {
            s += &format!(
                "; one account `{}` (role none) may subscribe to {}",
                a.name,
                a.subscribe.join(", ")
            );
        }
        s + "."
    }
}

/// The activation broker as a child process.
pub struct ActivationBroker {
    pub child: BrokerProcess,
    pub addr: SocketAddr,
    pub accounts_addr: SocketAddr,
    /// The product secret devices sign with.
    pub secret: String,
    launch: Launch,
    /// Stopped by [`ActivationBroker::stop`], until the next restart.
    stopped: bool,
}

/// Longest graceful stop (SIGINT) of the broker.
const STOP_WITHIN: std::time::Duration = std::time::Duration::from_secs(20);

/// How to start the broker process on its store.
struct Launch {
    bin: PathBuf,
    dir: PathBuf,
    data: PathBuf,
    io_threads: usize,
    /// `[[accounts]]` tables of the config.
    accounts: String,
    /// `[router]` lines of the config.
    router: String,
}

impl Launch {
    /// Writes the config (every listener on port 0), starts the broker and
    /// waits until it is ready; the listeners' addresses come from its log.
    fn start(&self) -> anyhow::Result<(BrokerProcess, SocketAddr, SocketAddr)> {
        let config = format!(
            r#"data_dir = "{data}"
[devices]
bind = "127.0.0.1:0"
io_threads = {io_threads}
[accounts_listener]
bind = "127.0.0.1:0"
[http]
bind = "127.0.0.1:0"
[gate]
source_rate = 0.0
device_rate = 0.0
ban_after_failures = 0
{router}
{accounts}"#,
            data = self.data.display(),
            io_threads = self.io_threads,
            accounts = self.accounts,
            router = self.router,
        );
        let config_file = self.dir.join("broker.toml");
        std::fs::write(&config_file, config)?;
        let mut start = BrokerStart::new(&self.bin, &config_file, &self.data);
        start.log_file = Some(self.dir.join("activation-broker.log"));
        // The broker dies with the bench even if the bench is killed with
        // SIGKILL. Children are spawned from the main thread, which lives
        // as long as the bench.
        start.die_with_parent = true;
        start.ready_within = std::time::Duration::from_secs(30);
        let child = BrokerProcess::start(&start)?;
        let addr = child.addr;
        let Some(accounts_addr) = child.listener("accounts") else {
            anyhow::bail!(
                "the broker logged no accounts listener:\n{}",
                child.log_tail()
            );
        };
        Ok((child, addr, accounts_addr))
    }
}

impl ActivationBroker {
    /// Creates the product and `spec.codes` codes in a fresh data dir under
    /// `dir`, starts the broker on it and waits until it listens.
    pub fn start(bin: &Path, dir: &Path, spec: &BrokerSpec) -> anyhow::Result<Self> {
        let data = dir.join("data");
        std::fs::create_dir_all(&data)?;
        // Dropping the ledger releases sled's lock before the broker opens it.
        let secret = {
            let l = open_ledger(&data)?;
            let secret = match l.execute_blocking(
                ledger::Command::CreateProduct {
                    product_key: PRODUCT.into(),
                    name: "bench".into(),
                    auth_mode: AuthMode::ProductSecret,
                },
                None,
            )? {
                Outcome::ProductCreated(p) => p.secret,
                other => bail!("unexpected outcome creating the product: {other:?}"),
            };
            l.execute_blocking(
                ledger::Command::CreateOrder {
                    order_id: None,
                    quantity: spec.codes,
                    validity_secs: 365 * 24 * 3600,
                    product_key: Some(PRODUCT.into()),
                },
                None,
            )?;
            secret
        };
        let accounts = match &spec.account {
            Some(a) => format!(
                "[[accounts]]\nname = {name:?}\npassword_hash = {hash:?}\nrole = \"none\"\nsubscribe = {subscribe:?}\n",
                name = a.name,
                hash = activation_broker::admin::accounts::hash_password(&a.password),
                subscribe = a.subscribe,
            ),
            None => String::new(),
        };
        let launch = Launch {
            bin: bin.to_owned(),
            dir: dir.to_owned(),
            data,
            io_threads: spec.io_threads,
            accounts,
            router: spec
                .router
                .as_ref()
                .map_or_else(String::new, |r| format!("[router]\n{r}\n")),
        };
        let (child, addr, accounts_addr) = launch.start()?;
        Ok(ActivationBroker {
            child,
            addr,
            accounts_addr,
            secret,
            launch,
            stopped: false,
        })
    }

    /// Stops the broker (SIGINT) and starts it again on the same store, on
    /// new ports: a fresh process whose ledger holds what the last one
    /// committed.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        let (child, addr, accounts_addr) = self.launch.start()?;
        self.child = child;
        self.addr = addr;
        self.accounts_addr = accounts_addr;
        self.stopped = false;
        Ok(())
    }

    /// Stops the broker (SIGINT) until the next [`Self::restart`], so that
    /// it takes no CPU while another server is measured.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if !self.stopped {
            self.child.interrupt_and_wait(STOP_WITHIN)?;
            self.stopped = true;
        }
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Device `{prefix}{i}` for every `i` in `range`, signed now, each
    /// subscribing to its command topic if `subscribe`.
    pub fn devices(
        &self,
        prefix: &str,
        range: std::ops::Range<usize>,
        subscribe_command: bool,
    ) -> anyhow::Result<Vec<Device>> {
        let now = Clock::system().now();
        devices(prefix, range, subscribe_command, |dk| {
            signed_connect(PRODUCT, dk, &self.secret, now)
        })
    }

    /// Stops the broker (SIGINT), reopens its store and returns the
    /// product's consumed and available codes, once the invariants hold.
    pub fn stop_and_check(mut self) -> anyhow::Result<(u64, u64)> {
        self.stop()?;
        let l = open_ledger(&self.launch.data)?;
        let p = l.product(PRODUCT)?;
        l.check_invariants().map_err(anyhow::Error::msg)?;
        Ok((p.consumed, p.available()))
    }
}

fn open_ledger(data: &Path) -> anyhow::Result<Ledger> {
    Ledger::open(
        &data.join("ledger"),
        LedgerOptions::default(),
        Clock::system(),
        Default::default(),
    )
    .with_context(|| format!("opening the ledger in {}", data.display()))
}

/// The Mosquitto binary's version line ("Mosquitto 2.0.11").
pub fn mosquitto_name(bin: &Path) -> String {
    let version = Command::new(bin)
        .arg("-h")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim_start_matches("mosquitto version ").to_owned())
        })
        .unwrap_or_default();
    format!("Mosquitto {version}").trim().to_owned()
}

/// The password of device `dk` in Mosquitto's password file.
fn mosquitto_password(dk: &str) -> String {
    sign("mosquitto-bench", dk)[..32].to_owned()
}

/// How Mosquitto is configured, in one sentence.
pub fn mosquitto_settings(name: &str) -> String {
    format!(
        "{name} runs with `max_connections -1`, `persistence false`, `log_dest none`, `set_tcp_nodelay true` and RLIMIT_NOFILE {} inherited from the bench; its listen(2) backlog is fixed at 100 in its source (src/net.c), and its password file holds one user per device hashed by `mosquitto_passwd -U` (sha512-pbkdf2).",
        super::procfs::nofile_limit()
    )
}

/// Mosquitto as a child process.
pub struct Mosquitto {
    pub child: ChildGuard,
    pub addr: SocketAddr,
    /// Whether it requires the password file's logins.
    pub passwords: bool,
}

impl Mosquitto {
    /// Writes a password file with user `{prefix}{i}` for every `i` in
    /// `range`, hashed by `mosquitto_passwd -U` next to `bin`.
    pub fn write_passwd(
        bin: &Path,
        dir: &Path,
        prefix: &str,
        range: std::ops::Range<usize>,
    ) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let passwd = dir.join("passwd");
        {
            let mut f = std::io::BufWriter::new(std::fs::File::create(&passwd)?);
            for i in range {
                let dk = format!("{prefix}{i}");
                writeln!(f, "{dk}:{}", mosquitto_password(&dk))?;
            }
            f.flush()?;
        }
        let tool = bin
            .parent()
            .and_then(Path::parent)
            .map(|p| p.join("bin/mosquitto_passwd"))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("mosquitto_passwd"));
        let st = Command::new(&tool)
            .arg("-U")
            .arg(&passwd)
            .status()
            .with_context(|| format!("running {}", tool.display()))?;
        if !st.success() {
            bail!("{} -U failed: {st}", tool.display());
        }
        Ok(passwd)
    }

    /// Starts Mosquitto anonymous (`passwd` None) or with a password file.
    pub fn start(bin: &Path, dir: &Path, passwd: Option<&Path>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let (conf, auth) = match passwd {
            None => (dir.join("anon.conf"), "allow_anonymous true\n".to_owned()),
            Some(p) => (
                dir.join("passwd.conf"),
                format!("allow_anonymous false\npassword_file {}\n", p.display()),
            ),
        };
        std::fs::write(
            &conf,
            format!(
                "user root\nper_listener_settings false\nlistener {port} 127.0.0.1\n{auth}max_connections -1\npersistence false\nlog_dest none\nset_tcp_nodelay true\n"
            ),
        )?;
        let mut cmd = Command::new(bin);
        cmd.arg("-c").arg(&conf);
        let mut child = ChildGuard::spawn("mosquitto", cmd, dir)?;
        child.wait_ready(addr)?;
        Ok(Mosquitto {
            child,
            addr,
            passwords: passwd.is_some(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Device `{prefix}{i}` for every `i` in `range` (the password file's
    /// login if it has one), each subscribing to its command topic if
    /// `subscribe`.
    pub fn devices(
        &self,
        prefix: &str,
        range: std::ops::Range<usize>,
        subscribe_command: bool,
    ) -> anyhow::Result<Vec<Device>> {
        devices(prefix, range, subscribe_command, |dk| {
            let login = self
                .passwords
                .then(|| (dk.to_owned(), mosquitto_password(dk)));
            plain_connect(&client_id(PRODUCT, dk), login)
        })
    }
}

/// Device `{prefix}{i}` of [`PRODUCT`] for every `i` in `range`, connecting
/// with the CONNECT `connect` builds for its DeviceKey, each subscribing to
/// its command topic if `subscribe_command`.
fn devices(
    prefix: &str,
    range: std::ops::Range<usize>,
    subscribe_command: bool,
    connect: impl Fn(&str) -> anyhow::Result<Bytes>,
) -> anyhow::Result<Vec<Device>> {
    range
        .map(|i| {
            let dk = format!("{prefix}{i}");
            Ok(Device {
                connect: connect(&dk)?,
                subscribe: subscribe_command
                    .then(|| subscribe(&command_topic(PRODUCT, &dk)))
                    .transpose()?,
            })
        })
        .collect()
}

/// The hidden flag that makes a bench binary serve rumqttd's stock listener.
pub const STOCK_RUMQTTD_FLAG: &str = "--serve-stock-rumqttd";

/// rumqttd's stock `Server` as a child process: the running bench binary
/// started again with [`STOCK_RUMQTTD_FLAG`], which must call
/// [`serve_stock_rumqttd`].
pub struct StockRumqttd {
    pub child: ChildGuard,
    pub addr: SocketAddr,
}

impl StockRumqttd {
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg(STOCK_RUMQTTD_FLAG).arg(addr.to_string());
        let mut child = ChildGuard::spawn("rumqttd-stock", cmd, dir)?;
        child.wait_ready(addr)?;
        Ok(StockRumqttd { child, addr })
    }

    /// Plain devices (no login), as rumqttd's listener has no auth.
    pub fn devices(
        &self,
        prefix: &str,
        range: std::ops::Range<usize>,
    ) -> anyhow::Result<Vec<Device>> {
        range
            .map(|i| {
                Ok(Device {
                    connect: plain_connect(&client_id(PRODUCT, &format!("{prefix}{i}")), None)?,
                    subscribe: None,
                })
            })
            .collect()
    }
}

/// rumqttd's stock v4 `Server` with no auth on the router configuration
/// our gateway uses, in this process (runs until killed).
pub fn serve_stock_rumqttd(addr: SocketAddr) -> anyhow::Result<()> {
    use std::collections::HashMap;
    let mut v4 = HashMap::new();
    v4.insert(
        "1".to_owned(),
        rumqttd::ServerSettings {
            name: "v4-1".into(),
            listen: addr,
            tls: None,
            // rumqttd's accept loop sleeps this long after every accept.
            next_connection_delay_ms: 0,
            connections: rumqttd::ConnectionSettings {
                connection_timeout_ms: 60_000,
                max_payload_size: 256 * 1024,
                max_inflight_count: 100,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        },
    );
    let config = rumqttd::Config {
        id: 0,
        router: activation_broker::gateway::router_config(200_000),
        v4: Some(v4),
        ..Default::default()
    };
    rumqttd::Broker::new(config)
        .start()
        .map_err(|e| anyhow!("rumqttd: {e}"))
}
