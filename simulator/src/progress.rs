//! Live progress on stderr (indicatif), or JSON lines on stdout for a worker
//! process whose parent aggregates them.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;

use crate::report::Progress;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Bar,
    JsonLines,
    Hidden,
}

/// A running progress display; stop it with [`Ticker::finish`].
pub struct Ticker {
    task: JoinHandle<()>,
    bar: Option<ProgressBar>,
}

impl Ticker {
    /// Samples `source` every 200 ms. `total` sets the bar length.
    pub fn start(
        mode: Mode,
        label: &str,
        total: Option<u64>,
        source: Arc<dyn Fn() -> Progress + Send + Sync>,
    ) -> Ticker {
        let bar = (mode == Mode::Bar).then(|| {
            let bar = match total {
                Some(n) => ProgressBar::new(n),
                None => ProgressBar::new_spinner(),
            };
            bar.set_draw_target(ProgressDrawTarget::stderr_with_hz(5));
            let template = if total.is_some() {
                "{prefix:>9} {elapsed_precise} [{bar:30}] {pos}/{len} {msg}"
            } else {
                "{prefix:>9} {elapsed_precise} {spinner} {pos} attempted {msg}"
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(label.to_owned());
            bar
        });
        let task_bar = bar.clone();
        let task = tokio::spawn(async move {
            let mut last = (Instant::now(), 0u64);
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            let mut n = 0u64;
            loop {
                tick.tick().await;
                n += 1;
                let p = source();
                match mode {
                    Mode::Bar => {
                        if let Some(bar) = &task_bar {
                            let now = Instant::now();
                            let dt = now.duration_since(last.0).as_secs_f64();
                            // Rate over the last second or so.
                            if dt >= 1.0 || n == 1 {
                                let rate = if dt > 0.0 {
                                    p.attempted.saturating_sub(last.1) as f64 / dt
                                } else {
                                    0.0
                                };
                                last = (now, p.attempted);
                                bar.set_message(message(&p, rate));
                            }
                            bar.set_position(p.attempted);
                        }
                    }
                    Mode::JsonLines => {
                        // Every 0.4 s is plenty for the parent's bar.
                        if n.is_multiple_of(2) {
                            if let Ok(line) = serde_json::to_string(&p) {
                                let mut out = std::io::stdout().lock();
                                let _ = writeln!(out, "{line}");
                                let _ = out.flush();
                            }
                        }
                    }
                    Mode::Hidden => {}
                }
            }
        });
        Ticker { task, bar }
    }

    pub fn finish(self, last: Progress) {
        self.task.abort();
        if let Some(bar) = self.bar {
            bar.set_position(last.attempted);
            bar.finish_with_message(message(&last, 0.0));
        }
    }
}

fn message(p: &Progress, rate: f64) -> String {
    let mut m = format!(
        "accepted {} refused {} errors {} timeouts {}",
        p.accepted, p.refused, p.errors, p.timeouts
    );
    if rate > 0.0 {
        m.push_str(&format!(" | {rate:.0} connects/s"));
    }
    if p.msgs_sent > 0 {
        m.push_str(&format!(
            " | msgs {} sent {} acked",
            p.msgs_sent, p.msgs_acked
        ));
    }
    m
}
