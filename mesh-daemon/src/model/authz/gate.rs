//! The gates of a policy: the hashes of the exact principals or paths its
//! rules ask for, so a policy no rule of which can match a caller or path
//! costs one lookup.

use super::{Pattern, Rule};

/// A gate: hashes ([`gate_hash`]) of the values a policy's rules ask for.
/// Its keys are hashes already, so the set does not hash them again.
pub type Gate = std::collections::HashSet<u64, std::hash::BuildHasherDefault<Prehashed>>;

/// The hasher of a [`Gate`]: a `u64` key is its own hash.
#[derive(Default)]
pub struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here; fold anything else in.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The hash of a principal or a path, computed once per request for every
/// policy's gates ([`Policy::principal_gate`], [`Policy::path_gate`]).
/// FNV-1a: a few cycles a byte. A crafted value that collides with a
/// gate's only costs the rules' own checks.
pub fn gate_hash(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The path gate of `rules`: Some when each rule has a `to` whose every
/// operation names exact paths.
pub fn path_gate(rules: &[Rule]) -> Option<Gate> {
    exact_gate(rules, |r| &r.to, |o| &o.paths)
}

/// The gate of `rules`: Some when each rule has a `from` whose every
/// source names exact principals.
pub fn principal_gate(rules: &[Rule]) -> Option<Gate> {
    exact_gate(rules, |r| &r.from, |s| &s.principals)
}

/// The hashes of the values `rules` ask for, when every rule has `parts`
/// (its sources, or its operations) and each part asks for exact `values`
/// only: else None, no gate.
fn exact_gate<T>(rules: &[Rule], parts: fn(&Rule) -> &[T], values: fn(&T) -> &[Pattern]) -> Option<Gate> {
    let mut gate = Gate::default();
    for r in rules {
        let parts = parts(r);
        if parts.is_empty() {
            return None;
        }
        for part in parts {
            let vs = values(part);
            if vs.is_empty() {
                return None;
            }
            for v in vs {
                match v {
                    Pattern::Exact(v) => gate.insert(gate_hash(v)),
                    _ => return None,
                };
            }
        }
    }
    (!rules.is_empty()).then_some(gate)
}
