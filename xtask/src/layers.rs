//! The daemon's layering as a gate of `cargo xtask test` (and
//! `cargo xtask layers`): every `crate::` and `super::` path in
//! mesh-daemon's library is an edge from the file that writes it to the
//! module file it names. The check fails on
//! - an edge from a top-level module to one of the same or a higher layer
//!   in [`LAYERS`] (a back-edge), and
//! - any cycle between files, at any depth, other than a module and its
//!   own descendants (a `mod.rs` declaring children that use its items is
//!   how Rust modules are built, not a cycle).
//!
//! It reads the source as text, with comments, strings and character
//! literals skipped, so it needs no build and runs in well under a second.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// mesh-daemon's top-level modules, bottom layer first. A module may use
/// only modules of layers below its own; modules of one layer are
/// independent of each other. docs/src/concepts/architecture.md draws the same list.
pub const LAYERS: &[&[&str]] = &[
    // Leaves: mechanisms with no knowledge of the mesh.
    &["heap", "shared_map", "handover", "env"],
    &["drain", "relay"],
    // The desired state and what is legal: services, workloads, identities.
    &["model"],
    // Endpoint choice: weights, P2C, breaker, retry budget.
    &["balance"],
    // The registry, the admin port, the log writer.
    &["telemetry"],
    // The kernel side: load, attach, maps, original destination.
    &["datapath"],
    // Certificates, rustls configurations, the issuer.
    &["identity"],
    &["health"],
    &["tunnel"],
    &["proxy"],
    // The Unix-socket API, persistence, publication of snapshots.
    &["control"],
    &["discovery"],
    // What wires the units together.
    &["run"],
    &["fuzzing"],
];

/// One place a file names another module.
#[derive(Debug, Clone)]
pub struct Edge {
    /// Written in a `#[cfg(test)]` module.
    pub test: bool,
    pub from: PathBuf,
    pub line: usize,
    pub to: PathBuf,
    pub path: String,
}

/// The module files of a crate's `src/` folder, by module path.
fn modules(src: &Path) -> std::io::Result<BTreeMap<Vec<String>, PathBuf>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let p = entry?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "rs") {
                let rel = p.strip_prefix(src).unwrap_or(&p);
                let mut parts: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
                let file = parts.pop().unwrap_or_default();
                match file.as_str() {
                    "mod.rs" => {}
                    "lib.rs" if parts.is_empty() => {}
                    // The binaries are crates of their own.
                    "main.rs" if parts.is_empty() => continue,
                    _ => parts.push(file.trim_end_matches(".rs").to_owned()),
                }
                if parts.first().is_some_and(|p| p == "bin") {
                    continue;
                }
                out.insert(parts, rel.to_path_buf());
            }
        }
    }
    Ok(out)
}

/// `src` with comments, string and character literals blanked (newlines
/// kept, so line numbers hold).
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, s: &[u8]| out.extend(s.iter().map(|&c| if c == b'\n' { b'\n' } else { b' ' }));
    while i < b.len() {
        let rest = &b[i..];
        let end = if rest.starts_with(b"//") {
            i + rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len())
        } else if rest.starts_with(b"/*") {
            let mut depth = 0;
            let mut j = i;
            loop {
                if j + 1 >= b.len() {
                    break b.len();
                }
                if b[j] == b'/' && b[j + 1] == b'*' {
                    depth += 1;
                    j += 2;
                } else if b[j] == b'*' && b[j + 1] == b'/' {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break j;
                    }
                } else {
                    j += 1;
                }
            }
        } else if (rest.starts_with(b"r\"") || rest.starts_with(b"r#") || rest.starts_with(b"br"))
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
        {
            let start = if rest[0] == b'b' { 2 } else { 1 };
            let hashes = rest[start..].iter().take_while(|&&c| c == b'#').count();
            if rest.get(start + hashes) != Some(&b'"') {
                out.push(b[i]);
                i += 1;
                continue;
            }
            let close: Vec<u8> = std::iter::once(b'"').chain(std::iter::repeat_n(b'#', hashes)).collect();
            let body = i + start + hashes + 1;
            b[body..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(b.len(), |p| body + p + close.len())
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            (j + 1).min(b.len())
        } else if b[i] == b'\'' {
            // A character literal ('x', '\n', '\'', 'é'), not a lifetime ('a).
            let end = if rest.get(1) == Some(&b'\\') {
                rest.get(3..).and_then(|r| r.iter().position(|&c| c == b'\'')).map(|p| i + 3 + p + 1)
            } else {
                let len = rest.get(1).map_or(1, |&c| utf8_len(c));
                (rest.get(1 + len) == Some(&b'\'')).then_some(i + len + 2)
            };
            match end {
                Some(end) => end,
                None => {
                    out.push(b[i]);
                    i += 1;
                    continue;
                }
            }
        } else {
            out.push(b[i]);
            i += 1;
            continue;
        };
        blank(&mut out, &b[i..end]);
        i = end;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The length of the UTF-8 character whose first byte is `first`.
fn utf8_len(first: u8) -> usize {
    match first {
        0xF0.. => 4,
        0xE0.. => 3,
        0xC0.. => 2,
        _ => 1,
    }
}

fn ident_at(s: &[u8], mut i: usize) -> (String, usize) {
    let start = i;
    while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'_') {
        i += 1;
    }
    (String::from_utf8_lossy(&s[start..i]).into_owned(), i)
}

fn skip_ws(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && s[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// The paths a use tree or expression path names from `i` (just after
/// `crate::` or `super::`): `a::b::{c, d::e}` gives `a::b::c`, `a::b::d::e`.
fn paths_at(s: &[u8], i: usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let mut segs = prefix;
    let mut i = skip_ws(s, i);
    loop {
        if s.get(i) == Some(&b'{') {
            i += 1;
            loop {
                i = skip_ws(s, i);
                match s.get(i) {
                    Some(b'}') => return i + 1,
                    Some(b',') => i += 1,
                    None => return i,
                    _ => {
                        let before = i;
                        i = paths_at(s, i, segs.clone(), out);
                        if i == before {
                            i += 1;
                        }
                    }
                }
            }
        }
        let (id, j) = ident_at(s, i);
        if id.is_empty() {
            out.push(segs);
            return i;
        }
        segs.push(id);
        i = skip_ws(s, j);
        if s[i..].starts_with(b"::") {
            i = skip_ws(s, i + 2);
        } else {
            out.push(segs);
            return i;
        }
    }
}

/// A path one file names.
struct Found {
    line: usize,
    path: Vec<String>,
    text: String,
    /// `pub use`: the module and the name it re-exports the path under.
    reexport: Option<(Vec<String>, String)>,
    /// Inside a `#[cfg(test)]` module: held to the layers, but not a cycle
    /// (a unit test may use its crate's higher-level helpers).
    test: bool,
}

/// The module paths one file (module path `module`) names.
fn file_edges(src: &str, module: &[String]) -> Vec<Found> {
    let code = code_only(src);
    let s = code.as_bytes();
    let mut out = Vec::new();
    // Inline modules (`mod tests { ... }`): (name, brace depth inside,
    // whether under `#[cfg(test)]`).
    let mut inline: Vec<(String, usize, bool)> = Vec::new();
    let mut depth = 0usize;
    let mut line = 1;
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        if c == b'\n' {
            line += 1;
        }
        let boundary = i == 0 || !(s[i - 1].is_ascii_alphanumeric() || s[i - 1] == b'_' || s[i - 1] == b':');
        if c == b'{' {
            depth += 1;
        } else if c == b'}' {
            if inline.last().is_some_and(|(_, d, _)| *d == depth) {
                inline.pop();
            }
            depth = depth.saturating_sub(1);
        } else if boundary && s[i..].starts_with(b"mod ") {
            let (name, j) = ident_at(s, skip_ws(s, i + 4));
            let j = skip_ws(s, j);
            if !name.is_empty() && s.get(j) == Some(&b'{') {
                depth += 1;
                let attrs = String::from_utf8_lossy(&s[i.saturating_sub(40)..i]);
                let test = attrs.trim_end().ends_with("#[cfg(test)]");
                inline.push((name, depth, test));
                i = j + 1;
                continue;
            }
        } else if boundary
            && (s[i..].starts_with(b"crate::") || s[i..].starts_with(b"super::") || s[i..].starts_with(b"use "))
        {
            let mut here: Vec<String> = module.to_vec();
            here.extend(inline.iter().map(|(n, _, _)| n.clone()));
            let test = inline.iter().any(|(_, _, t)| *t);
            // A `use` tree without `crate::`/`super::` starts at this module
            // (a child module) or is another crate's (it then resolves to
            // this file and is dropped).
            let public = s[i..].starts_with(b"use ") && {
                let before = String::from_utf8_lossy(&s[i.saturating_sub(16)..i]);
                let before = before.trim_end();
                before.ends_with("pub") || before.ends_with(')') && before.contains("pub(")
            };
            let mut i0 = i;
            if s[i..].starts_with(b"use ") {
                i0 = skip_ws(s, i + 4);
                if s[i0..].starts_with(b"self::") {
                    i0 += 6;
                }
            }
            let (base, mut j) = if s[i0..].starts_with(b"crate::") {
                (Vec::new(), i0 + 7)
            } else if s[i0..].starts_with(b"::") {
                (vec!["::".to_owned()], i0 + 2)
            } else if !s[i0..].starts_with(b"super::") {
                (here.clone(), i0)
            } else {
                let i = i0;
                let mut b = here.clone();
                b.pop();
                let mut j = i + 7;
                while s[j..].starts_with(b"super::") {
                    b.pop();
                    j += 7;
                }
                (b, j)
            };
            j = skip_ws(s, j);
            let mut paths = Vec::new();
            let end = paths_at(s, j, base, &mut paths);
            let text = String::from_utf8_lossy(&s[i..end]).split_whitespace().collect::<Vec<_>>().join(" ");
            for p in paths {
                let name = public.then(|| p.last().cloned()).flatten();
                out.push(Found { line, path: p, text: text.clone(), reexport: name.map(|n| (here.clone(), n)), test });
            }
            for &c in &s[i..end] {
                if c == b'\n' {
                    line += 1;
                }
            }
            i = end;
            continue;
        }
        i += 1;
    }
    out
}

/// Every edge between two module files of the crate at `src`.
pub fn edges(src: &Path) -> std::io::Result<Vec<Edge>> {
    let mods = modules(src)?;
    let mut found = Vec::new();
    for (module, file) in &mods {
        let text = std::fs::read_to_string(src.join(file))?;
        found.extend(file_edges(&text, module).into_iter().map(|f| (file, f)));
    }
    // A path through a re-export (`pub use routes::Route` in proxy/mod.rs)
    // is an edge to where the item is defined.
    let reexports: BTreeMap<(Vec<String>, String), Vec<String>> =
        found.iter().filter_map(|(_, f)| Some((f.reexport.clone()?, f.path.clone()))).collect();
    let resolve = |mut path: Vec<String>| {
        if path.first().is_some_and(|p| p == "::") {
            return None;
        }
        for _ in 0..8 {
            let n = (0..=path.len()).rev().find(|n| mods.contains_key(&path[..*n])).unwrap_or(0);
            match path.get(n).and_then(|item| reexports.get(&(path[..n].to_vec(), item.clone()))) {
                Some(target) if *target != path => {
                    let mut next = target.clone();
                    next.extend(path[n + 1..].iter().cloned());
                    path = next;
                }
                _ => return mods.get(&path[..n]),
            }
        }
        None
    };
    let mut out = Vec::new();
    for (file, f) in found {
        if f.reexport.is_some() {
            // Counted at the file that uses it; the re-export itself is a
            // module's facade over its own children.
            if let Some(to) = resolve(f.path.clone()).filter(|t| *t != file && !nested(file, t)) {
                out.push(Edge { test: f.test, from: file.clone(), line: f.line, to: to.clone(), path: f.text });
            }
            continue;
        }
        if let Some(to) = resolve(f.path).filter(|t| *t != file) {
            out.push(Edge { test: f.test, from: file.clone(), line: f.line, to: to.clone(), path: f.text });
        }
    }
    Ok(out)
}

fn top(file: &Path) -> String {
    let first = file.iter().next().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    first.trim_end_matches(".rs").to_owned()
}

fn module_dir(file: &Path) -> PathBuf {
    if file.file_name().is_some_and(|n| n == "mod.rs" || n == "lib.rs") {
        file.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        file.with_extension("")
    }
}

/// Whether one of the two files is a module and the other lies inside it.
fn nested(a: &Path, b: &Path) -> bool {
    let (da, db) = (module_dir(a), module_dir(b));
    b.starts_with(&da) || a.starts_with(&db)
}

/// The problems of the crate at `src`: back-edges between layers, and
/// cycles between files. Empty when the layering holds.
pub fn problems(src: &Path, layers: &[&[&str]]) -> std::io::Result<Vec<String>> {
    let edges = edges(src)?;
    let rank = |m: &str| layers.iter().position(|l| l.contains(&m));
    let mut out = Vec::new();
    for e in &edges {
        let (a, b) = (top(&e.from), top(&e.to));
        if a == b || a == "lib" || b == "lib" {
            continue;
        }
        match (rank(&a), rank(&b)) {
            (None, _) => {
                out.push(format!("{}: module `{a}` is in no layer: add it to xtask/src/layers.rs", e.from.display()))
            }
            (_, None) => {
                out.push(format!("{}: module `{b}` is in no layer: add it to xtask/src/layers.rs", e.to.display()))
            }
            (Some(ra), Some(rb)) if rb >= ra => out.push(format!(
                "{}:{}: `{}` makes {a} (layer {ra}) use {b} (layer {rb}), which is not below it",
                e.from.display(),
                e.line,
                e.path
            )),
            _ => {}
        }
    }
    // Cycles between files (Tarjan's strongly connected components).
    let mut graph: BTreeMap<&Path, BTreeSet<&Path>> = BTreeMap::new();
    for e in edges.iter().filter(|e| !e.test) {
        if !nested(&e.from, &e.to) {
            graph.entry(&e.from).or_default().insert(&e.to);
            graph.entry(&e.to).or_default();
        }
    }
    for scc in strongly_connected(&graph).into_iter().filter(|c| c.len() > 1) {
        let members: BTreeSet<&Path> = scc.iter().copied().collect();
        let how: Vec<String> = edges
            .iter()
            .filter(|e| members.contains(e.from.as_path()) && members.contains(e.to.as_path()))
            .filter(|e| !e.test && !nested(&e.from, &e.to))
            .map(|e| format!("  {}:{} -> {} (`{}`)", e.from.display(), e.line, e.to.display(), e.path))
            .collect();
        let names: Vec<String> = members.iter().map(|p| p.display().to_string()).collect();
        out.push(format!("a cycle between {}:\n{}", names.join(", "), how.join("\n")));
    }
    out.dedup();
    Ok(out)
}

fn strongly_connected<'a>(graph: &BTreeMap<&'a Path, BTreeSet<&'a Path>>) -> Vec<Vec<&'a Path>> {
    struct St<'a> {
        index: BTreeMap<&'a Path, usize>,
        low: BTreeMap<&'a Path, usize>,
        on: BTreeSet<&'a Path>,
        stack: Vec<&'a Path>,
        out: Vec<Vec<&'a Path>>,
    }
    fn visit<'a>(v: &'a Path, g: &BTreeMap<&'a Path, BTreeSet<&'a Path>>, st: &mut St<'a>) {
        let n = st.index.len();
        st.index.insert(v, n);
        st.low.insert(v, n);
        st.stack.push(v);
        st.on.insert(v);
        for &w in g.get(v).into_iter().flatten() {
            if !st.index.contains_key(w) {
                visit(w, g, st);
                let lw = st.low[w];
                let lv = st.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if st.on.contains(w) {
                let iw = st.index[w];
                let lv = st.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if st.low[v] == st.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = st.stack.pop() {
                st.on.remove(w);
                comp.push(w);
                if w == v {
                    break;
                }
            }
            st.out.push(comp);
        }
    }
    let mut st =
        St { index: BTreeMap::new(), low: BTreeMap::new(), on: BTreeSet::new(), stack: Vec::new(), out: Vec::new() };
    for &v in graph.keys() {
        if !st.index.contains_key(v) {
            visit(v, graph, &mut st);
        }
    }
    st.out
}

/// The library files that may use `anyhow` (a name, or a folder ending in
/// `/`): none. The binaries (package mesh-cli) may; the library, the
/// wiring in `run/` included, returns typed errors.
pub const ANYHOW_ALLOWED: &[&str] = &[];

/// Whether the library package's manifest names `anyhow` (as a dependency
/// or a build dependency): the library must not depend on it at all.
pub fn anyhow_dependency(manifest: &str) -> Option<String> {
    manifest
        .lines()
        .enumerate()
        .find(|(_, l)| l.trim_start().starts_with("anyhow"))
        .map(|(n, _)| format!("mesh-daemon/Cargo.toml:{}: the library depends on anyhow: only mesh-cli may", n + 1))
}

/// Library files (not the binaries) that use `anyhow` outside
/// [`ANYHOW_ALLOWED`], or return a bare `Result<_, String>`.
pub fn untyped_errors(src: &Path, allowed: &[&str]) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    for file in modules(src)?.into_values() {
        let code = code_only(&std::fs::read_to_string(src.join(&file))?);
        for (n, line) in code.lines().enumerate() {
            let name = file.display().to_string();
            if line.contains("anyhow")
                && !allowed.iter().any(|a| name == *a || (a.ends_with('/') && name.starts_with(a)))
            {
                out.push(format!("{name}:{}: anyhow in library code: return a thiserror enum of this module", n + 1));
            }
            let squeezed: String = line.split_whitespace().collect();
            if squeezed.contains("Result<") && squeezed.contains(",String>") {
                let at = squeezed.find("Result<").unwrap_or(0);
                let rest = &squeezed[at..];
                // The `String` is the error of this Result, not a type inside its Ok.
                let mut depth = 0i32;
                let mut comma_at_top = None;
                for (i, c) in rest.char_indices() {
                    match c {
                        '<' => depth += 1,
                        '>' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        ',' if depth == 1 => comma_at_top = Some(i),
                        _ => {}
                    }
                }
                if comma_at_top.is_some_and(|i| rest[i + 1..].starts_with("String>")) {
                    out.push(format!("{name}:{}: Result<_, String>: return a typed error", n + 1));
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The gate: mesh-daemon's library under `root`.
pub fn check(root: &Path) -> anyhow::Result<()> {
    let src = root.join("mesh-daemon/src");
    let mut found = problems(&src, LAYERS)?;
    found.extend(untyped_errors(&src, ANYHOW_ALLOWED)?);
    found.extend(anyhow_dependency(&std::fs::read_to_string(root.join("mesh-daemon/Cargo.toml"))?));
    if !found.is_empty() {
        anyhow::bail!(
            "the daemon's structure is broken ({} problem(s)); move the code to the layer that owns it (or change \
             LAYERS in xtask/src/layers.rs and docs/src/concepts/architecture.md together), and return typed errors:\n{}",
            found.len(),
            found.join("\n")
        );
    }
    Ok(())
}

/// `cargo xtask layers`: the layers and the edges between them.
pub fn print(root: &Path) -> anyhow::Result<()> {
    let src = root.join("mesh-daemon/src");
    let mut between: BTreeMap<(String, String), usize> = BTreeMap::new();
    for e in edges(&src)? {
        let (a, b) = (top(&e.from), top(&e.to));
        if a != b && a != "lib" && b != "lib" {
            *between.entry((a, b)).or_default() += 1;
        }
    }
    for (i, layer) in LAYERS.iter().enumerate().rev() {
        for m in *layer {
            let uses: Vec<String> =
                between.iter().filter(|((a, _), _)| a == m).map(|((_, b), n)| format!("{b} ({n})")).collect();
            println!("{i:>2} {m:<12} uses {}", if uses.is_empty() { "nothing".into() } else { uses.join(", ") });
        }
    }
    check(root)?;
    println!("layers: no back-edge, no cycle, no untyped error in the library");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source tree of one test's own, removed when the test ends.
    struct Tree(PathBuf);

    impl std::ops::Deref for Tree {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tree(name: &str, files: &[(&str, &str)]) -> Tree {
        let dir = std::env::temp_dir().join(format!("xtask-layers-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (path, text) in files {
            let p = dir.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        Tree(dir)
    }

    const LAYERS: &[&[&str]] = &[&["low"], &["mid"], &["high"]];

    fn base() -> Vec<(&'static str, &'static str)> {
        vec![
            ("lib.rs", "mod low; mod mid; mod high;"),
            ("low.rs", "pub struct L;"),
            ("mid/mod.rs", "mod a; mod b; use crate::low::L;"),
            ("mid/a.rs", "pub struct A; use super::b::B;"),
            ("mid/b.rs", "pub struct B; use super::super::low::L;"),
            ("high.rs", "use crate::{low::L, mid::{a::A, b}};"),
        ]
    }

    #[test]
    fn downward_edges_pass() {
        let dir = tree("ok", &base());
        assert_eq!(problems(&dir, LAYERS).unwrap(), Vec::<String>::new());
        let e = edges(&dir).unwrap();
        let high: BTreeSet<String> =
            e.iter().filter(|e| e.from == Path::new("high.rs")).map(|e| e.to.display().to_string()).collect();
        assert_eq!(high, ["low.rs", "mid/a.rs", "mid/b.rs"].map(String::from).into());
    }

    #[test]
    fn a_back_edge_fails_naming_the_line() {
        let mut files = base();
        files[1] = ("low.rs", "pub struct L;\n\nfn f() { let _ = crate::mid::a::A; }");
        let dir = tree("back", &files);
        let p = problems(&dir, LAYERS).unwrap();
        assert!(p.iter().any(|p| p.starts_with("low.rs:3: `crate::mid::a::A` makes low (layer 0) use mid")), "{p:?}");
    }

    #[test]
    fn an_edge_inside_one_layer_fails() {
        let layers: &[&[&str]] = &[&["low", "mid"], &["high"]];
        let dir = tree("same", &base());
        let p = problems(&dir, layers).unwrap();
        assert!(p.iter().any(|p| p.contains("makes mid (layer 0) use low (layer 0)")), "{p:?}");
    }

    #[test]
    fn a_cycle_between_sibling_files_fails_but_a_parent_and_child_do_not() {
        let mut files = base();
        files[4] = ("mid/b.rs", "pub struct B; use super::a::A;");
        let dir = tree("cycle", &files);
        let p = problems(&dir, LAYERS).unwrap();
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("a cycle between mid/a.rs, mid/b.rs"), "{p:?}");
    }

    #[test]
    fn comments_strings_and_test_modules_are_read_right() {
        let mut files = base();
        // A path in a comment or a string is no edge; `super` in an inline
        // module is the file's own module.
        files[1] = (
            "low.rs",
            "// crate::high::X\nconst S: &str = \"crate::high\";\nconst R: &str = r#\"crate::mid\"#;\nconst C: char = '\"';\n\
             #[cfg(test)]\nmod tests { use super::*; fn f<'a>(x: &'a str) {} }",
        );
        let dir = tree("lexing", &files);
        assert_eq!(problems(&dir, LAYERS).unwrap(), Vec::<String>::new());
        files[1] = (
            "low.rs",
            "pub struct L;\nconst Q: char = '\\''; const E: char = 'é';\nmod tests { use super::super::mid::a::A; }",
        );
        let dir = tree("lexing2", &files);
        let p = problems(&dir, LAYERS).unwrap();
        assert!(p.iter().any(|p| p.contains("makes low (layer 0) use mid")), "{p:?}");
    }

    #[test]
    fn anyhow_and_string_errors_in_the_library_fail() {
        let mut files = base();
        files[1] = (
            "low.rs",
            "fn a() -> Result<u8, String> { Ok(1) }\nfn b() -> Result<Vec<String>, Oops> { todo!() }\n\
             fn c() -> anyhow::Result<()> { Ok(()) }\n// anyhow in a comment\nconst S: &str = \"Result<(), String>\";",
        );
        files.push(("wiring.rs", "fn d() -> anyhow::Result<()> { Ok(()) }"));
        let dir = tree("errors", &files);
        let p = untyped_errors(&dir, &["wiring.rs"]).unwrap();
        assert_eq!(
            p,
            [
                "low.rs:1: Result<_, String>: return a typed error",
                "low.rs:3: anyhow in library code: return a thiserror enum of this module",
            ],
        );
    }

    #[test]
    fn an_anyhow_dependency_of_the_library_fails() {
        assert_eq!(anyhow_dependency("[dependencies]\nserde = \"1\"\n"), None);
        let found = anyhow_dependency("[dependencies]\nserde = \"1\"\n\n[build-dependencies]\n  anyhow = \"1\"\n");
        assert_eq!(
            found.as_deref(),
            Some("mesh-daemon/Cargo.toml:5: the library depends on anyhow: only mesh-cli may")
        );
    }

    #[test]
    fn a_module_in_no_layer_fails() {
        let mut files = base();
        files.push(("stray.rs", "use crate::low::L;"));
        let dir = tree("stray", &files);
        let p = problems(&dir, LAYERS).unwrap();
        assert!(p.iter().any(|p| p.contains("module `stray` is in no layer")), "{p:?}");
    }
}
