//! Markdown tables with their settings printed above them, and the cells
//! both benches share. Every cell is a figure the bench measured.

use super::load::Phase;

/// A markdown table: a title, the settings it was measured with, the rows,
/// and notes under it.
pub struct Table {
    title: String,
    settings: Vec<String>,
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
    notes: Vec<String>,
}

impl Table {
    /// The first column is left-aligned, the others right-aligned.
    pub fn new(title: &str, headers: &[&str]) -> Self {
        Table {
            title: title.to_owned(),
            settings: Vec::new(),
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// A line of the settings printed above the table.
    pub fn setting(&mut self, s: impl Into<String>) -> &mut Self {
        self.settings.push(s.into());
        self
    }

    pub fn row(&mut self, cells: Vec<String>) -> &mut Self {
        self.rows.push(cells);
        self
    }

    /// A line printed under the table.
    pub fn note(&mut self, s: impl Into<String>) -> &mut Self {
        self.notes.push(s.into());
        self
    }

    pub fn print(&self) {
        println!();
        println!("#### {}", self.title);
        println!();
        for s in &self.settings {
            println!("- {s}");
        }
        if !self.settings.is_empty() {
            println!();
        }
        println!("| {} |", self.headers.join(" | "));
        let align: Vec<&str> = (0..self.headers.len())
            .map(|i| if i == 0 { "---" } else { "---:" })
            .collect();
        println!("|{}|", align.join("|"));
        for r in &self.rows {
            println!("| {} |", r.join(" | "));
        }
        if !self.notes.is_empty() {
            println!();
        }
        for n in &self.notes {
            println!("- {n}");
        }
    }
}

/// Headers of [`phase_cells`].
pub const PHASE_HEADERS: [&str; 10] = [
    "target",
    "in flight",
    "devices",
    "failed",
    "seconds",
    "per second",
    "p50 ms",
    "p99 ms",
    "listen drops",
    "server CPU µs each",
];

/// The measured figures of a connect (and subscribe) phase.
pub fn phase_cells(p: &Phase) -> Vec<String> {
    vec![
        p.label.clone(),
        p.in_flight.to_string(),
        p.accepted.to_string(),
        p.failures().to_string(),
        format!("{:.2}", p.elapsed.as_secs_f64()),
        format!("{:.0}", p.rate()),
        format!("{:.2}", p.ms(0.5)),
        format!("{:.2}", p.ms(0.99)),
        p.listen_drops.to_string(),
        format!("{:.0}", p.server_us()),
    ]
}

/// `x / y` as "1.23x", or empty if either is missing or `y` is zero.
pub fn ratio(x: Option<f64>, y: Option<f64>) -> String {
    match (x, y) {
        (Some(x), Some(y)) if y > 0.0 => format!("{:.2}x", x / y),
        _ => String::new(),
    }
}

/// Notes every table of connect phases needs.
pub fn phase_notes(t: &mut Table, phases: &[&Phase]) {
    for p in phases {
        if let Some(n) = p.failure_note() {
            t.note(n);
        }
    }
    let client: f64 = phases.iter().map(|p| p.client_cpu).sum();
    let secs: f64 = phases.iter().map(|p| p.elapsed.as_secs_f64()).sum();
    t.note(format!(
        "server CPU µs each: user + system CPU of the server process during the phase / accepted devices (the client used {:.0} % of one core on average).",
        100.0 * client / secs.max(1e-9)
    ));
    t.note("listen drops: TcpExt ListenDrops during the phase (connections whose SYN or handshake a full accept queue dropped; the client retransmits after 1 s), counted for the whole machine.");
}

/// KB → MB with one decimal.
pub fn mb(kb: u64) -> String {
    format!("{:.1}", kb as f64 / 1024.0)
}

/// (after − before) / devices, in KB with one decimal.
pub fn kb_per(before_kb: u64, after_kb: u64, devices: u64) -> String {
    format!(
        "{:.1}",
        after_kb.saturating_sub(before_kb) as f64 / devices.max(1) as f64
    )
}

/// A server's VmRSS before and with a phase's devices connected.
pub struct Rss {
    pub label: String,
    pub devices: u64,
    pub before_kb: u64,
    pub after_kb: u64,
}

impl Rss {
    /// (after − before) / devices, in KB.
    pub fn per_device(&self) -> f64 {
        self.after_kb.saturating_sub(self.before_kb) as f64 / self.devices.max(1) as f64
    }
}

/// The RSS-per-device table titled `title`, its first column headed
/// `first`: one row per reading (the caller adds settings and notes).
pub fn rss_table(title: &str, first: &str, rss: &[Rss]) -> Table {
    let mut t = Table::new(
        title,
        &[
            first,
            "devices",
            "before MB",
            "with devices MB",
            "KB per device",
        ],
    );
    for s in rss {
        t.row(vec![
            s.label.clone(),
            s.devices.to_string(),
            mb(s.before_kb),
            mb(s.after_kb),
            kb_per(s.before_kb, s.after_kb, s.devices),
        ]);
    }
    t
}

/// The median of `xs` (the mean of the middle two of an even count), or
/// `None` if there are none.
pub fn median(xs: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = xs.into_iter().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_even_and_no_values() {
        assert_eq!(median([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median([4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(std::iter::empty()), None);
    }
}
