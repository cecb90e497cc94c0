//! A list whose copies share everything a write did not touch: the
//! services of successive documents and states are one list with a few
//! entries changed, so a copy (and a drop) must not touch every entry.
//! Entries live in chunks of [`CHUNK`] behind `Arc`s; a copy clones the
//! chunk pointers, and a write clones the one chunk it changes. Putting
//! in or taking out an entry in the middle rebuilds the chunks after it
//! (pointer copies).

use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub const CHUNK: usize = 64;

/// Every chunk but the last holds exactly [`CHUNK`] entries; none is empty.
pub struct Chunked<T> {
    chunks: Vec<Arc<Vec<T>>>,
    len: usize,
}

impl<T> Default for Chunked<T> {
    fn default() -> Self {
        Self { chunks: Vec::new(), len: 0 }
    }
}

impl<T> Clone for Chunked<T> {
    fn clone(&self) -> Self {
        Self { chunks: self.chunks.clone(), len: self.len }
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Chunked<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<T: PartialEq> PartialEq for Chunked<T> {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.chunks.iter().zip(&other.chunks).all(|(a, b)| Arc::ptr_eq(a, b) || a == b)
    }
}

impl<T> Chunked<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: usize) -> Option<&T> {
        self.chunks.get(i / CHUNK)?.get(i % CHUNK)
    }

    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &T> + '_ {
        self.chunks.iter().flat_map(|c| c.iter())
    }

    /// The chunks, for walking two lists a chunk at a time.
    pub fn chunks(&self) -> &[Arc<Vec<T>>] {
        &self.chunks
    }
}

impl<T: Clone> Chunked<T> {
    pub fn push(&mut self, x: T) {
        match self.chunks.last_mut() {
            Some(c) if c.len() < CHUNK => Arc::make_mut(c).push(x),
            _ => self.chunks.push(Arc::new(vec![x])),
        }
        self.len += 1;
    }

    /// Appends `chunk` as it is (shared) when the list ends on a chunk
    /// boundary and `chunk` is a full one or the list's last; entry by
    /// entry otherwise.
    pub fn push_chunk(&mut self, chunk: &Arc<Vec<T>>) {
        if self.len.is_multiple_of(CHUNK) && !chunk.is_empty() && chunk.len() <= CHUNK {
            self.len += chunk.len();
            self.chunks.push(chunk.clone());
        } else {
            chunk.iter().for_each(|x| self.push(x.clone()));
        }
    }

    /// Entry `i` to change: its chunk is copied if another list shares it.
    pub fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        let c = self.chunks.get_mut(i / CHUNK)?;
        Arc::make_mut(c).get_mut(i % CHUNK)
    }

    /// Rebuilds the list from chunk `from` on with `f` applied to the
    /// entries there.
    fn rebuild_from(&mut self, from: usize, f: impl FnOnce(&mut Vec<T>)) {
        let mut tail: Vec<T> =
            self.chunks[from.min(self.chunks.len())..].iter().flat_map(|c| c.iter().cloned()).collect();
        self.chunks.truncate(from);
        self.len = from * CHUNK;
        f(&mut tail);
        tail.into_iter().for_each(|x| self.push(x));
    }

    pub fn insert(&mut self, i: usize, x: T) {
        assert!(i <= self.len, "insert at {i} of {}", self.len);
        let c = i / CHUNK;
        self.rebuild_from(c, |t| t.insert(i - c * CHUNK, x));
    }

    pub fn remove(&mut self, i: usize) -> T {
        assert!(i < self.len, "remove at {i} of {}", self.len);
        let c = i / CHUNK;
        let mut out = None;
        self.rebuild_from(c, |t| out = Some(t.remove(i - c * CHUNK)));
        out.expect("removed")
    }

    pub fn pop(&mut self) -> Option<T> {
        let n = self.len.checked_sub(1)?;
        Some(self.remove(n))
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        let first = self.iter().position(|x| !keep(x));
        if let Some(first) = first {
            let c = first / CHUNK;
            self.rebuild_from(c, |t| t.retain(keep));
        }
    }

    pub fn sort_by(&mut self, cmp: impl FnMut(&T, &T) -> std::cmp::Ordering) {
        self.rebuild_from(0, |t| t.sort_by(cmp));
    }

    pub fn reverse(&mut self) {
        self.rebuild_from(0, |t| t.reverse());
    }

    pub fn truncate(&mut self, n: usize) {
        if n < self.len {
            self.rebuild_from(n / CHUNK, |t| t.truncate(n % CHUNK));
        }
    }
}

impl<T> std::ops::Index<usize> for Chunked<T> {
    type Output = T;
    fn index(&self, i: usize) -> &T {
        self.get(i).unwrap_or_else(|| panic!("index {i} of a list of {}", self.len))
    }
}

impl<T: Clone> std::ops::IndexMut<usize> for Chunked<T> {
    fn index_mut(&mut self, i: usize) -> &mut T {
        let len = self.len;
        self.get_mut(i).unwrap_or_else(|| panic!("index {i} of a list of {len}"))
    }
}

impl<T: Clone> FromIterator<T> for Chunked<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut out = Self::default();
        iter.into_iter().for_each(|x| out.push(x));
        out
    }
}

impl<T: Clone> From<Vec<T>> for Chunked<T> {
    fn from(v: Vec<T>) -> Self {
        v.into_iter().collect()
    }
}

impl<'a, T> IntoIterator for &'a Chunked<T> {
    type Item = &'a T;
    type IntoIter = Box<dyn DoubleEndedIterator<Item = &'a T> + 'a>;
    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

impl<T: Serialize> Serialize for Chunked<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

/// A list of `T` in the state document's JSON Schema, as it is written.
impl<T: schemars::JsonSchema> schemars::JsonSchema for Chunked<T> {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        Vec::<T>::schema_name()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        Vec::<T>::json_schema(generator)
    }
}

impl<'de, T: Deserialize<'de> + Clone> Deserialize<'de> for Chunked<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<T>::deserialize(d).map(Self::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every chunk but the last is full, and the entries are `want`.
    fn check(c: &Chunked<u32>, want: &[u32]) {
        assert_eq!(c.iter().copied().collect::<Vec<_>>(), want);
        assert_eq!(c.len(), want.len());
        let n = c.chunks().len();
        for (k, ch) in c.chunks().iter().enumerate() {
            assert!(!ch.is_empty() && (k + 1 == n || ch.len() == CHUNK), "chunk {k} of {n}: {}", ch.len());
        }
        for (i, w) in want.iter().enumerate() {
            assert_eq!(c[i], *w);
        }
    }

    #[test]
    fn edits_keep_the_shape_and_copies_share_what_they_did_not_touch() {
        let mut want: Vec<u32> = (0..300).collect();
        let a: Chunked<u32> = want.iter().copied().collect();
        check(&a, &want);
        let mut b = a.clone();
        b[200] = 7;
        want[200] = 7;
        check(&b, &want);
        let shared = a.chunks().iter().zip(b.chunks()).filter(|(x, y)| Arc::ptr_eq(x, y)).count();
        assert_eq!(shared, a.chunks().len() - 1, "only the written chunk was copied");
        assert_eq!(a[200], 200, "the original is as it was");
        b.remove(10);
        want.remove(10);
        check(&b, &want);
        b.insert(64, 1000);
        want.insert(64, 1000);
        check(&b, &want);
        b.push(5);
        want.push(5);
        check(&b, &want);
        b.retain(|x| x % 3 != 0);
        want.retain(|x| x % 3 != 0);
        check(&b, &want);
        b.sort_by(|x, y| y.cmp(x));
        want.sort_by(|x, y| y.cmp(x));
        check(&b, &want);
        b.truncate(65);
        want.truncate(65);
        check(&b, &want);
        assert_eq!(b.pop(), want.pop());
        check(&b, &want);
        let mut c = Chunked::default();
        c.push_chunk(&a.chunks()[0]);
        c.push_chunk(&a.chunks()[4]);
        c.push(9);
        check(&c, &[(0..64).collect::<Vec<_>>(), (256..300).collect(), vec![9]].concat());
        assert!(Arc::ptr_eq(&c.chunks()[0], &a.chunks()[0]));
        let json = serde_json::to_string(&b).unwrap();
        let back: Chunked<u32> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, b);
    }
}
