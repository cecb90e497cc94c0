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
    /// ` key=` or `,"key":` (keys are fixed names, never escaped).
    fn key(&mut self, key: &str) {
        if self.json {
            self.out.push_str(",\"");
            self.out.push_str(key);
            self.out.push_str("\":");
        } else {
            self.out.push(' ');
            self.out.push_str(key);
            self.out.push('=');
        }
    }

    pub fn str(&mut self, key: &str, v: &str) {
        self.key(key);
        if self.json {
            self.out.push('"');
            escape(self.out, v);
            self.out.push('"');
        } else {
            self.out.push_str(v);
        }
    }

    pub fn u64(&mut self, key: &str, v: u64) {
        self.key(key);
        self.out.push_str(itoa::Buffer::new().format(v));
    }

    /// An address, as `Display` writes it; IPv4 without `fmt`.
    pub fn addr(&mut self, key: &str, v: std::net::SocketAddr) {
        let std::net::SocketAddr::V4(v4) = v else {
            return self.display(key, &v);
        };
        self.key(key);
        if self.json {
            self.out.push('"');
        }
        let mut digits = itoa::Buffer::new();
        for (i, octet) in v4.ip().octets().into_iter().enumerate() {
            if i > 0 {
                self.out.push('.');
            }
            self.out.push_str(digits.format(octet));
        }
        self.out.push(':');
        self.out.push_str(digits.format(v4.port()));
        if self.json {
            self.out.push('"');
        }
    }

    pub fn display(&mut self, key: &str, v: &dyn Display) {
        self.scratch.clear();
        let _ = write!(self.scratch, "{v}");
        self.key(key);
        if self.json {
            self.out.push('"');
            escape(self.out, self.scratch);
            self.out.push('"');
        } else if self.scratch.contains(' ') {
            // Free text (an error) is quoted; addresses and names are not.
            let _ = write!(self.out, "{:?}", self.scratch);
        } else {
            self.out.push_str(self.scratch);
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
        out.push_str("  INFO ");
        out.push_str(target);
        out.push_str(": ");
        out.push_str(message);
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
    digits(out, y, 4);
    out.push('-');
    digits(out, m, 2);
    out.push('-');
    digits(out, d, 2);
    out.push('T');
    digits(out, s / 3600, 2);
    out.push(':');
    digits(out, s / 60 % 60, 2);
    out.push(':');
    digits(out, s % 60, 2);
    out.push('.');
    digits(out, u64::from(since_epoch.subsec_micros()), 6);
    out.push('Z');
}

/// The last `width` decimal digits of `v`, zero-padded.
fn digits(out: &mut String, v: u64, width: u32) {
    let mut place = 10u64.pow(width - 1);
    while place > 0 {
        out.push(char::from(b'0' + (v / place % 10) as u8));
        place /= 10;
    }
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
    if !s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        out.push_str(s);
        return;
    }
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
    fn addresses_and_numbers_read_as_display_writes_them() {
        let addrs =
            ["0.0.0.0:0", "10.244.2.3:8080", "255.255.255.255:65535", "[fd00::a:1]:80", "[::ffff:10.0.0.1]:443"];
        for json in [false, true] {
            for a in addrs {
                let a: std::net::SocketAddr = a.parse().unwrap();
                let (mut out, mut scratch) = (String::new(), String::new());
                let mut f = Fields { out: &mut out, scratch: &mut scratch, json };
                f.addr("a", a);
                f.u64("n", 1_000_000_007);
                let want =
                    if json { format!(",\"a\":\"{a}\",\"n\":1000000007") } else { format!(" a={a} n=1000000007") };
                assert_eq!(out, want);
            }
        }
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
