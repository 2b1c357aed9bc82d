//! Access logs: one line per request, off by default (`--access-log text`
//! or `json`), optionally for a sample of requests only
//! (`--access-log-sample PERCENT`). Lines go to stdout, where the sidecar
//! already prints its machine-readable start line, so a log shipper can
//! take them apart from the diagnostic log on stderr.
//!
//! A request never waits for its line: lines go through a bounded queue to
//! a writer thread, and when the queue is full the line is dropped and
//! counted in `outrigger_access_log_dropped_total`.

use std::io::Write;
use std::sync::mpsc;

use metrics::Counter;
use outrigger_config::timefmt;

use crate::trace::FinishedSpan;

pub const DROPPED_TOTAL: &str = "outrigger_access_log_dropped_total";
const QUEUE: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AccessLogFormat {
    Off,
    Text,
    Json,
}

#[derive(Debug)]
pub struct AccessLog {
    format: AccessLogFormat,
    sample_percent: f64,
    lines: mpsc::SyncSender<String>,
    dropped: Counter,
}

impl AccessLog {
    /// `None` when off.
    pub fn start(format: AccessLogFormat, sample_percent: f64) -> Option<Self> {
        if format == AccessLogFormat::Off {
            return None;
        }
        let (lines, queued) = mpsc::sync_channel::<String>(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("access-log".to_string())
            .spawn(move || {
                let stdout = std::io::stdout();
                while let Ok(line) = queued.recv() {
                    let mut out = stdout.lock();
                    let _ = writeln!(out, "{line}");
                    // Whatever else is queued goes in the same write.
                    while let Ok(line) = queued.try_recv() {
                        let _ = writeln!(out, "{line}");
                    }
                    let _ = out.flush();
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("access log off: cannot start its writer thread: {e}");
            return None;
        }
        Some(Self {
            format,
            sample_percent,
            lines,
            dropped: metrics::counter!(DROPPED_TOTAL),
        })
    }

    /// Whether this request is logged.
    pub fn sampled(&self) -> bool {
        self.sample_percent >= 100.0
            || crate::random::random_below(1_000_000) as f64 / 10_000.0 < self.sample_percent
    }

    pub fn write(&self, direction: &str, r: &FinishedSpan) {
        let line = self.format(direction, r);
        if self.lines.try_send(line).is_err() {
            self.dropped.increment(1);
        }
    }

    fn format(&self, direction: &str, r: &FinishedSpan) -> String {
        let duration_ms = r
            .end
            .duration_since(r.start)
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0);
        let time = timefmt::rfc3339_millis(r.start);
        let trace_id = r.context.trace_id_hex();
        let upstream = r.upstream.map(|a| a.to_string());
        match self.format {
            AccessLogFormat::Json => serde_json::json!({
                "time": time,
                "direction": direction,
                "target": &*r.target,
                "method": r.method,
                "path": r.path,
                "status": r.status,
                "durationMs": (duration_ms * 1000.0).round() / 1000.0,
                "requestId": r.request_id,
                "traceId": trace_id,
                "peer": r.peer.as_deref(),
                "upstream": upstream,
                "attempts": r.attempts,
                "error": r.proxy_error,
            })
            .to_string(),
            _ => format!(
                "{time} {direction} {} \"{} {}\" {} {duration_ms:.3}ms request_id={} trace_id={trace_id} peer={} upstream={} attempts={}{}",
                r.target,
                r.method,
                r.path.escape_debug(),
                r.status,
                r.request_id,
                r.peer.as_deref().unwrap_or("-"),
                upstream.as_deref().unwrap_or("-"),
                r.attempts,
                r.proxy_error
                    .as_deref()
                    .map(|e| format!(" error={e}"))
                    .unwrap_or_default(),
            ),
        }
    }
}
