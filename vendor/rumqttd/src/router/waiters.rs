use crate::ConnectionId;
use indexmap::IndexMap;
use std::collections::VecDeque;

/// Who waits: a connection, and the shared subscription group its request
/// belongs to (`t` and `$share/g/t` wait on the same filter).
type Key = (ConnectionId, Option<String>);

/// Waiters are connections which are waiting to be notified. They have
/// made a data request but router didn't respond because of the connection
/// being caughtup. Waiters stores connection id and pending request.
///
/// Keyed by connection (and group), so removing one connection's request
/// costs the same whatever the number of waiters; registration order is
/// kept (removal swaps the last waiter into the removed place). Most
/// filters have one waiter (a device's own topic): it is kept inline,
/// without an allocation; a map holds two and more.
#[derive(Debug)]
pub struct Waiters<T> {
    current: Slots<T>,
}

#[derive(Debug)]
enum Slots<T> {
    Empty,
    One(Key, T),
    Many(IndexMap<Key, T>),
}

impl<T> Default for Waiters<T> {
    fn default() -> Self {
        Waiters {
            current: Slots::Empty,
        }
    }
}

impl<T> Waiters<T> {
    /// No allocation until a second waiter registers.
    pub fn new() -> Waiters<T> {
        Self::default()
    }

    pub fn with_capacity(max_connections: usize) -> Waiters<T> {
        if max_connections < 2 {
            return Self::default();
        }
        Waiters {
            current: Slots::Many(IndexMap::with_capacity(max_connections)),
        }
    }

    /// Current parked connection requests waiting for new data
    pub fn waiters(&self) -> Box<dyn Iterator<Item = (ConnectionId, &T)> + '_> {
        match &self.current {
            Slots::Empty => Box::new(std::iter::empty()),
            Slots::One((id, _), request) => Box::new(std::iter::once((*id, request))),
            Slots::Many(map) => Box::new(map.iter().map(|((id, _), request)| (*id, request))),
        }
    }

    pub fn len(&self) -> usize {
        match &self.current {
            Slots::Empty => 0,
            Slots::One(..) => 1,
            Slots::Many(map) => map.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pushes a request to current wait queue (replacing a request of the
    /// same connection and group)
    pub fn register(&mut self, id: ConnectionId, group: Option<String>, request: T) {
        let key = (id, group);
        self.current = match std::mem::replace(&mut self.current, Slots::Empty) {
            Slots::Empty => Slots::One(key, request),
            Slots::One(k, _) if k == key => Slots::One(key, request),
            Slots::One(k, r) => {
                let mut map = IndexMap::with_capacity(2);
                map.insert(k, r);
                map.insert(key, request);
                Slots::Many(map)
            }
            Slots::Many(mut map) => {
                map.insert(key, request);
                Slots::Many(map)
            }
        };
    }

    /// Moves every waiter to the back of `out`, in registration order
    pub fn drain_into(&mut self, out: &mut VecDeque<(ConnectionId, T)>) {
        match std::mem::replace(&mut self.current, Slots::Empty) {
            Slots::Empty => {}
            Slots::One((id, _), request) => out.push_back((id, request)),
            Slots::Many(map) => out.extend(map.into_iter().map(|((id, _), r)| (id, r))),
        }
    }

    /// Takes every waiter, in registration order
    pub fn take(&mut self) -> Option<VecDeque<(ConnectionId, T)>> {
        if self.is_empty() {
            return None;
        }
        let mut out = VecDeque::new();
        self.drain_into(&mut out);
        Some(out)
    }

    /// Removes the request of connection `id` in `group`
    pub fn remove(&mut self, id: ConnectionId, group: Option<String>) -> Option<T> {
        let key = (id, group);
        match std::mem::replace(&mut self.current, Slots::Empty) {
            Slots::Empty => None,
            Slots::One(k, request) if k == key => Some(request),
            one @ Slots::One(..) => {
                self.current = one;
                None
            }
            Slots::Many(mut map) => {
                let request = map.swap_remove(&key);
                if !map.is_empty() {
                    self.current = Slots::Many(map);
                }
                request
            }
        }
    }
}

#[cfg(test)]
mod test {
    use super::Waiters;
    use std::collections::VecDeque;

    fn ids(w: &Waiters<&'static str>) -> Vec<(usize, &'static str)> {
        w.waiters().map(|(id, r)| (id, *r)).collect()
    }

    #[test]
    fn one_then_many_waiters_in_registration_order() {
        let mut w = Waiters::new();
        assert!(w.take().is_none());
        w.register(1, None, "a");
        w.register(1, None, "a2");
        assert_eq!(ids(&w), vec![(1, "a2")]);
        assert_eq!(w.remove(2, None), None);
        w.register(2, Some("g".to_owned()), "b");
        w.register(3, None, "c");
        assert_eq!(w.len(), 3);
        assert_eq!(w.remove(2, None), None);
        assert_eq!(w.remove(2, Some("g".to_owned())), Some("b"));
        let mut out = VecDeque::new();
        w.drain_into(&mut out);
        assert_eq!(out, VecDeque::from(vec![(1, "a2"), (3, "c")]));
        assert!(w.is_empty());
        w.register(4, None, "d");
        assert_eq!(w.remove(4, None), Some("d"));
        assert!(w.is_empty());
    }
}
