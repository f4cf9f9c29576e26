//! What talks to the activation broker from outside, shared by the
//! broker's operator CLI, the simulator, the benches and the tests:
//!
//! - [`credentials`]: device identifiers and signed credentials (the
//!   broker verifies with the same code);
//! - [`connack`]: CONNACK codes of both protocol versions, by number and
//!   by name;
//! - [`admin`]: the admin request client over the admin topics;
//! - [`http`]: the admin request client over the HTTP API (and plain
//!   requests to the HTTP listener);
//! - [`socket`]: TCP connections from a chosen source address;
//! - [`limits`]: the open-file limit;
//! - [`child`]: child processes (free ports, dying with the parent);
//! - [`broker`]: the broker binary as a child process.

pub mod admin;
pub mod broker;
pub mod child;
pub mod connack;
pub mod credentials;
pub mod http;
pub mod limits;
pub mod socket;
