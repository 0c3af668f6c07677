//! Live progress of a long request on stderr (stdout stays the result).
//!
//! On a terminal, transfers (lines that carry byte counts: binary upload in
//! `machine add`, volume copy in `service migrate`) get a progress bar per
//! target, and step lines print above the bars. Elsewhere (a pipe, a log
//! file, `TERM=dumb`) every step prints one `[target] step message` line,
//! and a transfer prints its first line only, so logs do not fill up with
//! byte counts.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use ployz_api::Progress;
use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

/// One transfer being shown: its key (step and message) and its bar.
struct Transfer {
    key: (String, String),
    bar: Option<ProgressBar>,
}

pub struct ProgressView {
    /// `None`: plain lines.
    multi: Option<MultiProgress>,
    /// The transfer each target is in, if any.
    transfers: HashMap<String, Transfer>,
}

impl ProgressView {
    /// Bars when stderr is a terminal that can draw them.
    pub fn for_stderr() -> ProgressView {
        let tty =
            std::io::stderr().is_terminal() && std::env::var("TERM").map_or(true, |t| t != "dumb");
        ProgressView::new(tty)
    }

    fn new(bars: bool) -> ProgressView {
        ProgressView {
            multi: bars.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            transfers: HashMap::new(),
        }
    }

    pub fn show(&mut self, p: &Progress) {
        for line in self.lines(p) {
            match &self.multi {
                Some(m) => {
                    let _ = m.println(line);
                }
                None => eprintln!("{line}"),
            }
        }
    }

    /// Updates the bars for `p` and returns the lines to print.
    fn lines(&mut self, p: &Progress) -> Vec<String> {
        let plain = format!("[{}] {} {}", p.target, p.step, p.message);
        let Some(done) = p.done else {
            // A step line ends the target's transfer.
            let mut out = Vec::new();
            if let Some(t) = self.transfers.remove(&p.target) {
                out.extend(t.finish(&p.target));
            }
            out.push(plain);
            return out;
        };
        let key = (p.step.clone(), p.message.clone());
        let mut out = Vec::new();
        if self.transfers.get(&p.target).is_some_and(|t| t.key != key) {
            if let Some(t) = self.transfers.remove(&p.target) {
                out.extend(t.finish(&p.target));
            }
        }
        let multi = self.multi.clone();
        let t = self.transfers.entry(p.target.clone()).or_insert_with(|| {
            let bar = multi.map(|m| m.add(new_bar(p)));
            if bar.is_none() {
                out.push(match p.total {
                    Some(total) => format!("{plain} ({})", bytes(total)),
                    None => plain.clone(),
                });
            }
            Transfer { key, bar }
        });
        if let Some(bar) = &t.bar {
            if let Some(total) = p.total {
                bar.set_length(total);
            }
            bar.set_position(done);
        }
        out
    }

    /// Clears every bar (before the result prints).
    pub fn finish(&mut self) {
        for (target, t) in std::mem::take(&mut self.transfers) {
            if let Some(line) = t.finish(&target) {
                match &self.multi {
                    Some(m) => {
                        let _ = m.println(line);
                    }
                    None => eprintln!("{line}"),
                }
            }
        }
    }
}

impl Transfer {
    /// Takes the bar down; on a terminal, one line says what moved.
    fn finish(self, target: &str) -> Option<String> {
        let bar = self.bar?;
        let line = format!(
            "[{target}] {} {}: {} in {:.1}s",
            self.key.0,
            self.key.1,
            bytes(bar.position()),
            bar.elapsed().as_secs_f64()
        );
        bar.finish_and_clear();
        Some(line)
    }
}

fn new_bar(p: &Progress) -> ProgressBar {
    let (bar, template) = match p.total {
        Some(total) => (
            ProgressBar::new(total),
            "[{prefix}] {msg} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        ),
        None => (
            ProgressBar::no_length(),
            "[{prefix}] {spinner} {msg} {bytes} {bytes_per_sec}",
        ),
    };
    let style = ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(p.target.clone());
    bar.set_message(format!("{} {}", p.step, p.message));
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// `27.3 MiB`, `512 B`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transfer(target: &str, done: u64, total: Option<u64>) -> Progress {
        Progress {
            done: Some(done),
            total,
            ..Progress::line(target, "upload", "ployzd")
        }
    }

    /// Without a terminal: step lines as they come, and a transfer only
    /// once (with its size), however many byte counts follow.
    #[test]
    fn plain_lines_print_a_transfer_once() {
        let mut v = ProgressView::new(false);
        let mut out = Vec::new();
        out.extend(v.lines(&Progress::line("a", "connect", "0.1s")));
        for done in [0, 1 << 20, 2 << 20] {
            out.extend(v.lines(&transfer("a", done, Some(3 << 20))));
            out.extend(v.lines(&transfer("b", done, None)));
        }
        let mut next = transfer("a", 10, Some(10));
        next.message = "ployzctl".into();
        out.extend(v.lines(&next));
        out.extend(v.lines(&Progress::line("a", "unit", "1.5s")));
        assert_eq!(
            out,
            [
                "[a] connect 0.1s",
                "[a] upload ployzd (3.0 MiB)",
                "[b] upload ployzd",
                "[a] upload ployzctl (10 B)",
                "[a] unit 1.5s",
            ]
        );
        assert_eq!(v.transfers.len(), 1, "b's transfer is still open");
        v.finish();
        assert!(v.transfers.is_empty());
    }

    /// With bars: a transfer's lines move its bar; it ends with one line
    /// saying what moved when the target's next step comes.
    #[test]
    fn bars_follow_transfers_and_end_with_a_summary() {
        let mut v = ProgressView {
            multi: Some(MultiProgress::with_draw_target(ProgressDrawTarget::hidden())),
            transfers: HashMap::new(),
        };
        assert!(v.lines(&transfer("a", 0, Some(4096))).is_empty());
        assert!(v.lines(&transfer("a", 2048, Some(4096))).is_empty());
        let bar = v.transfers["a"].bar.clone().unwrap();
        assert_eq!((bar.position(), bar.length()), (2048, Some(4096)));
        let out = v.lines(&Progress::line("a", "unit", "2.0s"));
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(
            out[0].starts_with("[a] upload ployzd: 2.0 KiB in "),
            "{out:?}"
        );
        assert_eq!(out[1], "[a] unit 2.0s");
        assert!(bar.is_finished());
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(27 * 1024 * 1024 + 300 * 1024), "27.3 MiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
    }
}
