//! `activation-broker`: the broker (`serve`) and its operator tools.

use std::path::PathBuf;
use std::process::ExitCode;

use activation_broker::admin::{self, cli::AdminCliArgs};
use activation_broker::clock::Clock;
use activation_broker::config::Config;
use activation_broker::credentials::{client_id, device_credentials};
use activation_broker::ledger::{AuthMode, Command, LedgerError};
use activation_broker::server::Broker;
use anyhow::Context;
use clap::{Parser, Subcommand};

/// jemalloc instead of glibc malloc: every device holds a router link
/// whose rumqttd buffers are allocated at full capacity (~180 KB) but
/// mostly never written. jemalloc keeps allocation metadata out of line, so
/// the untouched pages of those buffers never become resident (glibc's
/// chunk headers touch two pages per buffer), and its background thread
/// returns the pages of closed connections to the OS. RSS per idle
/// connected device: ~41 KB → ~28 KB (connect-bench, 10,000 devices).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc options: purge freed pages from a background thread, so an idle
/// broker gives back the memory of devices that left.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8; 23] = b"background_thread:true\0";

#[derive(Parser)]
#[command(
    name = "activation-broker",
    version,
    about = "MQTT broker whose every device connection is gated by an activation code"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the broker.
    Serve {
        /// Configuration file (default: the embedded config/activation-broker.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Data directory (overrides `data_dir`).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Create a demo product with codes and print how to connect a device.
        #[arg(long)]
        demo: bool,
    },
    /// The configuration file: `--print-default` prints the embedded
    /// default (every key, its default and its meaning), a starting point
    /// for `serve --config FILE`.
    Config {
        /// Print the embedded default configuration.
        #[arg(long, required = true)]
        print_default: bool,
    },
    /// Operator CLI: run an admin action over the admin topics, `events`
    /// to stream events, or `actions` to list them.
    Admin(AdminCliArgs),
    /// Restore the ledger from a backup (`admin BackupLedger` or `backup`)
    /// into a data directory whose broker is stopped. The backup is checked
    /// whole first; a store in use by a running broker is refused, and any
    /// other existing store too unless `--force` (it is then moved aside,
    /// not deleted).
    Restore {
        /// The backup file.
        #[arg(long)]
        from: PathBuf,
        /// The broker's data directory (the ledger is its `ledger/`).
        #[arg(long, alias = "data")]
        data_dir: PathBuf,
        /// Replace an existing store (moved aside to `ledger.replaced-<time>`).
        #[arg(long)]
        force: bool,
    },
    /// Back up the ledger of a stopped broker to a new file (a running
    /// broker is backed up with `admin BackupLedger`).
    Backup {
        /// The broker's data directory.
        #[arg(long, alias = "data")]
        data_dir: PathBuf,
        /// The backup file to create (never replaces a file).
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the argon2 hash of a password (from --password or stdin) for `[[accounts]]`.
    HashPassword {
        #[arg(long)]
        password: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `serve` logs as its config says; the other commands at the default.
    let config = match &cli.command {
        Cmd::Serve { config, .. } => match load_config(config.as_deref()) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("error: {}", describe(&e));
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    activation_broker::logging::init(&config.as_ref().map(|c| c.log.clone()).unwrap_or_default());
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Cmd::Serve { data, demo, .. } => match config {
            Some(config) => rt.block_on(serve(config, data, demo)),
            None => Ok(ExitCode::FAILURE),
        },
        Cmd::Config { .. } => {
            print!("{}", activation_broker::config::DEFAULT_CONFIG);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Restore {
            from,
            data_dir,
            force,
        } => restore(&from, &data_dir, force),
        Cmd::Backup { data_dir, out } => backup(&data_dir, &out),
        Cmd::Admin(args) => rt.block_on(admin::cli::run(args)).map(exit_code),
        Cmd::HashPassword { password } => {
            admin::cli::hash_password_command(password).map(exit_code)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause once: an error that
/// prints its source itself is not followed by that source again.
fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// The ledger's directory in a data directory.
fn ledger_dir(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join(activation_broker::server::LEDGER_DIR)
}

fn restore(
    from: &std::path::Path,
    data_dir: &std::path::Path,
    force: bool,
) -> anyhow::Result<ExitCode> {
    let dir = ledger_dir(data_dir);
    let r = activation_broker::ledger::restore(from, &dir, force)?;
    println!(
        "restored {} records (store format version {}, taken at {} UTC) from {} into {}",
        r.records,
        r.format_version,
        activation_broker::clock::format_time(r.taken_at),
        from.display(),
        dir.display()
    );
    if let Some(aside) = r.moved_aside {
        println!("the store it replaced was moved to {}", aside.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn backup(data_dir: &std::path::Path, out: &std::path::Path) -> anyhow::Result<ExitCode> {
    let dir = ledger_dir(data_dir);
    let info = activation_broker::ledger::backup_stopped(&dir, out)?;
    println!(
        "backed up {} records (store format version {}, {} bytes, sha256 {}) from {} to {}",
        info.records,
        info.format_version,
        info.bytes,
        info.sha256,
        dir.display(),
        info.path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Longest graceful stop of the sessions (their wills out) at SIGTERM/SIGINT.
const STOP_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Exit status after the ledger's store failed (see `Ledger::failed`).
const STORE_FAILED: u8 = 3;
/// Time for in-flight answers to go out before that exit.
const STORE_FAILED_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// The config file, or the embedded default.
fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(path) => Config::load(path)?,
        None => Config::embedded()?,
    })
}

async fn serve(mut config: Config, data: Option<PathBuf>, demo: bool) -> anyhow::Result<ExitCode> {
    // Installed first: a stop request during start-up is graceful too.
    let stop = stop_signal()?;
    if let Some(d) = data {
        config.data_dir = d;
    }
    match activation_client::limits::raise_open_file_limit() {
        Ok(n) => tracing::info!(open_files = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let broker = Broker::start(config, Clock::system()).await?;
    let addr = broker.device_addr();
    tracing::info!(%addr, data = %broker.config.data_dir.display(), "devices listener ready");
    if demo {
        print_demo(&broker).await?;
    }
    tokio::select! {
        sig = stop => tracing::info!(signal = sig, "stop requested"),
        e = broker.ledger.failed() => {
            // Fail-stop: a restart by the supervisor reads what the disk holds.
            tracing::error!(error = %e, "the ledger's store failed; exiting");
            // Connections go on for a moment, so that the refusals already
            // decided (0x88) reach their clients; every write is refused.
            tokio::time::sleep(STORE_FAILED_GRACE).await;
            broker.shutdown();
            return Ok(ExitCode::from(STORE_FAILED));
        }
    }
    tracing::info!("shutting down");
    let stopped = broker.stop(STOP_LIMIT).await;
    tracing::info!(
        devices = stopped.devices,
        accounts = stopped.others,
        wills = stopped.wills,
        complete = stopped.complete,
        "sessions ended"
    );
    broker.ledger.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves at the first SIGTERM (systemd, Docker, Kubernetes) or SIGINT
/// (Ctrl-C) with the signal's name. The handlers are installed before this
/// returns, so a signal that arrives after start-up is never the default
/// (abrupt) termination.
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = &'static str>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}

const DEMO_PRODUCT: &str = "demo";

async fn print_demo(broker: &Broker) -> anyhow::Result<()> {
    let ledger = &broker.ledger;
    let secret = match ledger.product(DEMO_PRODUCT) {
        Ok(p) => p.secret,
        Err(LedgerError::ProductNotFound(_)) => {
            ledger
                .execute(
                    Command::CreateProduct {
                        product_key: DEMO_PRODUCT.into(),
                        name: "Demo product".into(),
                        auth_mode: AuthMode::ProductSecret,
                    },
                    Some("demo-product".into()),
                )
                .await?;
            ledger
                .execute(
                    Command::CreateOrder {
                        order_id: Some("demo-order".into()),
                        quantity: 10_000,
                        validity_secs: 365 * 24 * 3600,
                        product_key: Some(DEMO_PRODUCT.into()),
                    },
                    Some("demo-order".into()),
                )
                .await?;
            ledger.product(DEMO_PRODUCT)?.secret
        }
        Err(e) => return Err(e.into()),
    };
    let p = ledger.product(DEMO_PRODUCT)?;
    let addr = broker.device_addr();
    let port = addr.port();
    let dk = "device-1";
    let (user, pass) = device_credentials(DEMO_PRODUCT, dk, &secret, broker.clock.now());
    println!(
        "demo product {DEMO_PRODUCT}: {} codes available, ProductSecret {secret}",
        p.available()
    );
    println!();
    println!("connect a device (credentials valid for 300 s):");
    println!(
        "  mosquitto_pub -h 127.0.0.1 -p {port} -V mqttv311 -i '{}' -u '{user}' -P '{pass}' -t 'devices/{DEMO_PRODUCT}/{dk}/telemetry' -m '{{\"temp\":21.5}}'",
        client_id(DEMO_PRODUCT, dk)
    );
    println!();
    println!("or compute fresh credentials in the shell:");
    println!("  SECRET={secret}; DK={dk}; U=\"{DEMO_PRODUCT}&$DK&$(date +%s%3N)\"");
    println!("  P=$(printf %s \"$U\" | openssl dgst -sha256 -hmac \"$SECRET\" | cut -d' ' -f2)");
    println!("  mosquitto_pub -h 127.0.0.1 -p {port} -i \"{DEMO_PRODUCT}.$DK\" -u \"$U\" -P \"$P\" -t \"devices/{DEMO_PRODUCT}/$DK/telemetry\" -m hello");
    println!();
    println!("flood it with simulated devices:");
    println!(
        "  activation-sim flood --port {port} --product-key {DEMO_PRODUCT} --product-secret {secret} --devices 2000 --rate 1000"
    );
    Ok(())
}
