//! `chanserv post`'s progress on stderr: a live line (indicatif) when stderr is a
//! terminal; otherwise a plain line per source as it ends and one at the end, so logs
//! and scripts get the same facts. `--quiet`: nothing.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::output::Stats;

/// The live line appears once a request has run this long.
const SHOW_AFTER: Duration = Duration::from_millis(500);

pub struct Progress {
    bar: Option<ProgressBar>,
    /// Plain lines (stderr is not a terminal and not `--quiet`).
    plain: bool,
    /// stdout shares the terminal with the live line: clear it around each write.
    stdout_tty: bool,
    /// Whether the live line is drawn yet (after [`SHOW_AFTER`]).
    shown: bool,
    started: Instant,
    sources: usize,
    ended: usize,
    failed: usize,
    bytes: u64,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        let live = !quiet && std::io::stderr().is_terminal();
        let bar = live.then(|| {
            // Hidden at first: a request done in a moment leaves no line behind.
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
            // The template is a constant: it parses.
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} {binary_bytes} ({binary_bytes_per_sec}) {msg} [{elapsed}]",
            ) {
                bar.set_style(style);
            }
            bar
        });
        Progress {
            bar,
            plain: !quiet && !live,
            stdout_tty: std::io::stdout().is_terminal(),
            shown: false,
            started: Instant::now(),
            sources: 0,
            ended: 0,
            failed: 0,
            bytes: 0,
        }
    }

    /// Runs `f`, which writes to stdout, with the live line out of its way.
    pub fn around<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.bar {
            Some(b) if self.stdout_tty => b.suspend(f),
            _ => f(),
        }
    }

    /// Draws the live line once the request has run for [`SHOW_AFTER`].
    fn show(&mut self) {
        if let Some(b) = &self.bar {
            if !self.shown && self.started.elapsed() >= SHOW_AFTER {
                self.shown = true;
                b.set_draw_target(ProgressDrawTarget::stderr());
                b.enable_steady_tick(Duration::from_millis(100));
            }
        }
    }

    fn message(&self) -> String {
        let mut m = format!("{} sources, {} ended", self.sources, self.ended);
        if self.failed > 0 {
            m.push_str(&format!(", {} failed", self.failed));
        }
        m
    }

    pub fn source_started(&mut self) {
        self.sources += 1;
        self.show();
        if let Some(b) = &self.bar {
            b.set_message(self.message());
        }
    }

    pub fn frame(&mut self, len: usize) {
        self.bytes += len as u64;
        self.show();
        if let Some(b) = &self.bar {
            b.inc(len as u64);
        }
    }

    pub fn source_ended(&mut self, i: usize, header: &[u8], s: Stats, error: Option<&str>) {
        self.ended += 1;
        if error.is_some() {
            self.failed += 1;
        }
        let header = String::from_utf8_lossy(header);
        let how = match error {
            None => "done".to_owned(),
            Some(e) => format!("failed: {}", crate::one_line(e)),
        };
        let line = format!(
            "source {i} {header:?}: {} frames, {} bytes, {how}",
            s.frames, s.bytes
        );
        match &self.bar {
            Some(b) => {
                b.set_message(self.message());
                match (error, self.shown) {
                    (None, _) => {}
                    (Some(_), true) => b.println(line),
                    (Some(_), false) => eprintln!("{line}"),
                }
            }
            None if self.plain => eprintln!("{line}"),
            None => {}
        }
    }

    /// The last line: counts, bytes, time. None when the request failed: the error
    /// line that follows says so.
    pub fn finish(&mut self, sources: usize, failed: usize, request_failed: bool) {
        let secs = self.started.elapsed().as_secs_f64();
        let line = format!(
            "{sources} sources ({failed} failed), {} bytes in {secs:.3} s",
            self.bytes
        );
        let live = self.bar.take().map(|b| b.finish_and_clear()).is_some();
        if !request_failed && (self.plain || live) {
            eprintln!("{line}");
        }
    }
}
