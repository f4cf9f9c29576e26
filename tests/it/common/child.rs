//! The broker binary as a child process (`activation-broker serve --config
//! FILE --data DIR`) for tests that need their own process: kill -9, and
//! more sockets than one process may hold. The store is prepared offline
//! with `Ledger::open` before the child starts and checked offline after it
//! is gone.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::time::Duration;

use activation_client::broker::{BrokerProcess, BrokerStart};

use activation_broker::clock::Clock;
use activation_broker::ledger::{AuthMode, Command, Ledger, LedgerOptions, Outcome};

/// The broker binary built with this test (debug under `cargo test`,
/// release under `cargo test --release`); `ACTIVATION_BROKER_BIN` overrides it.
pub fn broker_bin() -> PathBuf {
    std::env::var_os("ACTIVATION_BROKER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_activation-broker")))
}

/// Runs `activation-broker ARGS…` to its end (colour off, no admin
/// password from the environment); its status, stdout and stderr.
pub fn cli(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let out = Process::new(broker_bin())
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("ACTIVATION_ADMIN_PASSWORD")
        .stdin(Stdio::null())
        .output()
        .expect("run activation-broker");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Opens the store of data directory `data` offline (the broker keeps it in `data/ledger`).
pub fn open_offline(data: &Path) -> Ledger {
    Ledger::open(
        &data.join("ledger"),
        LedgerOptions::default(),
        Clock::system(),
        Default::default(),
    )
    .expect("open the store offline")
}

/// Creates product `pk` (product-secret) with `codes` codes valid `validity`
/// seconds in the store of `data`; returns its secret. The store is closed
/// again on return.
pub fn prepare_store(data: &Path, pk: &str, codes: u64, validity: u64) -> String {
    stock_product(&open_offline(data), pk, codes, validity)
}

/// Creates product `pk` (product-secret) with `codes` codes valid `validity`
/// seconds in `ledger`, whichever its store; returns its secret.
pub fn stock_product(ledger: &Ledger, pk: &str, codes: u64, validity: u64) -> String {
    let Ok(Outcome::ProductCreated(p)) = ledger.execute_blocking(
        Command::CreateProduct {
            product_key: pk.into(),
            name: format!("Product {pk}"),
            auth_mode: AuthMode::ProductSecret,
        },
        None,
    ) else {
        panic!("create product {pk}")
    };
    ledger
        .execute_blocking(
            Command::CreateOrder {
                order_id: None,
                quantity: codes,
                validity_secs: validity,
                product_key: Some(pk.into()),
            },
            None,
        )
        .expect("order");
    p.secret
}

/// A config file for a child broker on 127.0.0.1 port 0 with rate limits
/// (and the per-source cap on connections without CONNECT) off.
pub fn write_config(dir: &Path, connect_timeout_secs: u64) -> PathBuf {
    let path = dir.join("broker.toml");
    std::fs::write(
        &path,
        format!(
            "[devices]\nbind = \"127.0.0.1:0\"\nconnect_timeout_secs = {connect_timeout_secs}\n\
             max_pending_per_source = 0\n\
             [accounts_listener]\nbind = \"127.0.0.1:0\"\n\
             [http]\nbind = \"127.0.0.1:0\"\n\
             [gate]\nsource_rate = 0.0\ndevice_rate = 0.0\nban_after_failures = 0\n"
        ),
    )
    .expect("write config");
    path
}

/// The broker binary as a child (`activation_client::broker`), for tests:
/// a start that fails is a test failure.
pub struct ChildBroker(BrokerProcess);

impl std::ops::Deref for ChildBroker {
    type Target = BrokerProcess;
    fn deref(&self) -> &BrokerProcess {
        &self.0
    }
}

impl std::ops::DerefMut for ChildBroker {
    fn deref_mut(&mut self) -> &mut BrokerProcess {
        &mut self.0
    }
}

impl ChildBroker {
    /// Starts `bin serve --config config --data data` and waits for its
    /// devices listener. `nofile`: the child's hard open-file limit (it
    /// raises its soft limit to the hard one).
    pub fn start(bin: &Path, config: &Path, data: &Path, nofile: Option<u64>) -> ChildBroker {
        let mut s = BrokerStart::new(bin, config, data);
        s.nofile = nofile;
        match BrokerProcess::start(&s) {
            Ok(b) => ChildBroker(b),
            Err(e) => panic!("{e:#}"),
        }
    }

    /// The bound address of the MQTT listener `name`.
    pub fn listener(&self, name: &str) -> SocketAddr {
        match self.0.listener(name) {
            Some(a) => a,
            None => panic!("the broker logged no listener named {name:?}"),
        }
    }

    /// SIGKILL, then reap.
    pub fn kill9(self) {
        self.0.kill9();
    }

    /// SIGINT (the broker flushes and exits), then reap; SIGKILL after `limit`.
    pub fn stop(self, limit: Duration) {
        self.0.stop(limit);
    }
}
