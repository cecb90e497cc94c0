//! Which of a service's connections and requests the access log writes
//! (`services[].accessLog`, or the Service annotation `mesh.io/access-log`):
//! `on` (the default) every one; `off` none; `N%` every failure and N% of
//! the rest, drawn per record, as Envoy's runtime fraction and HAProxy's
//! `log ... sample` allow.

use std::fmt;

use super::errors::{invalid, Invalid};

/// What the access log writes of one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessLog {
    /// Of the records that succeeded, how many per million are written.
    per_million: u32,
    /// Whether failures are written (all of them).
    failures: bool,
}

impl Default for AccessLog {
    fn default() -> Self {
        Self::ON
    }
}

impl AccessLog {
    pub const ON: Self = Self { per_million: 1_000_000, failures: true };
    pub const OFF: Self = Self { per_million: 0, failures: false };

    /// `on`, `off`, or a share such as `10%` or `0.5%` (in (0, 100]).
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        let fix = "write on, off, or the share of successful requests and connections to log (such as 10%; failures are always logged)";
        match s.trim() {
            "on" => Ok(Self::ON),
            "off" => Ok(Self::OFF),
            v => {
                let share = v.strip_suffix('%').and_then(|n| n.trim().parse::<f64>().ok());
                match share {
                    Some(p) if p > 0.0 && p <= 100.0 => {
                        Ok(Self { per_million: ((p * 10_000.0).round() as u32).max(1), failures: true })
                    }
                    _ => Err(invalid!("{v:?}: {fix}")),
                }
            }
        }
    }

    /// Whether a record is written: every failure (unless off), and of
    /// the successful ones a share, by `unit`, a draw uniform in [0, 1)
    /// taken only when the share is below all.
    pub fn writes(self, ok: bool, unit: impl FnOnce() -> f64) -> bool {
        if !ok {
            return self.failures;
        }
        match self.per_million {
            0 => false,
            1_000_000.. => true,
            n => unit() * 1_000_000.0 < f64::from(n),
        }
    }
}

impl fmt::Display for AccessLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::ON => f.write_str("on"),
            Self::OFF => f.write_str("off"),
            Self { per_million, .. } => write!(f, "{}%", f64::from(per_million) / 10_000.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_off_and_shares_parse_and_print_as_written() {
        for (s, shown) in
            [("on", "on"), ("off", "off"), ("10%", "10%"), ("0.5%", "0.5%"), ("100%", "on"), (" 25 %", "25%")]
        {
            assert_eq!(AccessLog::parse(s).unwrap().to_string(), shown, "{s}");
        }
        for bad in ["", "0%", "101%", "-1%", "10", "half", "nan%"] {
            let e = AccessLog::parse(bad).unwrap_err().to_string();
            assert!(e.contains("write on, off, or the share"), "{bad}: {e}");
        }
    }

    #[test]
    fn failures_are_always_written_and_a_share_of_the_rest() {
        let never = || panic!("no draw when the answer does not depend on one");
        assert!(AccessLog::ON.writes(true, never));
        assert!(AccessLog::ON.writes(false, never));
        assert!(!AccessLog::OFF.writes(true, never));
        assert!(!AccessLog::OFF.writes(false, never));
        let tenth = AccessLog::parse("10%").unwrap();
        assert!(tenth.writes(false, never), "a failure is written whatever the share");
        assert!(tenth.writes(true, || 0.0999));
        assert!(!tenth.writes(true, || 0.1));
        // Over draws spread evenly, the share written is the share asked.
        let written = (0..10_000).filter(|i| tenth.writes(true, || f64::from(*i) / 10_000.0)).count();
        assert_eq!(written, 1000);
    }
}
