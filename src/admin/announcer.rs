//! The near-expiry announcer: announces `device/expiring`, exactly once per
//! code, when a live device's current code enters the near-expiry window.
//!
//! It calls [`Ledger::take_expiring`], which durably marks each code and
//! publishes the event itself, every `scan_interval` and also exactly when
//! the next code enters the window. Time is the ledger's injected
//! [`Clock`](crate::clock::Clock), so tests drive it by advancing a manual clock.

use tokio::task::JoinHandle;

use crate::clock::Millis;
use crate::ledger::Ledger;

pub struct Announcer {
    pub ledger: Ledger,
    /// The near-expiry window (default 30 days).
    pub window_ms: Millis,
    /// Longest wait between two scans.
    pub scan_interval_ms: Millis,
}

impl Announcer {
    pub fn new(ledger: Ledger, near_expiry_days: u64, scan_interval_secs: u64) -> Self {
        Announcer {
            ledger,
            window_ms: super::days_ms(near_expiry_days),
            scan_interval_ms: (scan_interval_secs.clamp(1, 86_400) as Millis) * 1000,
        }
    }

    pub fn spawn(self) -> JoinHandle<()> {
        tokio::spawn(self.run())
    }

    pub async fn run(self) {
        let clock = self.ledger.clock().clone();
        loop {
            match self.ledger.take_expiring(self.window_ms).await {
                Ok(codes) if !codes.is_empty() => {
                    tracing::info!(count = codes.len(), "announced device/expiring");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "near-expiry scan failed"),
            }
            let now = clock.now();
            let horizon = now.saturating_add(self.window_ms);
            let ledger = self.ledger.clone();
            // The next code to enter the window does so at its expiry - window.
            let next_entry = tokio::task::spawn_blocking(move || ledger.next_expiry_after(horizon))
                .await
                .ok()
                .flatten()
                .map(|e| e.saturating_sub(self.window_ms));
            let mut wake = now.saturating_add(self.scan_interval_ms);
            if let Some(at) = next_entry {
                wake = wake.min(at.max(now.saturating_add(1)));
            }
            clock.sleep_until(wake).await;
        }
    }
}
