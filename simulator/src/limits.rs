//! The open-file limit: every held connection is a file descriptor.

use anyhow::{bail, Result};

/// File descriptors the process needs besides its connections.
pub const RESERVED_FDS: u64 = 64;

/// Makes sure `connections` sockets can be open at once: raises the soft
/// RLIMIT_NOFILE to the hard limit if needed, and fails with advice if even
/// that is too low. Returns the soft limit in force.
pub fn ensure_open_files(connections: u64, workers_hint: bool) -> Result<u64> {
    let needed = connections.saturating_add(RESERVED_FDS);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        bail!(
            "getrlimit(RLIMIT_NOFILE) failed: {}",
            std::io::Error::last_os_error()
        );
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
    let soft = lim.rlim_cur as u64;
    #[allow(clippy::unnecessary_cast)]
    let hard = lim.rlim_max as u64;
    if needed <= soft {
        return Ok(soft);
    }
    if soft < hard {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 && needed <= hard {
            return Ok(hard);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_needs_pass_and_huge_needs_fail_with_advice() {
        assert!(ensure_open_files(10, true).is_ok());
        let err = ensure_open_files(u64::MAX / 2, true).expect_err("too many");
        let msg = err.to_string();
        assert!(msg.contains("--workers"), "{msg}");
        assert!(msg.contains("open-file limit"), "{msg}");
    }
}
