//! HAProxy as a child process, for the tests that put it in front of the
//! broker. Skipped (by the caller, saying so) where it is not installed;
//! `scripts/test` installs it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::broker::WAIT;

/// The installed `haproxy` binary, if any.
pub fn haproxy_bin() -> Option<PathBuf> {
    [
        "/usr/sbin/haproxy",
        "/usr/bin/haproxy",
        "/usr/local/sbin/haproxy",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// A running HAProxy, killed on drop.
pub struct Haproxy(std::process::Child);

impl Haproxy {
    /// Starts `bin -db -f cfg` and waits until its frontend `front` accepts
    /// connections (at most [`WAIT`]).
    pub async fn start(bin: &Path, cfg: &Path, front: SocketAddr) -> Haproxy {
        let haproxy = Haproxy(
            std::process::Command::new(bin)
                .arg("-db")
                .arg("-f")
                .arg(cfg)
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("start haproxy"),
        );
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(front).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "HAProxy never listened on {front}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        haproxy
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
