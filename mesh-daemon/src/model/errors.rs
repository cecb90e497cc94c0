//! What validation reports: every bad field with its path.

use std::fmt;

/// Why one value is not valid: the message of a [`FieldError`], which
/// adds where the value is. Says what would fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// `invalid!("{x} is not ...")`: an [`Invalid`] with a formatted message.
macro_rules! invalid {
    ($($t:tt)*) => { $crate::model::Invalid(format!($($t)*)) };
}
pub(crate) use invalid;

impl From<String> for Invalid {
    fn from(s: String) -> Self {
        Invalid(s)
    }
}

impl From<&str> for Invalid {
    fn from(s: &str) -> Self {
        Invalid(s.to_owned())
    }
}

/// One bad field: `services[1].endpoints[0].ip: "10.0.0.300" is not an IP address (IPv4 or IPv6)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every bad field of a document, in document order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

#[derive(Default)]
pub(super) struct Errors(pub(super) Vec<FieldError>);

impl Errors {
    /// Whether item `i` of list `list` (`routes`, `policies`), a `what`
    /// called `key` (namespace, name), is the first of that name; if not,
    /// an error naming the first.
    pub fn first_named<'a>(
        &mut self,
        seen: &mut std::collections::HashMap<(&'a str, &'a str), usize>,
        (list, what): (&str, &str),
        i: usize,
        key: (&'a str, &'a str),
    ) -> bool {
        match seen.insert(key, i) {
            None => true,
            Some(prev) => {
                seen.insert(key, prev);
                self.push(
                    format!("{list}[{i}].metadata"),
                    format!("{what} {}/{} is also {list}[{prev}]: give each {what} its own name", key.0, key.1),
                );
                false
            }
        }
    }

    pub(super) fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError { path: path.into(), message: message.into() });
    }
    /// Keeps the value of `r`, or records its error under `path`. The
    /// path is made only on error: a valid state of 100 000 endpoints
    /// formats none.
    pub(super) fn take<T>(&mut self, path: impl FnOnce() -> String, r: Result<T, Invalid>) -> Option<T> {
        r.map_err(|m| self.push(path(), m.0)).ok()
    }
}
