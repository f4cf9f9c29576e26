//! Child processes (the servers under test and `perf`), temp dirs and free
//! ports. Every child dies with the bench, even on SIGKILL.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::{check_stop, stopped};

/// A child process killed (and reaped) on drop, with its output in a file.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl ChildGuard {
    /// Starts `cmd` with its stdout and stderr in `dir/{name}.log`.
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        // The child dies with the bench even if the bench is killed with
        // SIGKILL. Children are spawned from the main thread, which lives as
        // long as the bench.
        activation_client::child::die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(ChildGuard {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The last 20 lines of its output.
    pub fn output(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// An error (with its output) if it has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(st) = c.try_wait()? {
                self.child = None;
                bail!("{} exited ({st}):\n{}", self.name, self.output());
            }
        }
        Ok(())
    }

    /// Waits until `addr` accepts connections.
    pub fn wait_ready(&mut self, addr: std::net::SocketAddr) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.check_alive()?;
            check_stop()?;
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not listen on {addr} within 30 s:\n{}",
                    self.name,
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGINT (graceful shutdown), then SIGKILL after 20 s.
    pub fn interrupt_and_wait(&mut self) -> anyhow::Result<()> {
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        signal(&c, libc::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(st) = c.try_wait()? {
                if !st.success() {
                    bail!("{} exited with {st}:\n{}", self.name, self.output());
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        bail!("{} did not stop within 20 s of SIGINT", self.name)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

fn signal(c: &Child, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(c.id()) {
        // SAFETY: signals our own child, which we have not reaped yet.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        let p = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(TempDir(p))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub use activation_client::child::free_port;

/// `perf record` attached to a server for one phase; stopped on drop.
pub struct PerfGuard(Option<Child>);

impl PerfGuard {
    /// Records `pid` into `dir/<label's alphanumerics>.data`.
    pub fn start(dir: &Path, label: &str, pid: u32) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let tag: String = label
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        // `BENCH_PERF_ARGS` replaces the default ("record -F 999 -g"), e.g.
        // "trace -s" for system call counts or "record --call-graph dwarf".
        let args = std::env::var("BENCH_PERF_ARGS").unwrap_or_else(|_| "record -F 999 -g".into());
        let child = Command::new("perf")
            .args(args.split_whitespace())
            .args(["-p", &pid.to_string(), "-o"])
            .arg(dir.join(format!("{tag}.data")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf")?;
        // perf needs a moment to attach; nothing to wait on but time.
        let attached = Instant::now() + Duration::from_millis(500);
        while Instant::now() < attached && !stopped() {
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(PerfGuard(Some(child)))
    }
}

impl Drop for PerfGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            signal(&c, libc::SIGINT);
            let _ = c.wait();
        }
    }
}
