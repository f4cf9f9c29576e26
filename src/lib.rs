//! activation-broker: an MQTT broker whose every device connection is gated
//! by an activation code. See ARCHITECTURE.md for the codemap.

pub mod admin;
pub mod clock;
pub mod credentials;
pub mod events;
pub mod ledger;
