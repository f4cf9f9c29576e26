//! activation-broker: an MQTT broker whose every device connection is gated
//! by an activation code. See ARCHITECTURE.md for the codemap.

pub mod account_auth;
pub mod admin;
pub mod clock;
pub mod config;
pub use activation_client::credentials;
pub mod device_auth;
pub mod enforcer;
pub mod events;
pub mod gate;
pub mod gateway;
pub mod http;
pub mod ledger;
pub mod logging;
pub mod sched;
pub mod server;
