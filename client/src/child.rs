//! Child processes of tests and benches (a broker, a server under test):
//! free ports to tell them, and children that die with their parent.

use std::os::unix::process::CommandExt as _;
use std::process::Command;

/// A free loopback port for a child process that must be told its port
/// (bound and released; the child binds it next). It is taken below the
/// kernel's ephemeral range (`ip_local_port_range`), so no client socket
/// of this or a parallel test is given it in the meantime, at a random
/// offset, so parallel callers rarely try the same one.
pub fn free_port() -> std::io::Result<u16> {
    use rand::Rng;
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = (low.saturating_sub(12_000).max(1024), low);
    let mut rng = rand::thread_rng();
    for _ in 0..200 {
        let port = rng.gen_range(from..to);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Makes `cmd`'s child get SIGKILL when the thread that spawns it ends
/// (its parent dies, even of SIGKILL). Spawn from a thread that lives as
/// long as the child should.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_free_port_can_be_bound() {
        let port = super::free_port().expect("port");
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind");
    }
}
