//! The fuzzed broker's panics: recorded by a panic hook, reported by the
//! runs.

use super::*;

pub(super) static HOOK: Once = Once::new();
pub(super) static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Records the panics (message and location) of threads that are not
/// another test's, and prints all but the decoder's.
pub(super) fn install_panic_hook() {
    HOOK.call_once(|| {
        if let Ok(filter) = std::env::var("FUZZ_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_writer(std::io::stderr)
                .try_init();
        }
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let loc = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            // The tests share one process: the other tests' own threads
            // (`module::test`) are not the fuzzed broker's. Its decoder's
            // panics (caught on purpose) are recorded, not printed.
            let thread = std::thread::current();
            let name = thread.name().unwrap_or_default();
            if !name.contains("::") || name.starts_with("fuzz::") {
                if let Ok(mut p) = PANICS.lock() {
                    p.push(format!("{msg} at {loc}"));
                }
            }
            if !decoder_panic(&msg, &loc) {
                default(info);
            }
        }));
    });
}

/// Panics other than those of rumqttd's packet decoder, which the gateway
/// runs under `catch_unwind` on purpose (they end that one connection).
pub(super) fn unexpected_panics() -> Vec<String> {
    PANICS
        .lock()
        .map(|p| {
            p.iter()
                .filter(|m| !decoder_panic(m, ""))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// A panic of rumqttd's packet decoder (its message or location).
pub(super) fn decoder_panic(msg: &str, loc: &str) -> bool {
    let m = format!("{msg} at {loc}");
    m.contains("rumqttd") && m.contains("protocol")
}

pub(super) fn all_panics() -> Vec<String> {
    PANICS.lock().map(|p| p.clone()).unwrap_or_default()
}
