//! End-to-end tests of the device-facing connection layer alone; the
//! harness is `common::gateway`.

mod admission;
mod listener;
mod malformed;
mod rates;
mod sessions;
mod will_delay;
