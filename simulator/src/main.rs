//! `activation-sim`: see the crate docs and SPEC §5.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use activation_simulator::cli::{Cli, Command, WORKER_SPEC_ENV};
use activation_simulator::report::check_expectations;
use activation_simulator::scenarios::setup;
use activation_simulator::Stop;
use clap::Parser;

/// Waits for SIGINT (Ctrl-C) or SIGTERM; `false` if neither can be watched.
async fn interrupt_or_terminate() -> bool {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return false;
    };
    tokio::select! {
        _ = int.recv() => true,
        _ = term.recv() => true,
    }
}

fn main() -> ExitCode {
    // A worker process gets its command from its parent, as JSON.
    let command = match std::env::var(WORKER_SPEC_ENV) {
        Ok(spec) => match serde_json::from_str::<Command>(&spec) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {WORKER_SPEC_ENV} is not a worker's command: {e}");
                return ExitCode::from(1);
            }
        },
        Err(_) => Cli::parse().command,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async_main(command))
}

async fn async_main(cmd: Command) -> ExitCode {
    if let Command::Setup(args) = &cmd {
        return match setup::run(args).await {
            Ok(r) => {
                println!("product: {} ({})", r.product_key, r.auth_mode);
                if let Some(s) = &r.product_secret {
                    println!("product secret: {s}");
                }
                if !r.device_secrets.is_empty() {
                    println!(
                        "device secrets: {} devices written to {}",
                        r.device_secrets.len(),
                        args.secrets_out.display()
                    );
                }
                println!("order: {}", r.order);
                println!("run: {}", r.flood_command);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    let stop = Stop::new();
    let interrupted = Arc::new(AtomicBool::new(false));
    // A worker may get SIGINT twice (terminal and parent): it only stops.
    let worker = cmd.common().is_some_and(|c| c.worker_mode);
    {
        let stop = stop.clone();
        let interrupted = interrupted.clone();
        tokio::spawn(async move {
            if !interrupt_or_terminate().await {
                return;
            }
            interrupted.store(true, Ordering::SeqCst);
            stop.stop();
            if worker {
                return;
            }
            eprintln!("interrupted: disconnecting; Ctrl-C again to quit at once");
            if interrupt_or_terminate().await {
                std::process::exit(130);
            }
        });
    }
    let report = match activation_simulator::run_until(cmd.clone(), stop).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(1);
        }
    };
    let Some(common) = cmd.common() else {
        return ExitCode::from(1);
    };
    if let Err(e) = activation_simulator::write_json(&report, &cmd) {
        eprintln!("error: {e:#}");
        return ExitCode::from(1);
    }
    if common.worker_mode {
        return ExitCode::SUCCESS;
    }
    let show_initial = matches!(&cmd, Command::Storm(a) if a.show_initial);
    if show_initial {
        print!("{}", report.table());
    } else {
        let mut shown = report.clone();
        shown.initial_phase = None;
        print!("{}", shown.table());
    }
    if interrupted.load(Ordering::SeqCst) {
        println!("(interrupted: partial results)");
        return ExitCode::from(130);
    }
    let failures = check_expectations(&report, &common.expect);
    if failures.is_empty() {
        if !common.expect.is_empty() {
            println!("expectations: all {} met", common.expect.len());
        }
        ExitCode::SUCCESS
    } else {
        for f in &failures {
            println!("expectation failed: {f}");
        }
        ExitCode::from(2)
    }
}
