//! Ledger benchmark: durable activations/s with flush-per-activation (the
//! baseline) and with group commit at 1, 64 and 512 concurrent requesters,
//! plus fast-path reconnect checks/s. Prints one table from one run, with
//! its settings. "Durable" is what the ledger does before any answer:
//! sled's flush, then fdatasync of the store's files (and fsync of the
//! directory when sled created a file), once per batch.
//!
//! `cargo run --release --bin ledger-bench -- [--seconds 3] [--dir DIR]`

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use activation_broker::clock::Clock;
use activation_broker::ledger::{AuthMode, Command, Ledger, LedgerOptions};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Benchmark the activation ledger")]
struct Args {
    /// Seconds each measurement runs.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Where the benchmark stores are created (removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Requester counts to measure.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 64, 512])]
    requesters: Vec<usize>,
}

fn fresh(dir: &std::path::Path, name: &str, max_batch: usize) -> anyhow::Result<Ledger> {
    let path = dir.join(name);
    let _ = std::fs::remove_dir_all(&path);
    let ledger = Ledger::open(
        &path,
        LedgerOptions {
            max_batch,
            ..LedgerOptions::default()
        },
        Clock::system(),
        Default::default(),
    )?;
    ledger.execute_blocking(
        Command::CreateProduct {
            product_key: "bench".into(),
            name: "Bench".into(),
            auth_mode: AuthMode::ProductSecret,
        },
        None,
    )?;
    ledger.execute_blocking(
        Command::CreateOrder {
            order_id: None,
            quantity: 50_000_000,
            validity_secs: 86_400,
            product_key: Some("bench".into()),
        },
        None,
    )?;
    Ok(ledger)
}

/// Durable activations/s with `requesters` concurrent tasks, each
/// activating new devices until time is up.
fn activations(ledger: &Ledger, requesters: usize, seconds: f64) -> anyhow::Result<(u64, f64)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for r in 0..requesters {
            let l = ledger.clone();
            let done = done.clone();
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let dk = format!("r{r}-{n}");
                    n += 1;
                    match l.connect("bench", &dk).await {
                        Ok(a) if a.consumed.is_some() => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(e) => return Err(anyhow::anyhow!("activation refused: {e}")),
                    }
                }
                Ok(())
            }));
        }
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await??;
        }
        anyhow::Ok(())
    })?;
    let elapsed = start.elapsed().as_secs_f64();
    Ok((done.load(Ordering::Relaxed), elapsed))
}

/// Fast-path reconnect checks/s on two threads over `devices` active devices.
fn reconnects(ledger: &Ledger, keys: Vec<String>, seconds: f64) -> (u64, f64) {
    let keys = Arc::new(keys);
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let l = ledger.clone();
            let keys = keys.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..1024 {
                        let ok = l.connect_blocking("bench", &keys[i % keys.len()]);
                        assert!(
                            matches!(ok, Ok(ref a) if a.consumed.is_none()),
                            "reconnect must not consume"
                        );
                        i += 7;
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    let total = threads.into_iter().map(|t| t.join().unwrap_or(0)).sum();
    (total, start.elapsed().as_secs_f64())
}

/// The file system holding `dir` (type and source, from the longest mount
/// point of /proc/self/mountinfo that contains it).
fn file_system(dir: &std::path::Path) -> String {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return "file system unknown".into();
    };
    info.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dash = f.iter().position(|w| *w == "-")?;
            let (point, kind, source) = (f.get(4)?, f.get(dash + 1)?, f.get(dash + 2)?);
            dir.starts_with(point)
                .then(|| (point.len(), format!("{kind} {source}")))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, fs)| fs)
        .unwrap_or_else(|| "file system unknown".into())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let base = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("ledger-bench-{}", std::process::id())),
    };
    std::fs::create_dir_all(&base)?;
    println!(
        "ledger-bench: {} s per measurement, store under {} ({}), {} cores; \
         durable = sled flush + fdatasync of the store's files per batch",
        args.seconds,
        base.display(),
        file_system(&base),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    println!();
    println!("| mode | requesters | activations | seconds | activations/s | vs baseline |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut group_ledger = None;
    let mut last_requesters = 1;
    for &r in &args.requesters {
        let baseline = fresh(&base, &format!("baseline-{r}"), 1)?;
        let (n_b, s_b) = activations(&baseline, r, args.seconds)?;
        baseline.check_invariants().map_err(anyhow::Error::msg)?;
        drop(baseline);
        let rate_b = n_b as f64 / s_b;
        println!("| flush per activation | {r} | {n_b} | {s_b:.2} | {rate_b:.0} | 1.00x |");
        let group = fresh(
            &base,
            &format!("group-{r}"),
            LedgerOptions::default().max_batch,
        )?;
        let (n_g, s_g) = activations(&group, r, args.seconds)?;
        group.check_invariants().map_err(anyhow::Error::msg)?;
        let rate_g = n_g as f64 / s_g;
        println!(
            "| group commit | {r} | {n_g} | {s_g:.2} | {rate_g:.0} | {:.2}x |",
            rate_g / rate_b.max(1e-9)
        );
        group_ledger = Some(group);
        last_requesters = r;
    }
    if let Some(g) = group_ledger {
        // Up to 10,000 devices the group-commit run activated.
        let mut keys = Vec::new();
        'collect: for r in 0..last_requesters {
            for n in 0.. {
                let dk = format!("r{r}-{n}");
                if g.valid_until("bench", &dk).is_none() {
                    break;
                }
                keys.push(dk);
                if keys.len() == 10_000 {
                    break 'collect;
                }
            }
        }
        let active = keys.len();
        if active > 0 {
            let (n, s) = reconnects(&g, keys, args.seconds);
            println!();
            println!("| fast path | devices | checks | seconds | checks/s |");
            println!("|---|---:|---:|---:|---:|");
            println!(
                "| reconnect of an active device (2 threads) | {active} | {n} | {s:.2} | {:.0} |",
                n as f64 / s
            );
        }
    }
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&base);
    }
    Ok(())
}
