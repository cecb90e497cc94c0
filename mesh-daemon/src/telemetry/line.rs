//! Access-log lines formatted by hand, in the two shapes the tracing
//! subscriber writes (text, or JSON with the fields under `fields`), and
//! handed straight to the [`LogWriter`]. One line per request is the
//! busiest log there is: through tracing's field visitors its formatting
//! took a sixth of the request path's CPU; here it is appends to a reused
//! buffer. The binary installs it next to the subscriber; without it the
//! caller logs through tracing.
#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::fmt::{Display, Write as _};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use super::logwriter::LogWriter;

struct Fast {
    writer: LogWriter,
    json: bool,
}

static FAST: OnceLock<Fast> = OnceLock::new();

/// Sends lines written with [`write`] to `writer`, as JSON when `json`.
pub fn install(writer: LogWriter, json: bool) {
    let _ = FAST.set(Fast { writer, json });
}

/// The fields of one line being built.
pub struct Fields<'a> {
    out: &'a mut String,
    scratch: &'a mut String,
    json: bool,
}

impl Fields<'_> {
    pub fn str(&mut self, key: &str, v: &str) {
        if self.json {
            let _ = write!(self.out, ",\"{key}\":\"");
            escape(self.out, v);
            self.out.push('"');
        } else {
            let _ = write!(self.out, " {key}={v}");
        }
    }

    pub fn u64(&mut self, key: &str, v: u64) {
        let _ = if self.json { write!(self.out, ",\"{key}\":{v}") } else { write!(self.out, " {key}={v}") };
    }

    pub fn display(&mut self, key: &str, v: &dyn Display) {
        self.scratch.clear();
        let _ = write!(self.scratch, "{v}");
        if self.json {
            let _ = write!(self.out, ",\"{key}\":\"");
            escape(self.out, self.scratch);
            self.out.push('"');
        } else {
            // Free text (an error) is quoted; addresses and names are not.
            let _ = if self.scratch.contains(' ') {
                write!(self.out, " {key}={:?}", self.scratch)
            } else {
                write!(self.out, " {key}={}", self.scratch)
            };
        }
    }
}

/// Writes one INFO line of `target` with `message` and the fields `fill`
/// adds. False when nothing is installed: the caller logs through tracing.
pub fn write(target: &str, message: &str, fill: impl FnOnce(&mut Fields<'_>)) -> bool {
    let Some(fast) = FAST.get() else { return false };
    thread_local! {
        static BUF: RefCell<(String, String)> = const { RefCell::new((String::new(), String::new())) };
    }
    BUF.with(|b| {
        let Ok(mut b) = b.try_borrow_mut() else { return false };
        let (out, scratch) = &mut *b;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        format(out, scratch, fast.json, now, target, message, fill);
        fast.writer.push(out.as_bytes());
        true
    })
}

/// One line, newline included, into `out` (cleared first).
pub fn format(
    out: &mut String,
    scratch: &mut String,
    json: bool,
    now: std::time::Duration,
    target: &str,
    message: &str,
    fill: impl FnOnce(&mut Fields<'_>),
) {
    out.clear();
    if json {
        out.push_str("{\"timestamp\":\"");
        timestamp(out, now);
        out.push_str("\",\"level\":\"INFO\",\"fields\":{\"message\":\"");
        escape(out, message);
        out.push('"');
    } else {
        timestamp(out, now);
        let _ = write!(out, "  INFO {target}: {message}");
    }
    fill(&mut Fields { out, scratch, json });
    if json {
        out.push_str("},\"target\":\"");
        escape(out, target);
        out.push_str("\"}");
    }
    out.push('\n');
}

/// `2026-11-29T17:57:07.123456Z`, as the subscriber writes it.
fn timestamp(out: &mut String, since_epoch: std::time::Duration) {
    let secs = since_epoch.as_secs();
    let (y, m, d) = civil(secs / 86_400);
    let s = secs % 86_400;
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        since_epoch.subsec_micros()
    );
}

/// The (year, month, day) of a day since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + u64::from(m <= 2), m, d)
}

/// `s` as the inside of a JSON string.
fn escape(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let mut s = String::new();
        timestamp(&mut s, Duration::new(0, 0));
        assert_eq!(s, "1970-01-01T00:00:00.000000Z");
        s.clear();
        // 2024-02-29 (a leap day) 23:59:59.5
        timestamp(&mut s, Duration::new(1_709_251_199, 500_000_000));
        assert_eq!(s, "2024-02-29T23:59:59.500000Z");
        s.clear();
        timestamp(&mut s, Duration::new(1_795_910_400, 1_000));
        assert_eq!(s, "2026-11-29T00:00:00.000001Z");
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut s = String::new();
        escape(&mut s, "a\"b\\c\nd\u{1}é");
        assert_eq!(s, "a\\\"b\\\\c\\nd\\u0001é");
        let v: serde_json::Value = serde_json::from_str(&format!("\"{s}\"")).unwrap();
        assert_eq!(v, "a\"b\\c\nd\u{1}é");
    }
}
