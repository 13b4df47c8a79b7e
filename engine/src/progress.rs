//! Renderers for the solver's progress [`Event`]s (`--progress`).
//!
//! - `plain`: like buildx's plain output — vertices numbered in the order
//!   they appear: `#3 [build 2/4] RUN make`, `#3 0.512 output line`,
//!   `#3 CACHED`, `#3 DONE 0.3s`, `#3 ERROR: ...`.
//! - `json`: one event per line, as the solver emits it (for tools).
//! - `tty`: a live view (indicatif) with one line per running step, its
//!   elapsed time and the last line of its output; finished steps scroll
//!   above it in the plain format.
//! - `auto`: `tty` when stderr is a terminal, else `plain`.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use kiln_solver::Event;
use tokio::sync::mpsc::UnboundedReceiver;

/// `--progress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// `tty` on a terminal, `plain` otherwise.
    Auto,
    /// Live view.
    Tty,
    /// buildx-style plain text.
    Plain,
    /// One JSON event per line.
    Json,
    /// Nothing while it runs; when a step fails, the whole plain log (as
    /// `docker build -q`, which then shows what went wrong).
    Quiet,
}

/// Render `events` to stderr until the stream ends.
pub async fn render(mode: ProgressMode, mut events: UnboundedReceiver<Event>) {
    let mode = match mode {
        ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Tty,
        ProgressMode::Auto => ProgressMode::Plain,
        m => m,
    };
    match mode {
        ProgressMode::Tty => render_tty(events).await,
        ProgressMode::Json => {
            while let Some(e) = events.recv().await {
                let _ = writeln!(std::io::stderr().lock(), "{}", json_line(&e));
            }
        }
        ProgressMode::Quiet => {
            let mut plain = Plain::new();
            let mut log = Vec::new();
            let mut failed = false;
            while let Some(e) = events.recv().await {
                failed |= matches!(e, Event::Error { .. });
                log.extend(plain.lines(&e));
            }
            if failed {
                let mut err = std::io::stderr().lock();
                for line in log {
                    let _ = writeln!(err, "{line}");
                }
            }
        }
        _ => {
            let mut plain = Plain::new();
            while let Some(e) = events.recv().await {
                let mut err = std::io::stderr().lock();
                for line in plain.lines(&e) {
                    let _ = writeln!(err, "{line}");
                }
            }
        }
    }
}

/// One event as a JSON line.
pub fn json_line(event: &Event) -> String {
    serde_json::to_string(event).unwrap_or_default()
}

/// The plain renderer's state: vertex numbers and when each started.
pub struct Plain {
    numbers: HashMap<String, usize>,
    started: HashMap<String, Instant>,
}

impl Default for Plain {
    fn default() -> Self {
        Self::new()
    }
}

impl Plain {
    /// A renderer that has seen nothing yet.
    pub fn new() -> Plain {
        Plain { numbers: HashMap::new(), started: HashMap::new() }
    }

    fn number(&mut self, vertex: &str) -> (usize, bool) {
        let next = self.numbers.len() + 1;
        let mut fresh = false;
        let n = *self.numbers.entry(vertex.to_string()).or_insert_with(|| {
            fresh = true;
            next
        });
        (n, fresh)
    }

    /// The lines to print for `event`.
    pub fn lines(&mut self, event: &Event) -> Vec<String> {
        let (n, fresh) = self.number(event.vertex());
        let mut out = Vec::new();
        match event {
            Event::Started { vertex, name } => {
                self.started.insert(vertex.clone(), Instant::now());
                out.push(format!("#{n} {name}"));
            }
            Event::Cached { name, .. } => {
                if fresh {
                    out.push(format!("#{n} {name}"));
                }
                out.push(format!("#{n} CACHED"));
            }
            Event::Done { name, seconds, .. } => {
                if fresh {
                    out.push(format!("#{n} {name}"));
                }
                out.push(format!("#{n} DONE {seconds:.1}s"));
            }
            Event::Error { name, message, .. } => {
                if fresh {
                    out.push(format!("#{n} {name}"));
                }
                out.push(format!("#{n} ERROR: {message}"));
            }
            Event::Log { vertex, line, .. } => {
                let t = self.started.get(vertex).map(|s| s.elapsed().as_secs_f64()).unwrap_or(0.0);
                out.push(format!("#{n} {t:.3} {line}"));
            }
        }
        out
    }
}

async fn render_tty(mut events: UnboundedReceiver<Event>) {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("{spinner} {prefix} {elapsed:>4} {wide_msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    let mut bars: HashMap<String, ProgressBar> = HashMap::new();
    let mut plain = Plain::new();
    while let Some(e) = events.recv().await {
        let (n, _) = plain.number(e.vertex());
        match &e {
            Event::Started { vertex, name } => {
                let bar = multi.add(ProgressBar::new_spinner());
                bar.set_style(style.clone());
                bar.set_prefix(format!("#{n} {name}"));
                bar.enable_steady_tick(Duration::from_millis(120));
                bars.insert(vertex.clone(), bar);
            }
            Event::Log { vertex, line, .. } => {
                if let Some(bar) = bars.get(vertex) {
                    bar.set_message(line.clone());
                }
            }
            Event::Cached { vertex, name } | Event::Done { vertex, name, .. } | Event::Error { vertex, name, .. } => {
                let elapsed = bars.remove(vertex).map(|b| {
                    b.finish_and_clear();
                    b.elapsed()
                });
                let status = match &e {
                    Event::Cached { .. } => "CACHED".to_string(),
                    Event::Error { message, .. } => format!("ERROR: {message}"),
                    _ => format!("DONE {:.1}s", elapsed.unwrap_or_default().as_secs_f64()),
                };
                let _ = multi.println(format!("#{n} {name} {status}"));
            }
        }
    }
    for bar in bars.into_values() {
        bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_numbers_vertices_like_buildx() {
        let mut p = Plain::new();
        let started = Event::Started { vertex: "v1".into(), name: "[build 2/4] RUN make".into() };
        assert_eq!(p.lines(&started), ["#1 [build 2/4] RUN make"]);
        let cached = Event::Cached { vertex: "v2".into(), name: "[build 1/4] COPY . .".into() };
        assert_eq!(p.lines(&cached), ["#2 [build 1/4] COPY . .", "#2 CACHED"]);
        let log = Event::Log { vertex: "v1".into(), stream: "stdout".into(), line: "cc -o app".into() };
        let l = p.lines(&log);
        assert!(l[0].starts_with("#1 0.0") && l[0].ends_with(" cc -o app"), "{l:?}");
        let done = Event::Done { vertex: "v1".into(), name: "x".into(), seconds: 0.31 };
        assert_eq!(p.lines(&done), ["#1 DONE 0.3s"]);
        let err = Event::Error { vertex: "v3".into(), name: "RUN false".into(), message: "exit code: 1".into() };
        assert_eq!(p.lines(&err), ["#3 RUN false", "#3 ERROR: exit code: 1"]);
    }

    #[test]
    fn json_is_one_event_per_line() {
        let e = Event::Done { vertex: "v".into(), name: "n".into(), seconds: 1.5 };
        let line = json_line(&e);
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), e);
        assert!(line.contains("\"type\":\"done\""), "{line}");
    }
}
