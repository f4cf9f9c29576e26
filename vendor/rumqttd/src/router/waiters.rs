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
/// kept (removal swaps the last waiter into the removed place).
#[derive(Debug)]
pub struct Waiters<T> {
    /// Waiters on new topics
    current: IndexMap<Key, T>,
}

impl<T> Default for Waiters<T> {
    fn default() -> Self {
        Waiters {
            current: IndexMap::new(),
        }
    }
}

impl<T> Waiters<T> {
    /// No allocation until the first waiter registers.
    pub fn new() -> Waiters<T> {
        Self::default()
    }

    pub fn with_capacity(max_connections: usize) -> Waiters<T> {
        Waiters {
            current: IndexMap::with_capacity(max_connections),
        }
    }

    /// Current parked connection requests waiting for new data
    pub fn waiters(&self) -> impl Iterator<Item = (ConnectionId, &T)> {
        self.current.iter().map(|((id, _), request)| (*id, request))
    }

    pub fn len(&self) -> usize {
        self.current.len()
    }

    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }

    /// Pushes a request to current wait queue (replacing a request of the
    /// same connection and group)
    pub fn register(&mut self, id: ConnectionId, group: Option<String>, request: T) {
        if self.current.capacity() == 0 {
            // Most filters have one waiter (a device's own topic)
            self.current = IndexMap::with_capacity(1);
        }
        self.current.insert((id, group), request);
    }

    /// Takes every waiter, in registration order
    pub fn take(&mut self) -> Option<VecDeque<(ConnectionId, T)>> {
        if self.current.is_empty() {
            return None;
        }

        let current = std::mem::take(&mut self.current);
        Some(current.into_iter().map(|((id, _), r)| (id, r)).collect())
    }

    /// Removes the request of connection `id` in `group`
    pub fn remove(&mut self, id: ConnectionId, group: Option<String>) -> Option<T> {
        let request = self.current.swap_remove(&(id, group));
        if self.current.is_empty() && self.current.capacity() > 0 {
            self.current = IndexMap::new();
        }
        request
    }
}
