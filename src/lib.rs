//! activation-broker: an MQTT broker whose every device connection is gated
//! by an activation code. See ARCHITECTURE.md for the codemap.

pub mod clock;
pub mod credentials;
pub mod events;
pub mod gate;
pub mod gateway;
pub mod ledger;
