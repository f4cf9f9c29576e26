//! Orders to one live connection (from the online registry): a one-slot
//! mailbox. The first order ends the connection, so later ones are dropped.
//! It costs about a hundred bytes per connection where a tokio mpsc
//! channel preallocates a block of 32 slots (over 1 KB).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::codes::DisconnectReason;

/// An order to a live connection.
#[derive(Debug, Clone)]
pub(crate) enum Control {
    /// End the session, sending DISCONNECT with this reason (MQTT 5).
    Disconnect {
        reason: DisconnectReason,
        message: String,
    },
}

struct Mailbox {
    order: Mutex<Option<Control>>,
    /// The sender is gone without an order.
    sender_gone: AtomicBool,
    /// The connection is gone.
    receiver_gone: AtomicBool,
    notify: Notify,
}

/// A connection's mailbox: the registry's end.
pub(crate) struct ControlTx(Arc<Mailbox>);

/// A connection's mailbox: the connection's end.
pub(crate) struct ControlRx(Arc<Mailbox>);

pub(crate) fn control_channel() -> (ControlTx, ControlRx) {
    let mailbox = Arc::new(Mailbox {
        order: Mutex::new(None),
        sender_gone: AtomicBool::new(false),
        receiver_gone: AtomicBool::new(false),
        notify: Notify::new(),
    });
    (ControlTx(mailbox.clone()), ControlRx(mailbox))
}

impl ControlTx {
    /// Leaves `order` for the connection (unless an earlier order is still
    /// there: the connection ends with that one). `Err` if the connection
    /// is gone.
    pub(crate) fn send(&self, order: Control) -> Result<(), Control> {
        if self.0.receiver_gone.load(Ordering::Acquire) {
            return Err(order);
        }
        self.0.order.lock().get_or_insert(order);
        self.0.notify.notify_one();
        Ok(())
    }
}

impl Drop for ControlTx {
    fn drop(&mut self) {
        self.0.sender_gone.store(true, Ordering::Release);
        self.0.notify.notify_one();
    }
}

impl ControlRx {
    /// The order, if one is there.
    pub(crate) fn try_recv(&mut self) -> Option<Control> {
        self.0.order.lock().take()
    }

    /// Waits for the order; `None` once the sender is gone without one.
    /// Cancel safe.
    pub(crate) async fn recv(&mut self) -> Option<Control> {
        loop {
            if let Some(order) = self.try_recv() {
                return Some(order);
            }
            if self.0.sender_gone.load(Ordering::Acquire) {
                return self.try_recv();
            }
            // `notify_one` leaves a permit when nobody waits, so an order
            // that lands between the checks above and this wait is seen.
            self.0.notify.notified().await;
        }
    }
}

impl Drop for ControlRx {
    fn drop(&mut self) {
        self.0.receiver_gone.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(message: &str) -> Control {
        Control::Disconnect {
            reason: DisconnectReason::AdministrativeAction,
            message: message.to_owned(),
        }
    }

    #[tokio::test]
    async fn first_order_wins_and_wakes_the_receiver() {
        let (tx, mut rx) = control_channel();
        let waiting = tokio::spawn(async move { rx.recv().await });
        tokio::task::yield_now().await;
        assert!(tx.send(order("first")).is_ok());
        assert!(tx.send(order("second")).is_ok());
        let got = waiting.await.expect("task");
        assert!(matches!(got, Some(Control::Disconnect { message, .. }) if message == "first"));
    }

    #[tokio::test]
    async fn a_dropped_sender_ends_the_wait_and_a_dropped_receiver_refuses_orders() {
        let (tx, mut rx) = control_channel();
        drop(tx);
        assert!(rx.recv().await.is_none());
        let (tx, rx) = control_channel();
        drop(rx);
        assert!(tx.send(order("late")).is_err());
        let (tx, mut rx) = control_channel();
        assert!(tx.send(order("before drop")).is_ok());
        drop(tx);
        assert!(rx.recv().await.is_some(), "an order left before the drop");
    }
}
