//! The next levels of a topic trie node: a few in a vector (most nodes of a
//! fleet's topic tree have one child), more in a map.
//!
//! A level's name is stored inline when it is short (up to 16 bytes, e.g. a
//! device id or `command`), so finding a child reads the node's vector or
//! the map's slot and nothing behind another pointer; maps hash with
//! foldhash (a lookup costs a few nanoseconds, not SipHash's tens).

use std::borrow::Borrow;
use std::collections::HashMap;

use smallvec::SmallVec;

/// Children a node keeps in a vector before switching to a map.
const FEW: usize = 8;

/// A level's name: inline up to 16 bytes, on the heap beyond.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Level(SmallVec<[u8; 16]>);

impl Level {
    fn new(level: &str) -> Level {
        Level(SmallVec::from_slice(level.as_bytes()))
    }

    pub fn as_str(&self) -> &str {
        // Built from a `&str` only (`Level::new`)
        std::str::from_utf8(&self.0).expect("a level is built from a str")
    }
}

impl Borrow<[u8]> for Level {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

type Map<N> = HashMap<Level, N, foldhash::fast::RandomState>;

#[derive(Debug)]
pub enum Children<N> {
    Few(Vec<(Level, N)>),
    Many(Map<N>),
}

impl<N> Default for Children<N> {
    fn default() -> Self {
        Children::Few(Vec::new())
    }
}

impl<N: Default> Children<N> {
    pub fn is_empty(&self) -> bool {
        match self {
            Children::Few(v) => v.is_empty(),
            Children::Many(m) => m.is_empty(),
        }
    }

    pub fn get(&self, level: &str) -> Option<&N> {
        let level = level.as_bytes();
        match self {
            Children::Few(v) => v.iter().find(|(l, _)| *l.0 == *level).map(|(_, n)| n),
            Children::Many(m) => m.get(level),
        }
    }

    pub fn get_mut(&mut self, level: &str) -> Option<&mut N> {
        let level = level.as_bytes();
        match self {
            Children::Few(v) => v.iter_mut().find(|(l, _)| *l.0 == *level).map(|(_, n)| n),
            Children::Many(m) => m.get_mut(level),
        }
    }

    /// The child at `level`, created empty if missing.
    pub fn entry(&mut self, level: &str) -> &mut N {
        let bytes = level.as_bytes();
        if let Children::Few(v) = self {
            if v.len() >= FEW && !v.iter().any(|(l, _)| *l.0 == *bytes) {
                let map = std::mem::take(v).into_iter().collect();
                *self = Children::Many(map);
            }
        }
        match self {
            Children::Few(v) => {
                let i = match v.iter().position(|(l, _)| *l.0 == *bytes) {
                    Some(i) => i,
                    None => {
                        v.reserve_exact(1);
                        v.push((Level::new(level), N::default()));
                        v.len() - 1
                    }
                };
                &mut v[i].1
            }
            Children::Many(m) => m.entry(Level::new(level)).or_default(),
        }
    }

    pub fn remove(&mut self, level: &str) {
        let bytes = level.as_bytes();
        match self {
            Children::Few(v) => {
                if let Some(i) = v.iter().position(|(l, _)| *l.0 == *bytes) {
                    v.swap_remove(i);
                    if v.is_empty() {
                        *v = Vec::new();
                    }
                }
            }
            Children::Many(m) => {
                m.remove(bytes);
            }
        }
    }

    pub fn iter(&self) -> Box<dyn Iterator<Item = (&str, &N)> + '_> {
        match self {
            Children::Few(v) => Box::new(v.iter().map(|(l, n)| (l.as_str(), n))),
            Children::Many(m) => Box::new(m.iter().map(|(l, n)| (l.as_str(), n))),
        }
    }
}

#[cfg(test)]
mod test {
    use super::{Children, FEW};

    #[test]
    fn few_then_many_children_keep_their_names() {
        let mut c: Children<usize> = Children::default();
        let names: Vec<String> = (0..FEW * 2)
            .map(|i| format!("level-{i}-with-a-name-longer-than-sixteen-bytes-{}", i % 2))
            .chain((0..FEW).map(|i| format!("d{i}")))
            .collect();
        for (i, n) in names.iter().enumerate() {
            *c.entry(n) = i;
        }
        assert!(matches!(c, Children::Many(_)));
        for (i, n) in names.iter().enumerate() {
            assert_eq!(c.get(n), Some(&i));
        }
        let mut seen: Vec<&str> = c.iter().map(|(l, _)| l).collect();
        seen.sort_unstable();
        let mut want: Vec<&str> = names.iter().map(String::as_str).collect();
        want.sort_unstable();
        assert_eq!(seen, want);
        c.remove("d0");
        assert_eq!(c.get("d0"), None);
        assert_eq!(c.get("d1"), Some(&(FEW * 2 + 1)));
    }
}
