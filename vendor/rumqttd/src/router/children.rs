//! The next levels of a topic trie node: a few in a vector (most nodes of a
//! fleet's topic tree have one child), more in a map.

use std::collections::HashMap;

/// Children a node keeps in a vector before switching to a map.
const FEW: usize = 8;

#[derive(Debug)]
pub enum Children<N> {
    Few(Vec<(Box<str>, N)>),
    Many(HashMap<Box<str>, N>),
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
        match self {
            Children::Few(v) => v.iter().find(|(l, _)| &**l == level).map(|(_, n)| n),
            Children::Many(m) => m.get(level),
        }
    }

    pub fn get_mut(&mut self, level: &str) -> Option<&mut N> {
        match self {
            Children::Few(v) => v.iter_mut().find(|(l, _)| &**l == level).map(|(_, n)| n),
            Children::Many(m) => m.get_mut(level),
        }
    }

    /// The child at `level`, created empty if missing.
    pub fn entry(&mut self, level: &str) -> &mut N {
        if let Children::Few(v) = self {
            if v.len() >= FEW && !v.iter().any(|(l, _)| &**l == level) {
                let map = std::mem::take(v).into_iter().collect();
                *self = Children::Many(map);
            }
        }
        match self {
            Children::Few(v) => {
                let i = match v.iter().position(|(l, _)| &**l == level) {
                    Some(i) => i,
                    None => {
                        v.reserve_exact(1);
                        v.push((level.into(), N::default()));
                        v.len() - 1
                    }
                };
                &mut v[i].1
            }
            Children::Many(m) => m.entry(level.into()).or_default(),
        }
    }

    pub fn remove(&mut self, level: &str) {
        match self {
            Children::Few(v) => {
                if let Some(i) = v.iter().position(|(l, _)| &**l == level) {
                    v.swap_remove(i);
                    if v.is_empty() {
                        *v = Vec::new();
                    }
                }
            }
            Children::Many(m) => {
                m.remove(level);
            }
        }
    }

    pub fn iter(&self) -> Box<dyn Iterator<Item = (&str, &N)> + '_> {
        match self {
            Children::Few(v) => Box::new(v.iter().map(|(l, n)| (&**l, n))),
            Children::Many(m) => Box::new(m.iter().map(|(l, n)| (&**l, n))),
        }
    }
}
