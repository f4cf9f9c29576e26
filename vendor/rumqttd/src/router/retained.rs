//! Retained messages in a trie of topic levels, with per-client and total
//! caps.
//!
//! A subscribe reads the retained messages matching its filter in time
//! proportional to the filter's levels and what it matches (an exact filter
//! walks one path), whatever the number of retained messages. Matching
//! follows [`crate::protocol::matches`]: a topic starting with `$` matches no
//! filter, a topic level `#` matches only a `#` before it; a wildcard at the
//! first level does not match the store's excluded first levels (as
//! [`super::index::FilterIndex`]).

use std::collections::HashMap;
use std::time::Instant;

use super::children::Children;
use crate::protocol::{Publish, PublishProperties};
use crate::Storage;

use super::logs::PublishData;

/// Why a retained message was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RetainRefusal {
    #[error("client holds {held} retained messages, the most allowed")]
    ClientCap { held: usize },
    #[error("retained messages would take {would_take} bytes, over the cap of {cap}")]
    TotalBytes { would_take: usize, cap: usize },
}

struct Retained {
    data: PublishData,
    owner: Box<str>,
    /// When it was stored: [`RetainedStore::stamp`] after its insert
    stamp: u64,
}

#[derive(Default)]
struct Node {
    children: Children<Node>,
    msg: Option<Retained>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.msg.is_none()
    }

    fn get(&self, levels: &[&str]) -> Option<&Retained> {
        match levels.split_first() {
            None => self.msg.as_ref(),
            Some((level, rest)) => self.children.get(level)?.get(rest),
        }
    }

    /// Sets the message at `levels`, returning the one it replaces.
    fn put(&mut self, levels: &[&str], msg: Retained) -> Option<Retained> {
        match levels.split_first() {
            None => self.msg.replace(msg),
            Some((level, rest)) => self.children.entry(level).put(rest, msg),
        }
    }

    /// Takes the message at `levels`, pruning emptied nodes.
    fn take(&mut self, levels: &[&str]) -> Option<Retained> {
        let Some((level, rest)) = levels.split_first() else {
            return self.msg.take();
        };
        let child = self.children.get_mut(level)?;
        let taken = child.take(rest);
        if child.is_empty() {
            self.children.remove(level);
        }
        taken
    }

    /// Topics (as level paths) under `prefix` matching `filter`; at the
    /// root, wildcards skip `$` levels and the `excluded` ones.
    fn collect(
        &self,
        filter: &[&str],
        at_root: Option<&[Box<str>]>,
        path: &mut Vec<String>,
        out: &mut Vec<String>,
    ) {
        let Some((level, rest)) = filter.split_first() else {
            if self.msg.is_some() {
                out.push(path.join("/"));
            }
            return;
        };
        match *level {
            "#" => self.collect_all(at_root, path, out),
            "+" => {
                for (name, child) in self.children.iter() {
                    if name == "#" || skipped_by_wildcard(at_root, name) {
                        continue;
                    }
                    path.push(name.to_string());
                    child.collect(rest, None, path, out);
                    path.pop();
                }
            }
            literal => {
                if at_root.is_some() && literal.starts_with('$') {
                    return;
                }
                if let Some(child) = self.children.get(literal) {
                    path.push(literal.to_owned());
                    child.collect(rest, None, path, out);
                    path.pop();
                }
            }
        }
    }

    fn collect_all(
        &self,
        at_root: Option<&[Box<str>]>,
        path: &mut Vec<String>,
        out: &mut Vec<String>,
    ) {
        if self.msg.is_some() {
            out.push(path.join("/"));
        }
        for (name, child) in self.children.iter() {
            if skipped_by_wildcard(at_root, name) {
                continue;
            }
            path.push(name.to_string());
            child.collect_all(None, path, out);
            path.pop();
        }
    }
}

/// Whether a wildcard at the root (`at_root` holds the excluded levels)
/// skips the first level `name`.
fn skipped_by_wildcard(at_root: Option<&[Box<str>]>, name: &str) -> bool {
    at_root.is_some_and(|excluded| name.starts_with('$') || excluded.iter().any(|l| **l == *name))
}

/// The retained messages of a router.
pub struct RetainedStore {
    root: Node,
    /// Retained messages per publishing client id.
    per_client: HashMap<Box<str>, usize>,
    len: usize,
    bytes: usize,
    max_per_client: usize,
    max_bytes: usize,
    /// First levels that wildcards at the root do not match.
    excluded: Vec<Box<str>>,
    /// Inserts so far: each message's stamp, so that a subscription reads
    /// only the messages stored before it (later ones reach it through the
    /// filter's log).
    stamp: u64,
}

fn levels(topic: &str) -> Vec<&str> {
    topic.split('/').collect()
}

impl RetainedStore {
    /// `max_per_client`: retained messages one client id may hold;
    /// `max_bytes`: bytes (topic + payload + 4 each) all may hold.
    pub fn new(max_per_client: usize, max_bytes: usize) -> Self {
        RetainedStore {
            root: Node::default(),
            per_client: HashMap::new(),
            len: 0,
            bytes: 0,
            max_per_client,
            max_bytes,
            excluded: Vec::new(),
            stamp: 0,
        }
    }

    /// The stamp of the last message stored: a subscription made now reads
    /// the retained messages up to it.
    pub fn stamp(&self) -> u64 {
        self.stamp
    }

    /// This store with first levels that a filter starting with a wildcard
    /// does not match (as `$` levels).
    pub fn with_excluded_levels(mut self, excluded: &[String]) -> Self {
        self.excluded = excluded.iter().map(|l| l.as_str().into()).collect();
        self
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether `owner` may store `data` at `topic` (replacing what is
    /// there). `exempt` owners skip the per-client cap.
    pub fn check(
        &self,
        topic: &str,
        size: usize,
        owner: &str,
        exempt: bool,
    ) -> Result<(), RetainRefusal> {
        let previous = self.root.get(&levels(topic));
        let freed = previous.map_or(0, |p| p.data.size());
        let would_take = self.bytes - freed + size;
        if would_take > self.max_bytes {
            return Err(RetainRefusal::TotalBytes {
                would_take,
                cap: self.max_bytes,
            });
        }
        let replaces_own = previous.is_some_and(|p| &*p.owner == owner);
        let held = self.per_client.get(owner).copied().unwrap_or(0);
        if !exempt && !replaces_own && held >= self.max_per_client {
            return Err(RetainRefusal::ClientCap { held });
        }
        Ok(())
    }

    /// Stores `publish` as the retained message of `topic` if the caps
    /// allow it (see [`Self::check`]).
    pub fn insert(
        &mut self,
        topic: &str,
        publish: Publish,
        properties: Option<PublishProperties>,
        owner: &str,
        exempt: bool,
    ) -> Result<(), RetainRefusal> {
        let data = PublishData::from((publish, properties));
        self.check(topic, data.size(), owner, exempt)?;
        self.bytes += data.size();
        *self.per_client.entry(owner.into()).or_default() += 1;
        self.len += 1;
        self.stamp += 1;
        let msg = Retained {
            data,
            owner: owner.into(),
            stamp: self.stamp,
        };
        if let Some(old) = self.root.put(&levels(topic), msg) {
            self.forget(old);
        }
        Ok(())
    }

    /// Clears the retained message of `topic`.
    pub fn remove(&mut self, topic: &str) {
        if let Some(old) = self.root.take(&levels(topic)) {
            self.forget(old);
        }
    }

    fn forget(&mut self, old: Retained) {
        self.len -= 1;
        self.bytes -= old.data.size();
        if let Some(n) = self.per_client.get_mut(&old.owner) {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&old.owner);
            }
        }
    }

    /// The retained messages matching `filter` stored up to stamp
    /// `up_to`, their message expiry intervals lowered by the time they
    /// spent here; expired ones are dropped.
    pub fn matching(
        &mut self,
        filter: &str,
        now: Instant,
        up_to: u64,
    ) -> Vec<(Publish, Option<PublishProperties>)> {
        let mut topics = Vec::new();
        self.root.collect(
            &levels(filter),
            Some(&self.excluded),
            &mut Vec::new(),
            &mut topics,
        );
        let mut out = Vec::with_capacity(topics.len());
        for topic in topics {
            let Some(msg) = self.root.get(&levels(&topic)) else {
                continue;
            };
            if msg.stamp > up_to {
                continue;
            }
            let mut properties = msg.data.properties.clone();
            let publish = msg.data.publish.clone();
            let spent = (now - msg.data.timestamp).as_secs();
            let mut expired = false;
            if let Some(interval) = properties
                .as_mut()
                .and_then(|p| p.message_expiry_interval.as_mut())
            {
                if spent >= u64::from(*interval) {
                    expired = true;
                } else {
                    *interval -= spent as u32;
                }
            }
            if expired {
                self.remove(&topic);
            } else {
                out.push((publish, properties));
            }
        }
        out
    }

    /// Retained messages held by `owner`.
    pub fn held_by(&self, owner: &str) -> usize {
        self.per_client.get(owner).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod test {
    use super::RetainedStore;
    use crate::protocol::Publish;
    use std::time::Instant;

    #[test]
    fn single_level() {
        let mut store = RetainedStore::new(10, 1 << 20);
        store
            .insert("c", Publish::new("c", "r0", true), None, "x", false)
            .unwrap();
        assert_eq!(store.matching("+", Instant::now(), u64::MAX).len(), 1);
        assert_eq!(store.matching("c", Instant::now(), u64::MAX).len(), 1);
        assert_eq!(store.matching("#", Instant::now(), u64::MAX).len(), 1);
    }

    // A subscription reads the messages stored up to its stamp: one stored
    // (or replaced) after it reaches it through the filter's log instead.
    #[test]
    fn messages_stored_after_a_stamp_are_not_read_up_to_it() {
        let mut store = RetainedStore::new(10, 1 << 20);
        store
            .insert("a", Publish::new("a", "old", true), None, "x", false)
            .unwrap();
        let stamp = store.stamp();
        store
            .insert("b", Publish::new("b", "new", true), None, "x", false)
            .unwrap();
        let read = |store: &mut RetainedStore, up_to| -> Vec<String> {
            let mut v: Vec<String> = store
                .matching("#", Instant::now(), up_to)
                .into_iter()
                .map(|(p, _)| String::from_utf8_lossy(&p.payload).into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(read(&mut store, stamp), vec!["old"]);
        let now = store.stamp();
        assert_eq!(read(&mut store, now), vec!["new", "old"]);
        // Replaced after the stamp: the new value is not read up to it
        store
            .insert("a", Publish::new("a", "newer", true), None, "x", false)
            .unwrap();
        assert!(read(&mut store, stamp).is_empty());
    }

    #[test]
    fn excluded_levels_need_a_literal_first_level() {
        let mut store = RetainedStore::new(10, 1 << 20).with_excluded_levels(&["admin".into()]);
        for t in ["admin/x", "data/x"] {
            store
                .insert(t, Publish::new(t, "r", true), None, "x", false)
                .unwrap();
        }
        let topics = |f: &str, store: &mut RetainedStore| -> Vec<String> {
            let mut v: Vec<String> = store
                .matching(f, Instant::now(), u64::MAX)
                .into_iter()
                .map(|(p, _)| String::from_utf8_lossy(&p.topic).into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(topics("#", &mut store), vec!["data/x"]);
        assert_eq!(topics("+/x", &mut store), vec!["data/x"]);
        assert_eq!(topics("admin/#", &mut store), vec!["admin/x"]);
        assert_eq!(topics("admin/+", &mut store), vec!["admin/x"]);
    }
}
