//! The persisted state: `<state-dir>/state.json`, the whole state as of
//! some generation, and `<state-dir>/state.journal`, one line per write
//! since then: the services it removed and put in (by position) and the
//! ids it changed. A write that changes a few services appends a few
//! lines' worth and fsyncs, instead of rewriting every service: it costs
//! what it changes.
//!
//! The whole file is replaced by write-temp, fsync, rename (and an fsync
//! of the folder), so a crash leaves either the old or the new file,
//! never a torn one; it is written for the first write, for a write that
//! changes the nodes or workloads or reorders the services, and when the
//! journal has grown past the whole file (at least 1 MiB), after which
//! the journal starts over. A journal line torn by a crash (never
//! acknowledged: the write is answered after the fsync) is cut off at the
//! next start.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::model::{Changes, Document, ServiceDoc, ServiceIds, State};

/// What is saved: the document as last accepted, its generation, and the
/// service ids the kernel knows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stored {
    pub generation: u64,
    /// Shared with the states before while no service port comes or goes.
    pub ids: Arc<ServiceIds>,
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

/// One write in the journal.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    generation: u64,
    /// Indices of the services removed, in the document before, ascending.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    removed: Vec<usize>,
    /// Services put in after the removals, at their index in the new
    /// document, ascending.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    inserted: Vec<(usize, Arc<ServiceDoc>)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ids: Option<IdsChange>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdsChange {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    set: Vec<(String, u32)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    removed: Vec<String>,
    next: u32,
}

/// The journal grows to at least this before the whole file is rewritten.
const JOURNAL_MIN: u64 = 1 << 20;

#[derive(Debug, Default)]
struct Sizes {
    /// Bytes of the whole file; None: there is none (or the journal may
    /// hold a failed line): the next save writes the whole file.
    whole: Option<u64>,
    journal: u64,
}

pub struct Store {
    dir: PathBuf,
    sizes: Mutex<Sizes>,
    /// [`JOURNAL_MIN`]; smaller in tests.
    journal_min: u64,
}

fn err(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Write { path: path.to_owned(), source }
}

impl Store {
    pub const FILE: &'static str = "state.json";
    pub const JOURNAL: &'static str = "state.journal";

    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_owned(), sizes: Mutex::default(), journal_min: JOURNAL_MIN }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(Self::FILE)
    }

    fn journal_path(&self) -> PathBuf {
        self.dir.join(Self::JOURNAL)
    }

    fn sizes(&self) -> std::sync::MutexGuard<'_, Sizes> {
        self.sizes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The saved state (the whole file and the journal after it), or None
    /// when nothing was ever saved. A torn last journal line is cut off.
    pub fn load(&self) -> Result<Option<Stored>, StoreError> {
        let path = self.path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        let mut stored: Stored = serde_json::from_str(&text)
            .map_err(|e| StoreError::Corrupt { path: path.clone(), message: e.to_string() })?;
        let jpath = self.journal_path();
        let journal = match std::fs::read(&jpath) {
            Ok(j) => j,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(StoreError::Read { path: jpath, source }),
        };
        let corrupt = |message: String| StoreError::Corrupt { path: jpath.clone(), message };
        let mut good = 0;
        let lines = journal.split_inclusive(|b| *b == b'\n').collect::<Vec<_>>();
        for (n, line) in lines.iter().enumerate() {
            let last = n + 1 == lines.len();
            let entry: Entry = match serde_json::from_slice(line) {
                Ok(e) if line.ends_with(b"\n") => e,
                // Torn by a crash: never acknowledged.
                _ if last => break,
                Ok(_) => unreachable!("only the last line can lack its newline"),
                Err(e) => return Err(corrupt(format!("line {}: {e}", n + 1))),
            };
            good += line.len();
            if entry.generation <= stored.generation {
                continue;
            }
            if entry.generation != stored.generation + 1 {
                return Err(corrupt(format!(
                    "line {}: generation {} follows {}",
                    n + 1,
                    entry.generation,
                    stored.generation
                )));
            }
            replay(&mut stored, entry).map_err(|m| corrupt(format!("line {}: {m}", n + 1)))?;
        }
        if good < journal.len() {
            tracing::warn!(file = %jpath.display(), bytes = journal.len() - good, "a torn last line of the journal was cut off");
            let f = std::fs::File::options().write(true).open(&jpath).map_err(err(&jpath))?;
            f.set_len(good as u64).and_then(|_| f.sync_all()).map_err(err(&jpath))?;
        }
        *self.sizes() = Sizes { whole: Some(text.len() as u64), journal: good as u64 };
        Ok(Some(stored))
    }

    /// Saves `stored` whole and starts the journal over.
    pub fn save(&self, stored: &Stored) -> Result<(), StoreError> {
        let path = self.path();
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir).map_err(err(&path))?;
        let tmp = self.dir.join(format!("{}.tmp", Self::FILE));
        // Compact: at 10 000 services it is half the bytes to write and fsync.
        let text = serde_json::to_vec(stored).map_err(|e| err(&path)(e.into()))?;
        let mut f = std::fs::File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err(&path))?;
        f.write_all(&text).map_err(err(&path))?;
        f.sync_all().map_err(err(&path))?;
        std::fs::rename(&tmp, &path).map_err(err(&path))?;
        // Lines up to this generation are skipped at load: removing the
        // journal after the rename is safe to be cut short by a crash.
        match std::fs::remove_file(self.journal_path()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(&path)(e)),
            _ => {}
        }
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(err(&path))?;
        *self.sizes() = Sizes { whole: Some(text.len() as u64), journal: 0 };
        Ok(())
    }

    /// Saves `next`, which a write made from `prev` with `changes`
    /// (`state`: `next`'s, validated): a journal line when it can, see
    /// the module doc.
    pub fn save_change(
        &self,
        prev: &Stored,
        next: &Stored,
        changes: &Changes,
        state: &State,
    ) -> Result<(), StoreError> {
        let whole = self.sizes().whole;
        let Some(whole) = whole.filter(|_| !changes.whole && changes.in_order) else {
            return self.save(next);
        };
        debug_assert_eq!(prev.generation + 1, next.generation);
        let ids = (!Arc::ptr_eq(&prev.ids, &next.ids)).then(|| {
            let mut keys: Vec<String> = changes
                .removed
                .iter()
                .map(|(_, s)| s.as_ref())
                .chain(changes.changed.iter().map(|i| state.services[*i].as_ref()))
                .flat_map(|s| s.frontend_keys())
                .collect();
            keys.sort();
            keys.dedup();
            let mut change = IdsChange { set: Vec::new(), removed: Vec::new(), next: next.ids.next() };
            for k in keys {
                match next.ids.get(&k) {
                    Some(id) => change.set.push((k, id)),
                    None => change.removed.push(k),
                }
            }
            change
        });
        let entry = Entry {
            generation: next.generation,
            removed: changes.removed.iter().map(|(j, _)| *j).collect(),
            inserted: changes.changed.iter().map(|i| (*i, next.state.services[*i].clone())).collect(),
            ids,
        };
        let mut line = serde_json::to_vec(&entry).map_err(|e| err(&self.path())(e.into()))?;
        line.push(b'\n');
        let journal = self.sizes().journal;
        if journal + line.len() as u64 > whole.max(self.journal_min) {
            return self.save(next);
        }
        let jpath = self.journal_path();
        let mut f = std::fs::File::options().append(true).create(true).mode(0o600).open(&jpath).map_err(err(&jpath))?;
        let appended = f.write_all(&line).and_then(|_| f.sync_data()).and_then(|_| match journal {
            0 => std::fs::File::open(&self.dir)?.sync_all(),
            _ => Ok(()),
        });
        if let Err(e) = appended {
            // Cut the failed line off again; if even that fails, the next
            // write rewrites the whole file (and drops the journal).
            if f.set_len(journal).and_then(|_| f.sync_all()).is_err() {
                self.sizes().whole = None;
            }
            return Err(err(&jpath)(e));
        }
        self.sizes().journal = journal + line.len() as u64;
        Ok(())
    }
}

/// Applies one journal line.
/// A journal line that does not fit the state it follows.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Mismatch(String);

fn replay(stored: &mut Stored, e: Entry) -> Result<(), Mismatch> {
    let services = &mut stored.state.services;
    // Services replaced where they were (the common write) are put in
    // place, not by moving the ones after them.
    let in_place = e.removed.len() == e.inserted.len() && e.removed.iter().zip(&e.inserted).all(|(j, (i, _))| i == j);
    if in_place {
        for (i, s) in e.inserted {
            if i >= services.len() {
                return Err(Mismatch(format!("replaces service {i} of {}", services.len())));
            }
            services[i] = s;
        }
    } else {
        for j in e.removed.iter().rev() {
            if *j >= services.len() {
                return Err(Mismatch(format!("removes service {j} of {}", services.len())));
            }
            services.remove(*j);
        }
        for (i, s) in e.inserted {
            if i > services.len() {
                return Err(Mismatch(format!("puts a service at {i} of {}", services.len())));
            }
            services.insert(i, s);
        }
    }
    if let Some(c) = e.ids {
        stored.ids = Arc::new(stored.ids.with(&c.set, &c.removed, c.next));
    }
    stored.generation = e.generation;
    Ok(())
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
        let s = Stored { generation: 7, ids: Arc::new(ServiceIds::default()), state: doc };
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

    /// A store in `d` and a state of three services saved whole in it.
    fn started(d: &Path) -> (Store, Stored, State) {
        let store = Store::new(d);
        let mut text = String::from("nodes: [{name: a, address: 172.18.0.2}]\nservices:\n");
        for i in 0..3 {
            text += &format!(
                " - {{name: s{i}, vip: 10.96.0.{}, ports: [{{port: 80}}], endpoints: [{{ip: 10.0.0.1, node: a}}]}}\n",
                i + 1
            );
        }
        let doc = parse_document(&text).unwrap();
        let state = State::from_document(&doc).unwrap();
        let stored =
            Stored { generation: 1, ids: Arc::new(ServiceIds::default().assign(&state.frontend_keys())), state: doc };
        store.save(&stored).unwrap();
        (store, stored, state)
    }

    /// One write through planning and `save_change`.
    fn write(store: &Store, cur: &mut (Stored, State), edit: impl FnOnce(&mut Document)) {
        let index = crate::model::Index::of(&cur.1, 256);
        let node = crate::model::NodeName::parse("a").unwrap();
        let p = crate::control::plan((&cur.0, &cur.1, &index), None, &node, &Default::default(), |d| {
            edit(d);
            Ok(())
        })
        .unwrap();
        store.save_change(&cur.0, &p.stored, &p.changes, &p.state).unwrap();
        *cur = (p.stored, p.state);
    }

    fn journal_lines(d: &Path) -> usize {
        std::fs::read_to_string(d.join(Store::JOURNAL)).map_or(0, |t| t.lines().count())
    }

    #[test]
    fn writes_are_journaled_and_replayed_to_the_same_state() {
        let d = dir("journal");
        let (store, stored, state) = started(&d);
        let whole = std::fs::read(d.join(Store::FILE)).unwrap();
        let mut cur = (stored, state);
        write(&store, &mut cur, |d| d.service_mut(1).endpoints[0].weight = 5);
        write(&store, &mut cur, |d| drop(d.services.remove(0)));
        write(&store, &mut cur, |d| {
            let mut s = (*d.services[0]).clone();
            s.name = "new".into();
            s.vip = "10.96.0.9".into();
            s.ports[0].port = 8080;
            d.services.insert(1, Arc::new(s));
        });
        write(&store, &mut cur, |d| d.service_mut(2).ports[0].port = 81);
        assert_eq!(journal_lines(&d), 4, "four writes, four lines");
        assert_eq!(std::fs::read(d.join(Store::FILE)).unwrap(), whole, "the whole file is as it was");
        let loaded = Store::new(&d).load().unwrap().unwrap();
        assert_eq!(loaded, cur.0, "replayed: services, order, ids and generation");
        assert_eq!(loaded.ids.get("default/s0:80"), None, "the removed service's id is gone");
        assert!(loaded.ids.get("default/s2:81").is_some() && loaded.ids.get("default/s2:80").is_none());

        // Reordered services are replayed in their new order.
        write(&store, &mut cur, |d| d.services.reverse());
        assert_eq!(journal_lines(&d), 5);
        assert_eq!(Store::new(&d).load().unwrap().unwrap(), cur.0);
        // Changing the nodes writes it whole, and the journal starts over.
        write(&store, &mut cur, |d| d.nodes[0].address = "172.18.0.9".into());
        assert_eq!(journal_lines(&d), 0);
        assert_eq!(Store::new(&d).load().unwrap().unwrap(), cur.0);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_journal_larger_than_the_whole_file_starts_over() {
        let d = dir("compact");
        let (mut store, stored, state) = started(&d);
        store.journal_min = 0;
        let whole = std::fs::metadata(d.join(Store::FILE)).unwrap().len();
        let mut cur = (stored, state);
        let mut most = 0;
        for w in 1..40 {
            write(&store, &mut cur, |d| d.service_mut(0).endpoints[0].weight = w);
            let j = std::fs::metadata(d.join(Store::JOURNAL)).map_or(0, |m| m.len());
            assert!(j <= whole, "journal {j} > whole file {whole}");
            most = most.max(j);
        }
        assert!(most > 0, "writes were journaled");
        let rewritten: Stored = serde_json::from_slice(&std::fs::read(d.join(Store::FILE)).unwrap()).unwrap();
        assert!(rewritten.generation > 1, "and the whole file was written again when the journal outgrew it");
        assert_eq!(Store::new(&d).load().unwrap().unwrap(), cur.0);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_torn_last_line_is_cut_off_and_a_bad_one_before_it_is_corrupt() {
        let d = dir("torn");
        let (store, stored, state) = started(&d);
        let mut cur = (stored, state);
        write(&store, &mut cur, |d| d.service_mut(0).endpoints[0].weight = 2);
        let acknowledged = cur.0.clone();
        let journal = d.join(Store::JOURNAL);
        let good = std::fs::read(&journal).unwrap();
        let mut torn = good.clone();
        torn.extend_from_slice(b"{\"generation\":3,\"inser");
        std::fs::write(&journal, &torn).unwrap();
        assert_eq!(Store::new(&d).load().unwrap().unwrap(), acknowledged);
        assert_eq!(std::fs::read(&journal).unwrap(), good, "the torn line was cut off");

        let mut bad = b"{\"generation\":2,oops}\n".to_vec();
        bad.extend_from_slice(&good);
        std::fs::write(&journal, &bad).unwrap();
        let e = Store::new(&d).load().unwrap_err().to_string();
        assert!(e.contains("state.journal is corrupt: line 1"), "{e}");
        assert_eq!(std::fs::read(&journal).unwrap(), bad, "left as it is");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
