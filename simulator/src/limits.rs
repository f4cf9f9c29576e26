//! The open-file limit: every held connection is a file descriptor.

use activation_client::limits::{open_file_limit, raise_open_file_limit};
use anyhow::{bail, Context, Result};

/// File descriptors the process needs besides its connections.
pub const RESERVED_FDS: u64 = 64;

/// Makes sure `connections` sockets can be open at once: raises the soft
/// open-file limit to the hard limit if needed, and fails with advice if even
/// that is too low. Returns the soft limit in force.
pub fn ensure_open_files(connections: u64, workers_hint: bool) -> Result<u64> {
    let needed = connections.saturating_add(RESERVED_FDS);
    let (soft, hard) = open_file_limit().context("reading the open-file limit")?;
    if needed <= soft {
        return Ok(soft);
    }
    if needed <= hard {
        if let Ok(raised) = raise_open_file_limit() {
            return Ok(raised);
        }
    }
    let advice = if workers_hint {
        format!(
            "spread the devices over several processes with --workers {} \
             (each process gets its own limit), or raise the hard limit (ulimit -Hn)",
            connections
                .div_ceil(hard.saturating_sub(RESERVED_FDS).max(1))
                .max(2)
        )
    } else {
        "raise the hard limit (ulimit -Hn) or use more --workers".to_owned()
    };
    bail!(
        "this run holds up to {connections} connections at once and needs about {needed} \
         open files, but the open-file limit is {soft} (hard limit {hard}); {advice}"
    )
}

/// The kernel's ephemeral port range size (Linux), if readable.
pub fn ephemeral_ports() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(|x| x.parse::<u64>().ok());
    let (Some(Some(lo)), Some(Some(hi))) = (it.next(), it.next()) else {
        return None;
    };
    Some(hi.saturating_sub(lo) + 1)
}

/// A warning when more connections than ephemeral ports would go from one
/// source address to the broker at once.
pub fn port_warning(connections: u64, source_addresses: usize) -> Option<String> {
    let ports = ephemeral_ports()?;
    let per_source = connections.div_ceil(source_addresses.max(1) as u64);
    (per_source > ports).then(|| {
        format!(
            "warning: about {per_source} connections per source address but only {ports}              ephemeral ports; add --source-ip addresses (e.g. 127.0.0.2, 127.0.0.3 on              loopback): {} would do",
            connections.div_ceil(ports)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_about_ephemeral_ports() {
        if let Some(ports) = ephemeral_ports() {
            assert!(port_warning(ports / 2, 1).is_none());
            let w = port_warning(ports * 3, 1).expect("warning");
            assert!(w.contains("--source-ip"), "{w}");
            assert!(port_warning(ports * 3, 3).is_none());
        }
    }

    #[test]
    fn small_needs_pass_and_huge_needs_fail_with_advice() {
        assert!(ensure_open_files(10, true).is_ok());
        let err = ensure_open_files(u64::MAX / 2, true).expect_err("too many");
        let msg = err.to_string();
        assert!(msg.contains("--workers"), "{msg}");
        assert!(msg.contains("open-file limit"), "{msg}");
    }
}
