//! The log: `tracing` events to stderr, as text (no ANSI colours unless
//! stderr is a terminal and `NO_COLOR` is unset) or as one JSON object per
//! line. The filter is `RUST_LOG` if set, else `[log] level` of the config.

use std::io::IsTerminal;

use serde::Deserialize;
use tracing_subscriber::EnvFilter;

/// The `[log]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// An `EnvFilter` directive, e.g. `info,rumqttd=warn` or
    /// `debug,activation_broker::gate=trace`. `RUST_LOG` overrides it.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The level when neither `RUST_LOG` nor `[log] level` says otherwise.
pub const DEFAULT_LEVEL: &str = "info,rumqttd=warn";

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            level: DEFAULT_LEVEL.into(),
            format: LogFormat::Text,
        }
    }
}

impl LogSection {
    /// Checks the level directive; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        EnvFilter::try_new(&self.level)
            .map(drop)
            .map_err(|e| format!("log.level {:?}: {e}", self.level))
    }
}

/// Installs the global subscriber (once per process). A bad `RUST_LOG` is
/// reported and the configured level used instead.
pub fn init(section: &LogSection) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(&v).unwrap_or_else(|e| {
            eprintln!(
                "warning: RUST_LOG={v:?} is not a valid filter ({e}); using {:?}",
                section.level
            );
            configured(section)
        }),
        _ => configured(section),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match section.format {
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
        LogFormat::Text => builder.with_ansi(colours()).try_init(),
    };
    if let Err(e) = result {
        eprintln!("warning: logging was already set up: {e}");
    }
}

fn configured(section: &LogSection) -> EnvFilter {
    EnvFilter::try_new(&section.level).unwrap_or_else(|_| EnvFilter::new(DEFAULT_LEVEL))
}

/// ANSI colours only for a person at a terminal.
fn colours() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
