//! Subscription index: a trie of filters by topic level. (`DataLog` keeps
//! filters without wildcards out of it: its map from filter text to index
//! finds them, see `DataLog::matches`.)
//!
//! A publish finds the filters matching its topic in time proportional to
//! the topic's levels and the matches (plus the `+` branches on its way),
//! whatever the number of filters. Matching follows [`crate::protocol::matches`]
//! exactly: `+` matches one level, `#` the rest (zero levels included), a
//! topic starting with `$` matches no filter, a topic level `#` matches only
//! a `#` before it, and a filter ends at its first `#` level. A topic whose
//! first level is one of the index's excluded levels (e.g. `admin`) is
//! matched only by filters whose first level is that literal level.

use std::str::Split;

use smallvec::SmallVec;

use super::children::Children;
use super::FilterIdx;

/// The filters ending at a node: most nodes hold one, kept inline.
type Idxs = SmallVec<[FilterIdx; 1]>;

#[derive(Debug, Default)]
struct Node {
    /// Literal next levels.
    children: Children<Node>,
    /// The `+` next level.
    plus: Option<Box<Node>>,
    /// Filters ending at this node.
    end: Idxs,
    /// Filters whose next level is `#` (they match this node and all below).
    hash: Idxs,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.end.is_empty()
            && self.hash.is_empty()
    }

    /// The topic's remaining `levels` (an iterator: no allocation per
    /// publish).
    fn collect(&self, mut levels: Split<'_, char>, out: &mut Vec<FilterIdx>) {
        out.extend_from_slice(&self.hash);
        let Some(level) = levels.next() else {
            out.extend_from_slice(&self.end);
            return;
        };
        if level == "#" {
            return;
        }
        if let Some(child) = self.children.get(level) {
            child.collect(levels.clone(), out);
        }
        if let Some(plus) = &self.plus {
            plus.collect(levels, out);
        }
    }

    /// Removes `idx` along `levels`; true when this node became empty.
    fn remove(&mut self, levels: &[&str], idx: FilterIdx) -> bool {
        match levels.split_first() {
            None => self.end.retain(|i| *i != idx),
            Some((&"#", _)) => self.hash.retain(|i| *i != idx),
            Some((&"+", rest)) => {
                if let Some(plus) = &mut self.plus {
                    if plus.remove(rest, idx) {
                        self.plus = None;
                    }
                }
            }
            Some((level, rest)) => {
                if let Some(child) = self.children.get_mut(level) {
                    if child.remove(rest, idx) {
                        self.children.remove(level);
                    }
                }
            }
        }
        self.is_empty()
    }
}

/// Filters (without any `$share/group/` prefix) and their index.
#[derive(Debug, Default)]
pub struct FilterIndex {
    root: Node,
    len: usize,
    /// First levels that filters starting with a wildcard do not match.
    excluded: Vec<Box<str>>,
}

impl FilterIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// An index where filters starting with a wildcard do not match topics
    /// whose first level is one of `excluded` (as with `$` topics).
    pub fn with_excluded_levels(excluded: &[String]) -> Self {
        FilterIndex {
            excluded: excluded.iter().map(|l| l.as_str().into()).collect(),
            ..Self::default()
        }
    }

    /// Number of filters held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `filter` as `idx`. The caller inserts each filter once.
    pub fn insert(&mut self, filter: &str, idx: FilterIdx) {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = match level {
                "#" => {
                    node.hash.push(idx);
                    self.len += 1;
                    return;
                }
                "+" => node.plus.get_or_insert_with(Default::default),
                _ => node.children.entry(level),
            };
        }
        node.end.push(idx);
        self.len += 1;
    }

    /// Removes `filter` (inserted as `idx`), pruning emptied nodes.
    pub fn remove(&mut self, filter: &str, idx: FilterIdx) {
        let mut levels: Vec<&str> = Vec::new();
        for level in filter.split('/') {
            levels.push(level);
            if level == "#" {
                break;
            }
        }
        self.root.remove(&levels, idx);
        self.len = self.len.saturating_sub(1);
    }

    /// Appends to `out` the index of every filter matching `topic`.
    pub fn matches(&self, topic: &str, out: &mut Vec<FilterIdx>) {
        if topic.starts_with('$') {
            return;
        }
        let mut levels = topic.split('/');
        let first = levels.clone().next().unwrap_or_default();
        if self.excluded.iter().any(|l| **l == *first) {
            // Only the literal first level: not the root's `+` and `#`.
            levels.next();
            if let Some(child) = self.root.children.get(first) {
                child.collect(levels, out);
            }
            return;
        }
        self.root.collect(levels, out);
    }
}

/// A filter without a `+` or `#` level: it matches exactly the topic equal
/// to it (unless that starts with `$`), and a topic without such a level
/// equals no other filter.
pub(super) fn is_exact(filter: &str) -> bool {
    !filter.split('/').any(|level| level == "+" || level == "#")
}

#[cfg(test)]
pub(super) mod test {
    use super::FilterIndex;
    use crate::protocol::matches;
    use proptest::prelude::*;

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("c".to_owned()),
            Just(String::new()),
            Just("$SYS".to_owned()),
            Just("$x".to_owned()),
            Just("+".to_owned()),
            Just("#".to_owned()),
        ]
    }

    /// Topics and filters of up to 4 levels, with `+`, `#`, `$` and empty levels.
    pub(in crate::router) fn path() -> impl Strategy<Value = String> {
        prop::collection::vec(level(), 1..5).prop_map(|l| l.join("/"))
    }

    /// The indexes of `filters` matching `topic` by the linear matcher, sorted.
    pub(in crate::router) fn oracle(filters: &[(String, usize)], topic: &str) -> Vec<usize> {
        let mut v: Vec<usize> = filters
            .iter()
            .filter(|(f, _)| matches(topic, f))
            .map(|(_, i)| *i)
            .collect();
        v.sort_unstable();
        v
    }

    fn indexed(index: &FilterIndex, topic: &str) -> Vec<usize> {
        let mut v = Vec::new();
        index.matches(topic, &mut v);
        v.sort_unstable();
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The index answers what the linear matcher over all filters
        /// answers, before and after removing some filters.
        #[test]
        fn index_agrees_with_linear_matcher(
            filters in prop::collection::btree_set(path(), 0..40),
            topics in prop::collection::vec(path(), 1..20),
            removed in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
        ) {
            let mut filters: Vec<(String, usize)> =
                filters.into_iter().enumerate().map(|(i, f)| (f, i)).collect();
            let mut index = FilterIndex::new();
            for (f, i) in &filters {
                index.insert(f, *i);
            }
            prop_assert_eq!(index.len(), filters.len());
            for t in &topics {
                prop_assert_eq!(indexed(&index, t), oracle(&filters, t), "topic {}", t);
            }
            for r in removed {
                if filters.is_empty() {
                    break;
                }
                let (f, i) = filters.swap_remove(r.index(filters.len()));
                index.remove(&f, i);
            }
            prop_assert_eq!(index.len(), filters.len());
            for t in &topics {
                prop_assert_eq!(indexed(&index, t), oracle(&filters, t), "topic {}", t);
            }
            for (f, i) in filters.drain(..) {
                index.remove(&f, i);
            }
            prop_assert!(index.root.is_empty());
        }
    }

    #[test]
    fn dollar_topics_match_no_filter() {
        let mut index = FilterIndex::new();
        index.insert("#", 0);
        index.insert("+/x", 1);
        index.insert("$SYS/x", 2);
        assert_eq!(indexed(&index, "$SYS/x"), Vec::<usize>::new());
        assert_eq!(indexed(&index, "a/x"), vec![0, 1]);
    }

    #[test]
    fn excluded_levels_match_only_literal_first_levels() {
        let mut index = FilterIndex::with_excluded_levels(&["admin".to_owned()]);
        index.insert("#", 0);
        index.insert("+/v1/#", 1);
        index.insert("admin/#", 2);
        index.insert("admin/+/x", 3);
        index.insert("+", 4);
        assert_eq!(indexed(&index, "admin/v1/x"), vec![2, 3]);
        assert_eq!(indexed(&index, "admin"), vec![2]);
        assert_eq!(indexed(&index, "data/v1/x"), vec![0, 1]);
        assert_eq!(indexed(&index, "administrator"), vec![0, 4]);
    }

    #[test]
    fn hash_matches_parent_level() {
        let mut index = FilterIndex::new();
        index.insert("a/b/#", 0);
        index.insert("a/#/c", 1);
        assert_eq!(indexed(&index, "a/b"), vec![0, 1]);
        assert_eq!(indexed(&index, "a"), vec![1]);
    }
}
