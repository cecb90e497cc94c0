//! The persisted state: `<state-dir>/state.json`, replaced by write-temp,
//! fsync, rename (and an fsync of the folder), so a crash leaves either the
//! old or the new file, never a torn one.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::{Document, ServiceIds};

/// What is saved: the document as last accepted, its generation, and the
/// service ids the kernel knows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stored {
    pub generation: u64,
    pub ids: ServiceIds,
    pub state: Document,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state file {path} cannot be read: {source}; it was left as it is")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "state file {path} is corrupt: {message}; it was left as it is: repair it, or move it away to start from --config"
    )]
    Corrupt { path: PathBuf, message: String },
    #[error("cannot save the state to {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub const FILE: &'static str = "state.json";

    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_owned() }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(Self::FILE)
    }

    /// The saved state, or None when nothing was ever saved.
    pub fn load(&self) -> Result<Option<Stored>, StoreError> {
        let path = self.path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        serde_json::from_str(&text).map(Some).map_err(|e| StoreError::Corrupt { path, message: e.to_string() })
    }

    pub fn save(&self, stored: &Stored) -> Result<(), StoreError> {
        let path = self.path();
        let err = |source| StoreError::Write { path: path.clone(), source };
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir).map_err(err)?;
        let tmp = self.dir.join(format!("{}.tmp", Self::FILE));
        // Compact: at 10 000 services it is half the bytes to write and fsync.
        let text = serde_json::to_vec(stored).map_err(|e| err(e.into()))?;
        let mut f =
            std::fs::File::options().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(err)?;
        f.write_all(&text).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_document;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mesh-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn saves_and_loads_and_replaces() {
        let d = dir("roundtrip");
        let store = Store::new(&d);
        assert_eq!(store.load().unwrap(), None);
        let doc = parse_document("nodes: [{name: a, address: 1.2.3.4}]").unwrap();
        let s = Stored { generation: 7, ids: ServiceIds::default(), state: doc };
        store.save(&s).unwrap();
        assert_eq!(store.load().unwrap(), Some(s.clone()));
        let s2 = Stored { generation: 8, ..s };
        store.save(&s2).unwrap();
        assert_eq!(store.load().unwrap().unwrap().generation, 8);
        assert!(!d.join("state.json.tmp").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn corrupt_file_is_an_error_and_is_left_alone() {
        let d = dir("corrupt");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("state.json"), "{ not json").unwrap();
        let e = Store::new(&d).load().unwrap_err().to_string();
        assert!(e.contains("state.json is corrupt") && e.contains("left as it is"), "{e}");
        assert_eq!(std::fs::read_to_string(d.join("state.json")).unwrap(), "{ not json");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
