//! What `/proc` says about a process (RSS, CPU time, descriptors) and the
//! machine (listen drops, the open-file limit).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::anyhow;

use super::stopped;

/// Waits until the process's RSS is stable (allocators return freed memory
/// gradually), then returns its VmRSS in KB and its open descriptor count.
/// Stable: three readings 1 s apart within 0.5 % of each other; at most 30 s.
pub fn settle(pid: u32) -> anyhow::Result<(u64, usize)> {
    let read = || rss_kb(pid).ok_or_else(|| anyhow!("cannot read /proc/{pid}/status"));
    let mut window = VecDeque::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = read()?;
    while Instant::now() < deadline && !stopped() {
        std::thread::sleep(Duration::from_millis(1000));
        last = read()?;
        window.push_back(last);
        if window.len() > 3 {
            window.pop_front();
        }
        if window.len() == 3 {
            let lo = window.iter().copied().min().unwrap_or(0);
            let hi = window.iter().copied().max().unwrap_or(0);
            if (hi - lo) * 200 <= hi {
                break;
            }
        }
    }
    let fds = open_fds(pid).unwrap_or(0);
    Ok((last, fds))
}

/// VmRSS of `pid` in KB.
pub fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// RSS by mapping kind, and the largest anonymous mappings, of `pid`.
pub fn smaps_summary(pid: u32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut by_kind: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    let mut anon: Vec<(u64, u64, String)> = Vec::new();
    let (mut name, mut size, mut range) = (String::new(), 0u64, String::new());
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            range = first.to_owned();
            name = f.nth(4).unwrap_or("[anon]").to_owned();
            if name.starts_with('/') {
                name = "file".into();
            }
        } else if first == "Size:" {
            size = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        } else if first == "Rss:" {
            let rss: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            let e = by_kind.entry(name.clone()).or_default();
            e.0 += 1;
            e.1 += size;
            e.2 += rss;
            if name == "[anon]" || name == "[heap]" {
                anon.push((rss, size, range.clone()));
            }
        }
    }
    anon.sort_unstable_by(|a, b| b.cmp(a));
    let mut out = format!("smaps of {pid} (mappings, size KB, RSS KB):");
    for (k, (n, sz, rss)) in &by_kind {
        out += &format!("\n  {k}: {n} mappings, {sz} KB, RSS {rss} KB");
    }
    for (rss, sz, r) in anon.iter().take(8) {
        out += &format!("\n  anon {r}: {sz} KB, RSS {rss} KB");
    }
    out
}

/// User + system CPU seconds of process `pid` (0 if unreadable).
pub fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    (ticks(11) + ticks(12)) as f64 / hz
}

/// TcpExt ListenDrops of this network namespace.
pub fn listen_drops() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
            if n == "ListenDrops" {
                return v.parse().unwrap_or(0);
            }
        }
    }
    0
}

/// Open descriptors of `pid`.
pub fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// This process's soft open-file limit, which children inherit (0 if
/// unreadable).
pub fn nofile_limit() -> u64 {
    activation_client::limits::open_file_limit().map_or(0, |(soft, _)| soft)
}

/// Number of CPUs this process may run on.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(0, |p| p.get())
}
