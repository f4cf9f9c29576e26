//! Router benchmark: rumqttd's router in process,
//! real `LinkBuilder` links, no sockets. For each fleet size, every device
//! links, subscribes to its own `devices/{PK}/{DK}/command` and stays idle;
//! then the router is measured: cost per subscribe, per publish (a command
//! to a subscribed device; telemetry nobody subscribes to; telemetry with a
//! backend subscribed to `devices/+/+/telemetry`, which must receive every
//! message) and RSS growth per device. Each size runs in its own process
//! (so RSS is its own); one markdown table is printed with the settings.
//!
//! `cargo run --release --bin router-bench -- [--devices 10000,100000,1000000]
//! [--publishes 20000] [--threads 4]`
//!
//! To profile one phase (`link`, `subscribe`, `command`, `unsubscribed`,
//! `wildcard`) of one size alone:
//! `mkfifo ctl; ROUTER_BENCH_PERF_CTL=ctl ROUTER_BENCH_PERF_PHASE=command
//! perf record --control fifo:ctl -D -1 -g -- router-bench --single 1000000`

use std::future::Future;
use std::pin::pin;
use std::process::Command;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use activation_broker::gateway::router_config;
use anyhow::{bail, Context as _};
use clap::Parser;
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::{Filter, Packet, PingReq, QoS, RetainForwardRule, Subscribe};
use rumqttd::{Notification, Router};
use serde::{Deserialize, Serialize};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(about = "Benchmark rumqttd's router with many subscribed devices")]
struct Args {
    /// Fleet sizes to measure (each in its own process).
    #[arg(long, value_delimiter = ',', default_values_t = vec![10_000, 100_000])]
    devices: Vec<usize>,
    /// Messages per publish measurement.
    #[arg(long, default_value_t = 20_000)]
    publishes: usize,
    /// Threads linking devices and publishing their telemetry.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Internal: measure one fleet size and print its result as JSON.
    #[arg(long, hide = true)]
    single: Option<usize>,
}

/// Wall time and the router thread's CPU time per operation, in µs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Cost {
    wall: f64,
    cpu: f64,
}

/// Measures a phase of `ops` operations: wall time, and CPU time of the
/// router thread (robust to other load on the machine).
struct Phase {
    router: libc::clockid_t,
    started: Instant,
    cpu0: u64,
    profiled: bool,
}

impl Phase {
    /// Starts phase `name`. With `ROUTER_BENCH_PERF_CTL` (a `perf record
    /// --control fifo:…` path) and `ROUTER_BENCH_PERF_PHASE` naming this
    /// phase, perf records this phase only.
    fn start(router: libc::clockid_t, name: &str) -> anyhow::Result<Phase> {
        let profiled = std::env::var("ROUTER_BENCH_PERF_PHASE").is_ok_and(|p| p == name);
        if profiled {
            perf_control("enable")?;
        }
        Ok(Phase {
            router,
            started: Instant::now(),
            cpu0: cpu_ns(router)?,
            profiled,
        })
    }

    fn end(self, ops: usize) -> anyhow::Result<Cost> {
        if self.profiled {
            perf_control("disable")?;
        }
        let wall = self.started.elapsed().as_secs_f64() * 1e6 / ops as f64;
        let cpu = (cpu_ns(self.router)? - self.cpu0) as f64 / 1e3 / ops as f64;
        Ok(Cost { wall, cpu })
    }
}

/// A parameter of Linux's free page reporting (a VM's balloon handing the
/// guest's free memory back to the host), if the kernel has it.
fn page_reporting(name: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/sys/module/page_reporting/parameters/{name}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The free page reporting in effect during the run: on a VM that reports
/// freed memory to its host, every page the router touches anew after
/// another run freed it is faulted in by the host again, which a fleet
/// of 1M pays for several GB and 10k hardly at all.
fn page_reporting_note(reported_before: Option<u64>) -> String {
    match (page_reporting("page_reporting_order"), reported_before) {
        (Some(order), Some(before)) => {
            let after = page_reporting("reported_kib").unwrap_or(before);
            format!(
                "Free page reporting (virtio-balloon): page_reporting_order = {order} \
                 ({}); {} MiB of freed memory reported to the host during this run.",
                if order > 10 {
                    "off: freed pages stay backed by the host"
                } else {
                    "on: free blocks of that order go back to the host, and touching \
                     them again costs a host fault each"
                },
                after.saturating_sub(before) / 1024
            )
        }
        _ => "No free page reporting on this machine.".to_owned(),
    }
}

/// Writes `command` to perf's control FIFO (`ROUTER_BENCH_PERF_CTL`).
fn perf_control(command: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let path = std::env::var("ROUTER_BENCH_PERF_CTL")
        .context("ROUTER_BENCH_PERF_PHASE needs ROUTER_BENCH_PERF_CTL")?;
    let mut fifo = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .with_context(|| format!("opening perf control FIFO {path}"))?;
    fifo.write_all(format!("{command}\n").as_bytes())?;
    Ok(())
}

/// The CPU clock of the router thread (named `router-0` by rumqttd).
/// (It names itself once running: looked for until then, up to 5 s.)
fn router_clock() -> anyhow::Result<libc::clockid_t> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        for task in std::fs::read_dir("/proc/self/task")? {
            let task = task?;
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim() == "router-0" {
                let tid: libc::pid_t = task.file_name().to_string_lossy().parse()?;
                // Linux: the CPU-time clock of thread `tid` (CPUCLOCK_SCHED,
                // per thread), as pthread_getcpuclockid computes it.
                return Ok((!tid << 3) | 6);
            }
        }
        std::thread::yield_now();
    }
    bail!("no router thread found")
}

fn cpu_ns(clock: libc::clockid_t) -> anyhow::Result<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out pointer.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        bail!("clock_gettime: {}", std::io::Error::last_os_error());
    }
    Ok(u64::try_from(ts.tv_sec)? * 1_000_000_000 + u64::try_from(ts.tv_nsec)?)
}

#[derive(Debug, Serialize, Deserialize)]
struct Measured {
    devices: usize,
    link_us: Cost,
    subscribe_us: Cost,
    command_us: Cost,
    unsubscribed_us: Cost,
    wildcard_us: Cost,
    wildcard_received: usize,
    /// µs per publish of the scan rumqttd 0.20.0 ran over every filter for
    /// a topic nobody subscribes to, timed alone
    old_scan_us: f64,
    rss_per_device: f64,
    /// RSS growth per device after linking, before subscribing
    rss_per_linked: f64,
    rss_mib: f64,
}

/// Wakes the thread blocked in [`now`].
struct ThreadWaker(std::thread::Thread);

impl std::task::Wake for ThreadWaker {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs `LinkTx::send` to completion on this (non-async) thread: it awaits
/// only while the router's channel is full.
fn now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let waker = Waker::from(std::sync::Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

fn rss_bytes() -> anyhow::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .context("statm has no resident field")?
        .parse()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Ok(pages * u64::try_from(page)?)
}

struct Device {
    tx: LinkTx,
    rx: LinkRx,
    topic: String,
}

fn device_id(i: usize) -> (String, String) {
    let (pk, dk) = (format!("p{}", i % 100), format!("d{i}"));
    (format!("{pk}.{dk}"), format!("devices/{pk}/{dk}"))
}

fn subscribe_packet(filter: &str, qos: QoS) -> Packet {
    Packet::Subscribe(
        Subscribe {
            pkid: 1,
            filters: vec![Filter {
                path: filter.to_owned(),
                qos,
                nolocal: false,
                preserve_retain: false,
                retain_forward_rule: RetainForwardRule::Never,
            }],
        },
        None,
    )
}

/// A publish with `qos` and `pkid`, built through the v4 codec (rumqttd
/// keeps those fields private).
fn publish_packet(topic: &str, qos: QoS, pkid: u16) -> Packet {
    use rumqttd::protocol::{v4::V4, Protocol};
    let payload: &[u8] = b"{\"t\":21.5}";
    let mut buf = bytes::BytesMut::new();
    let header = 0x30 | ((qos as u8) << 1);
    let topic = topic.as_bytes();
    let mut body = Vec::with_capacity(topic.len() + payload.len() + 4);
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic);
    if qos != QoS::AtMostOnce {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    body.extend_from_slice(payload);
    buf.extend_from_slice(&[header]);
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        buf.extend_from_slice(&[byte]);
        if len == 0 {
            break;
        }
    }
    buf.extend_from_slice(&body);
    V4.read_mut(&mut buf, 1 << 20).expect("valid publish")
}

/// Next packet for a link (answers `Unschedule` by asking for more).
fn next(rx: &mut LinkRx) -> anyhow::Result<Packet> {
    loop {
        let deadline = Instant::now() + Duration::from_secs(120);
        match rx.recv_deadline(deadline)? {
            Some(Notification::Forward(f)) => return Ok(Packet::Publish(f.publish, f.properties)),
            Some(Notification::DeviceAck(ack)) => return Ok(ack.into()),
            Some(Notification::Unschedule) => rx.ready()?,
            Some(other) => bail!("unexpected notification {other:?}"),
            None => {}
        }
    }
}

fn wait_for(rx: &mut LinkRx, mut want: impl FnMut(&Packet) -> bool) -> anyhow::Result<()> {
    loop {
        if want(&next(rx)?) {
            return Ok(());
        }
    }
}

fn split<T>(v: Vec<T>, parts: usize) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = (0..parts).map(|_| Vec::new()).collect();
    for (i, x) in v.into_iter().enumerate() {
        out[i % parts].push(x);
    }
    out
}

/// Each thread publishes `per_thread` telemetry messages (QoS 1) from
/// devices spread evenly over its share of the fleet (each device once if
/// it has as many devices), then waits for every PUBACK.
fn telemetry(groups: &mut [Vec<Device>], per_thread: usize) -> anyhow::Result<()> {
    std::thread::scope(|s| {
        let handles: Vec<_> = groups
            .iter_mut()
            .map(|devices| {
                s.spawn(move || -> anyhow::Result<()> {
                    let len = devices.len().max(1);
                    let stride = (len / per_thread.max(1)).max(1);
                    let mut sent = vec![0usize; len];
                    for k in 0..per_thread {
                        let i = (k * stride) % len;
                        let d = &mut devices[i];
                        let topic = format!("{}/telemetry", d.topic);
                        let pkid = (sent[i] % 60_000 + 1) as u16;
                        now(d.tx.send(publish_packet(&topic, QoS::AtLeastOnce, pkid)))?;
                        sent[i] += 1;
                    }
                    for (d, count) in devices.iter_mut().zip(sent) {
                        for _ in 0..count {
                            wait_for(&mut d.rx, |p| matches!(p, Packet::PubAck(..)))?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("publisher panicked"))??;
        }
        Ok(())
    })
}

/// rumqttd 0.20.0's `DataLog::matches` for a topic nobody subscribes to:
/// `protocol::matches` over every filter (the devices' command filters),
/// timed alone, repeated for at least 0.2 s.
fn old_scan(n: usize) -> anyhow::Result<f64> {
    let filters: Vec<String> = (0..n)
        .map(|i| format!("{}/command", device_id(i).1))
        .collect();
    let topic = format!("{}/telemetry", device_id(n / 2).1);
    let started = Instant::now();
    let mut scans = 0u64;
    let mut found = 0usize;
    while started.elapsed() < Duration::from_millis(200) {
        found += filters
            .iter()
            .filter(|f| rumqttd::protocol::matches(&topic, f))
            .count();
        scans += 1;
    }
    if found != 0 {
        bail!("the telemetry topic matched a command filter");
    }
    Ok(started.elapsed().as_secs_f64() * 1e6 / scans as f64)
}

fn single(n: usize, publishes: usize, threads: usize) -> anyhow::Result<Measured> {
    let rss0 = rss_bytes()?;
    let router = Router::new(0, router_config(n + 16)).spawn();
    let clock = router_clock()?;

    // Link every device.
    let phase = Phase::start(clock, "link")?;
    let ids: Vec<usize> = (0..n).collect();
    let mut groups: Vec<Vec<Device>> = std::thread::scope(|s| {
        let handles: Vec<_> = split(ids, threads)
            .into_iter()
            .map(|ids| {
                let router = router.clone();
                s.spawn(move || -> anyhow::Result<Vec<Device>> {
                    ids.into_iter()
                        .map(|i| {
                            let (client_id, topic) = device_id(i);
                            let (tx, rx, _) = LinkBuilder::new(&client_id, router.clone())
                                .dynamic_filters(true)
                                .build()?;
                            Ok(Device { tx, rx, topic })
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("linker panicked"))?)
            .collect::<anyhow::Result<_>>()
    })?;
    let link_us = phase.end(n)?;
    let rss_linked = rss_bytes()?;

    // Every device subscribes to its command topic.
    let phase = Phase::start(clock, "subscribe")?;
    std::thread::scope(|s| {
        let handles: Vec<_> = groups
            .iter_mut()
            .map(|devices| {
                s.spawn(move || -> anyhow::Result<()> {
                    for d in devices.iter_mut() {
                        let filter = format!("{}/command", d.topic);
                        now(d.tx.send(subscribe_packet(&filter, QoS::AtLeastOnce)))?;
                    }
                    for d in devices.iter_mut() {
                        wait_for(&mut d.rx, |p| matches!(p, Packet::SubAck(..)))?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("subscriber panicked"))??;
        }
        anyhow::Ok(())
    })?;
    let subscribe_us = phase.end(n)?;
    let rss1 = rss_bytes()?;

    // Commands from a backend to random subscribed devices (QoS 1, acked).
    let (mut backend_tx, mut backend_rx, _) = LinkBuilder::new("backend", router.clone())
        .dynamic_filters(true)
        .build()?;
    let phase = Phase::start(clock, "command")?;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for k in 0..publishes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let (_, topic) = device_id((x % n as u64) as usize);
        let pkid = (k % 60_000 + 1) as u16;
        now(backend_tx.send(publish_packet(
            &format!("{topic}/command"),
            QoS::AtLeastOnce,
            pkid,
        )))?;
    }
    for _ in 0..publishes {
        wait_for(&mut backend_rx, |p| matches!(p, Packet::PubAck(..)))?;
    }
    now(backend_tx.send(Packet::PingReq(PingReq)))?;
    wait_for(&mut backend_rx, |p| matches!(p, Packet::PingResp(..)))?;
    let command_us = phase.end(publishes)?;

    // Telemetry nobody subscribes to.
    let per_thread = publishes / threads;
    let phase = Phase::start(clock, "unsubscribed")?;
    telemetry(&mut groups, per_thread)?;
    let unsubscribed_us = phase.end(per_thread * threads)?;

    // Telemetry with a backend subscribed to devices/+/+/telemetry.
    let (mut app_tx, mut app_rx, _) = LinkBuilder::new("app", router.clone()).build()?;
    now(app_tx.send(subscribe_packet("devices/+/+/telemetry", QoS::AtMostOnce)))?;
    wait_for(&mut app_rx, |p| matches!(p, Packet::SubAck(..)))?;
    let expected = per_thread * threads;
    let phase = Phase::start(clock, "wildcard")?;
    let reader = std::thread::spawn(move || -> anyhow::Result<usize> {
        let mut received = 0;
        while received < expected {
            if let Packet::Publish(..) = next(&mut app_rx)? {
                received += 1;
            }
        }
        Ok(received)
    });
    telemetry(&mut groups, per_thread)?;
    let wildcard_received = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    let wildcard_us = phase.end(expected)?;

    let rss_mib = rss1 as f64 / (1024.0 * 1024.0);
    drop(groups);
    let old_scan_us = old_scan(n)?;
    Ok(Measured {
        devices: n,
        link_us,
        subscribe_us,
        command_us,
        unsubscribed_us,
        wildcard_us,
        wildcard_received,
        old_scan_us,
        rss_per_device: (rss1.saturating_sub(rss0)) as f64 / n as f64,
        rss_per_linked: (rss_linked.saturating_sub(rss0)) as f64 / n as f64,
        rss_mib,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(n) = args.single {
        let m = single(n, args.publishes, args.threads.max(1))?;
        println!("{}", serde_json::to_string(&m)?);
        return Ok(());
    }

    let exe = std::env::current_exe()?;
    let reported_before = page_reporting("reported_kib");
    let mut rows = Vec::new();
    for &n in &args.devices {
        eprintln!("measuring {n} devices ...");
        let out = Command::new(&exe)
            .args([
                "--single",
                &n.to_string(),
                "--publishes",
                &args.publishes.to_string(),
                "--threads",
                &args.threads.to_string(),
            ])
            .output()?;
        if !out.status.success() {
            bail!(
                "{n} devices failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let line = String::from_utf8(out.stdout)?;
        let m: Measured = serde_json::from_str(line.trim())
            .with_context(|| format!("result of {n} devices: {line}"))?;
        eprintln!("{m:?}");
        rows.push(m);
    }

    println!(
        "Router benchmark: rumqttd 0.20.0 (vendored, patched) router in process, \
         `LinkBuilder` links, no sockets; \
         router_config(devices + 16) of the gateway; {} linking/publishing threads; \
         {} messages per publish measurement (10-byte payload, QoS 1 acked); \
         every device subscribed (QoS 1) to its own devices/{{PK}}/{{DK}}/command; \
         jemalloc; RSS growth from before the router to after every SUBACK.\n",
        args.threads, args.publishes
    );
    println!("{}\n", page_reporting_note(reported_before));
    println!(
        "RSS includes the bench's own link handles (`LinkTx`/`LinkRx`, which the gateway \
         holds per linked session; their buffers start empty and grow on demand).\n"
    );
    println!(
        "Each cost is µs per operation: the router thread's CPU time (wall time of the \
         phase in parentheses; the machine may be shared, CPU time is what the router spent).\n"
    );
    println!(
        "| devices | link | subscribe | command to a subscribed device | telemetry, nobody \
         subscribed | telemetry to `devices/+/+/telemetry` (received) | RSS/device linked | \
         RSS/device subscribed | RSS | 0.20.0's scan per unsubscribed publish, timed alone |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let cost = |c: Cost| format!("{:.2} ({:.2})", c.cpu, c.wall);
    for m in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} ({}) | {:.0} B | {:.0} B | {:.0} MiB | {:.0} µs |",
            m.devices,
            cost(m.link_us),
            cost(m.subscribe_us),
            cost(m.command_us),
            cost(m.unsubscribed_us),
            cost(m.wildcard_us),
            m.wildcard_received,
            m.rss_per_linked,
            m.rss_per_device,
            m.rss_mib,
            m.old_scan_us
        );
    }
    if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        let x = |a: Cost, b: Cost| b.cpu / a.cpu;
        println!(
            "\nRouter CPU per operation, {} → {} devices: subscribe ×{:.2}, command ×{:.2}, \
             unsubscribed telemetry ×{:.2}, wildcard telemetry ×{:.2}",
            first.devices,
            last.devices,
            x(first.subscribe_us, last.subscribe_us),
            x(first.command_us, last.command_us),
            x(first.unsubscribed_us, last.unsubscribed_us),
            x(first.wildcard_us, last.wildcard_us)
        );
    }
    Ok(())
}
