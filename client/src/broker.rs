//! The activation broker as a child process (`activation-broker serve
//! --config FILE --data DIR`), for tests and benches: started, read from
//! its log (every listener's bound address, so configs bind port 0 and no
//! port is picked before the broker holds it; ready once the devices
//! listener is), signalled, and killed on drop.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Lines of the broker's log kept for error messages.
const KEPT_LINES: usize = 200;

/// How to start one broker.
#[derive(Debug, Clone)]
pub struct BrokerStart {
    pub bin: PathBuf,
    pub config: PathBuf,
    pub data: PathBuf,
    /// The child's hard open-file limit (it raises its soft limit to it).
    pub nofile: Option<u64>,
    /// Every log line is also appended here.
    pub log_file: Option<PathBuf>,
    /// SIGKILL the broker when the spawning thread ends (see
    /// [`crate::child::die_with_parent`]).
    pub die_with_parent: bool,
    /// How long to wait for the devices listener.
    pub ready_within: Duration,
}

impl BrokerStart {
    pub fn new(
        bin: impl Into<PathBuf>,
        config: impl Into<PathBuf>,
        data: impl Into<PathBuf>,
    ) -> Self {
        BrokerStart {
            bin: bin.into(),
            config: config.into(),
            data: data.into(),
            nofile: None,
            log_file: None,
            die_with_parent: false,
            ready_within: Duration::from_secs(60),
        }
    }
}

#[derive(Default)]
struct Log {
    lines: VecDeque<String>,
    listeners: HashMap<String, SocketAddr>,
}

/// A running broker child.
pub struct BrokerProcess {
    pub child: Child,
    /// The devices listener's bound address.
    pub addr: SocketAddr,
    log: Arc<Mutex<Log>>,
}

fn lock(log: &Mutex<Log>) -> std::sync::MutexGuard<'_, Log> {
    log.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `key=value` of a log line in tracing's text format.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key))
}

/// The line without ANSI colour sequences.
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

impl BrokerProcess {
    /// Starts the broker and waits until its devices listener is ready
    /// (every other listener is bound before it). The error carries the
    /// log's tail.
    pub fn start(s: &BrokerStart) -> anyhow::Result<BrokerProcess> {
        let mut cmd = Command::new(&s.bin);
        cmd.arg("serve")
            .arg("--config")
            .arg(&s.config)
            .arg("--data")
            .arg(&s.data)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info,rumqttd=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(limit) = s.nofile {
            crate::limits::limit_child_open_files(&mut cmd, limit);
        }
        if s.die_with_parent {
            crate::child::die_with_parent(&mut cmd);
        }
        let mut file = match &s.log_file {
            Some(p) => Some(
                std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
            ),
            None => None,
        };
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", s.bin.display()))?;
        let Some(stderr) = child.stderr.take() else {
            bail!("the broker's stderr is not piped");
        };
        let log = Arc::new(Mutex::new(Log::default()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let line = strip_ansi(&line);
                    if let Some(f) = file.as_mut() {
                        let _ = writeln!(f, "{line}");
                    }
                    let mut l = lock(&log);
                    if line.contains(" listening ") {
                        let addr = field(&line, "local_addr=").and_then(|a| a.parse().ok());
                        if let (Some(name), Some(addr)) = (field(&line, "listener="), addr) {
                            l.listeners.insert(name.to_owned(), addr);
                        }
                    }
                    if line.contains("devices listener ready") {
                        let addr = field(&line, "addr=").and_then(|a| a.parse::<SocketAddr>().ok());
                        if let (Some(addr), Some(tx)) = (addr, tx.take()) {
                            let _ = tx.send(addr);
                        }
                    }
                    if l.lines.len() >= KEPT_LINES {
                        l.lines.pop_front();
                    }
                    l.lines.push_back(line);
                }
            });
        }
        let deadline = Instant::now() + s.ready_within;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(addr) => return Ok(BrokerProcess { child, addr, log }),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    let exited = matches!(child.try_wait(), Ok(Some(_)));
                    if !exited && Instant::now() < deadline {
                        continue;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {}
            }
            let _ = child.kill();
            let status = child.wait().ok();
            let tail = tail_of(&log);
            bail!(
                "the broker did not start ({}):\n{tail}",
                status.map_or_else(|| "no status".to_owned(), |s| s.to_string())
            );
        }
    }

    /// The bound address of the MQTT listener `name` (`devices`,
    /// `devices-tls`, `accounts`, …), known once `start` returned.
    pub fn listener(&self, name: &str) -> Option<SocketAddr> {
        lock(&self.log).listeners.get(name).copied()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its exit status if it has exited.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Open file descriptors of the child (from /proc).
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// SIGKILL, then reap.
    pub fn kill9(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `sig` and waits up to `limit` for the broker to exit; its
    /// status, or `None` if it was still running (then it is killed).
    pub fn signal(&mut self, sig: libc::c_int, limit: Duration) -> Option<ExitStatus> {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: a signal to our own child, not yet reaped.
            unsafe {
                libc::kill(pid, sig);
            }
        }
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }

    /// SIGINT (the broker flushes and exits), then reap; SIGKILL after `limit`.
    pub fn stop(mut self, limit: Duration) {
        self.signal(libc::SIGINT, limit);
    }

    /// SIGINT and a clean exit within `limit`, or an error with the log.
    pub fn interrupt_and_wait(&mut self, limit: Duration) -> anyhow::Result<()> {
        match self.signal(libc::SIGINT, limit) {
            Some(status) if status.success() => Ok(()),
            Some(status) => bail!("the broker exited with {status}:\n{}", self.log_tail()),
            None => bail!("the broker did not stop within {limit:?} of SIGINT"),
        }
    }

    /// The last lines it logged.
    pub fn log_tail(&self) -> String {
        tail_of(&self.log)
    }
}

fn tail_of(log: &Mutex<Log>) -> String {
    let l = lock(log);
    l.lines.iter().cloned().collect::<Vec<_>>().join("\n")
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_fields_are_read_without_colours() {
        let line = strip_ansi(
            "\x1b[2m2026-12-02T13:20:24Z\x1b[0m \x1b[32m INFO\x1b[0m listening \
             listener=accounts local_addr=127.0.0.1:37745 tls=false",
        );
        assert_eq!(field(&line, "listener="), Some("accounts"));
        assert_eq!(field(&line, "local_addr="), Some("127.0.0.1:37745"));
        assert_eq!(field(&line, "nothing="), None);
    }
}
