//! The broker binary as a child process (`activation-broker serve --config
//! FILE --data DIR`) for tests that need their own process: kill -9, and
//! more sockets than one process may hold. The store is prepared offline
//! with `Ledger::open` before the child starts and checked offline after it
//! is gone.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    let ledger = open_offline(data);
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

pub struct ChildBroker {
    pub child: Child,
    pub addr: SocketAddr,
    /// The last lines the broker logged, for failure messages.
    pub log: Arc<Mutex<VecDeque<String>>>,
    /// Every MQTT listener's bound address by name (`devices`, `accounts`,
    /// …), from its `listening` log line: tests bind port 0 and ask here,
    /// so no port is picked before the broker holds it.
    pub listeners: Arc<Mutex<std::collections::HashMap<String, SocketAddr>>>,
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl ChildBroker {
    /// Starts `bin serve --config config --data data` and waits for its
    /// device listener's address in its log. `nofile`: the child's hard
    /// open-file limit (it raises its soft limit to the hard one).
    pub fn start(bin: &Path, config: &Path, data: &Path, nofile: Option<u64>) -> ChildBroker {
        let mut cmd = Process::new(bin);
        cmd.arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--data")
            .arg(data)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info,rumqttd=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(limit) = nofile {
            activation_client::limits::limit_child_open_files(&mut cmd, limit);
        }
        let mut child = cmd.spawn().expect("spawn the broker");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let listeners = Arc::new(Mutex::new(std::collections::HashMap::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            let listeners = listeners.clone();
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let line = strip_ansi(&line);
                    if line.contains(" listening ") {
                        let field = |key: &str| {
                            line.split_whitespace()
                                .find_map(|w| w.strip_prefix(key))
                                .map(str::to_owned)
                        };
                        if let (Some(name), Some(addr)) = (
                            field("listener="),
                            field("local_addr=").and_then(|a| a.parse::<SocketAddr>().ok()),
                        ) {
                            listeners.lock().expect("listeners").insert(name, addr);
                        }
                    }
                    if line.contains("devices listener ready") {
                        if let Some(addr) = line
                            .split_whitespace()
                            .find_map(|w| w.strip_prefix("addr="))
                            .and_then(|a| a.parse::<SocketAddr>().ok())
                        {
                            if let Some(tx) = tx.take() {
                                let _ = tx.send(addr);
                            }
                        }
                    }
                    let mut l = log.lock().expect("log");
                    if l.len() >= 200 {
                        l.pop_front();
                    }
                    l.push_back(line);
                }
            });
        }
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the broker did not start:\n{}",
                    log.lock()
                        .expect("log")
                        .iter()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
        };
        ChildBroker {
            child,
            addr,
            log,
            listeners,
        }
    }

    /// The bound address of the MQTT listener `name` (logged before the
    /// devices listener is ready, so known once `start` returns).
    pub fn listener(&self, name: &str) -> SocketAddr {
        match self.listeners.lock().expect("listeners").get(name) {
            Some(a) => *a,
            None => panic!("the broker logged no listener named {name:?}"),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Open file descriptors of the child (from /proc).
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// SIGKILL, then reap.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGINT (the broker flushes and exits), then reap; SIGKILL after `limit`.
    pub fn stop(mut self, limit: Duration) {
        // SAFETY: sending a signal to our own child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGINT);
        }
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `sig` and waits up to `limit` for the broker to exit; its
    /// status, or `None` if it was still running (then it is killed).
    pub fn signal(
        &mut self,
        sig: libc::c_int,
        limit: Duration,
    ) -> Option<std::process::ExitStatus> {
        // SAFETY: sending a signal to our own child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }

    pub fn log_tail(&self) -> String {
        self.log
            .lock()
            .expect("log")
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for ChildBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
