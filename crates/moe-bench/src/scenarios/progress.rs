//! Live progress of a load run on stderr: requests done of the total, the rate, errors, and the
//! latency median and 99th percentile so far. On a terminal one line is redrawn in place with a
//! progress bar; otherwise (a log, a pipe) a plain line is written every few seconds.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// The run so far.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Snapshot {
    pub done: usize,
    pub errors: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// One progress line; with `bar`, a 24-cell bar in front.
pub(crate) fn line(s: &Snapshot, total: usize, elapsed: Duration, bar: bool) -> String {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let text = format!(
        "{}/{} requests  {:.1} req/s  errors {}  p50 {:.0} ms  p99 {:.0} ms",
        s.done,
        total,
        s.done as f64 / secs,
        s.errors,
        s.p50_ms,
        s.p99_ms
    );
    if !bar {
        return format!("loadgen: {text}");
    }
    const CELLS: usize = 24;
    let filled = (s.done * CELLS).checked_div(total).unwrap_or(0).min(CELLS);
    format!("[{}{}] {text}", "#".repeat(filled), "-".repeat(CELLS - filled))
}

/// Reports `snapshot()` until aborted: redrawn every 200 ms on a terminal, a line every 5 s
/// otherwise. Call [`finish`] after aborting it.
pub(crate) fn spawn(
    total: usize,
    started: Instant,
    snapshot: impl Fn() -> Snapshot + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let tty = std::io::stderr().is_terminal();
    let every = if tty { Duration::from_millis(200) } else { Duration::from_secs(5) };
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let l = line(&snapshot(), total, started.elapsed(), tty);
            let mut err = std::io::stderr().lock();
            let _ = if tty { write!(err, "\r{l}\x1b[K") } else { writeln!(err, "{l}") };
            let _ = err.flush();
        }
    })
}

/// Ends the progress display with the final figures.
pub(crate) fn finish(s: &Snapshot, total: usize, elapsed: Duration) {
    let tty = std::io::stderr().is_terminal();
    let l = line(s, total, elapsed, tty);
    let mut err = std::io::stderr().lock();
    let _ = if tty { writeln!(err, "\r{l}\x1b[K") } else { writeln!(err, "{l}") };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_with_and_without_the_bar() {
        let s = Snapshot { done: 50, errors: 2, p50_ms: 12.4, p99_ms: 80.0 };
        let plain = line(&s, 100, Duration::from_secs(10), false);
        assert_eq!(plain, "loadgen: 50/100 requests  5.0 req/s  errors 2  p50 12 ms  p99 80 ms");
        let bar = line(&s, 100, Duration::from_secs(10), true);
        assert!(bar.starts_with("[############------------] 50/100"), "{bar}");
        assert!(line(&Snapshot::default(), 0, Duration::ZERO, true).starts_with("[------------------------] 0/0"));
    }
}
