//! The integration tests, one binary: one module per area, shared helpers
//! in `common`.

mod common;

mod accounts;
mod admin;
mod admin_accounts;
mod admin_broker;
mod admin_topics;
mod backend_flow;
mod backup;
mod crash_load;
mod devices;
mod etcd_cluster;
mod etcd_failures;
mod etcd_haproxy;
mod fuzz;
mod gate;
mod gateway;
mod hostile;
mod http_api;
mod http_console;
mod http_listener;
mod http_metrics;
mod ledger_crash;
mod ledger_model;
mod ledger_races;
mod ledger_rules;
mod ledger_store;
mod mqtt5;
mod operability;
mod paho;
mod power_loss;
mod races_wire;
mod security;
mod security_exhaustion;
mod security_proxy;
mod security_review;
mod shutdown;
