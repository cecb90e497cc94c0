//! A file the issuer reads on every request (node credentials, the state
//! document), kept parsed: a request costs one `stat` off the async
//! workers, and the file is read and parsed again (also off them) only
//! when its size, modification or change time, or inode changed.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;

use crate::model::Invalid;

/// Why a parsed file cannot be had.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ParseError {
    pub path: PathBuf,
    pub message: String,
}

/// What tells one version of a file from another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stamp {
    Missing,
    Present { len: u64, modified: Option<SystemTime>, inode: u64, changed_ns: i64 },
}

type Parse<T> = fn(&Path, Option<&str>) -> Result<T, Invalid>;

/// A parsed file, current as of the last [`ParsedFile::get`].
pub struct ParsedFile<T> {
    path: PathBuf,
    /// The text, or None when the file does not exist.
    parse: Parse<T>,
    current: ArcSwapOption<(Stamp, Arc<T>)>,
    loads: AtomicU64,
}

impl<T: Send + Sync + 'static> ParsedFile<T> {
    pub fn new(path: PathBuf, parse: Parse<T>) -> Self {
        Self { path, parse, current: ArcSwapOption::empty(), loads: AtomicU64::new(0) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many times the file was read and parsed.
    pub fn loads(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }

    /// The file as it is now.
    pub async fn get(&self) -> Result<Arc<T>, ParseError> {
        let err = |message: String| ParseError { path: self.path.clone(), message };
        let stamp = match tokio::fs::metadata(&self.path).await {
            Ok(m) => Stamp::Present {
                len: m.len(),
                modified: m.modified().ok(),
                inode: m.ino(),
                changed_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Stamp::Missing,
            Err(e) => return Err(err(e.to_string())),
        };
        if let Some(c) = self.current.load_full() {
            if c.0 == stamp {
                return Ok(c.1.clone());
            }
        }
        let (path, parse) = (self.path.clone(), self.parse);
        let parsed = tokio::task::spawn_blocking(move || match std::fs::read_to_string(&path) {
            Ok(text) => parse(&path, Some(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => parse(&path, None),
            Err(e) => Err(Invalid(e.to_string())),
        })
        .await
        .map_err(|e| err(e.to_string()))?
        .map_err(|e| err(e.0))?;
        self.loads.fetch_add(1, Ordering::Relaxed);
        let parsed = Arc::new(parsed);
        self.current.store(Some(Arc::new((stamp, parsed.clone()))));
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(_: &Path, text: Option<&str>) -> Result<Vec<String>, Invalid> {
        match text {
            None => Ok(Vec::new()),
            Some(t) if t.contains("bad") => Err(Invalid::from("a bad line")),
            Some(t) => Ok(t.lines().map(str::to_owned).collect()),
        }
    }

    #[tokio::test]
    async fn the_file_is_parsed_again_only_when_it_changed() {
        let dir = std::env::temp_dir().join(format!("mesh-parsed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let w = ParsedFile::new(path.clone(), lines);
        assert_eq!(*w.get().await.unwrap(), Vec::<String>::new(), "missing: what parse makes of None");
        std::fs::write(&path, "a\nb\n").unwrap();
        assert_eq!(*w.get().await.unwrap(), ["a", "b"]);
        let loads = w.loads();
        for _ in 0..10 {
            w.get().await.unwrap();
        }
        assert_eq!(w.loads(), loads, "unchanged: not read again");
        // A rename over it is a change, even at the same size and with the
        // same modification time.
        std::fs::write(dir.join("g"), "c\nd\n").unwrap();
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::File::options().write(true).open(dir.join("g")).unwrap().set_modified(mtime).unwrap();
        std::fs::rename(dir.join("g"), &path).unwrap();
        assert_eq!(*w.get().await.unwrap(), ["c", "d"]);
        std::fs::write(&path, "bad\n").unwrap();
        let e = w.get().await.unwrap_err().to_string();
        assert!(e.ends_with("/f: a bad line"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
