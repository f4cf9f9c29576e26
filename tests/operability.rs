//! Operability, black-box against the broker binary (issue 17): signals,
//! a second broker on the same port, TLS by IP address, bans listed and
//! lifted, configuration printing and action help.

mod common;

use std::time::Duration;

use common::child::{broker_bin, prepare_store, write_config, ChildBroker};

const STOP: Duration = Duration::from_secs(30);

/// SIGTERM (systemd, Docker, Kubernetes) and SIGINT (Ctrl-C) both stop the
/// broker gracefully: `shutting down` in its log, exit status 0, and the
/// store opens again offline.
#[test]
fn sigterm_and_sigint_stop_gracefully() {
    for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        prepare_store(&data, "p", 1, 3600);
        let config = write_config(dir.path(), 10);
        let mut broker = ChildBroker::start(&broker_bin(), &config, &data, None);
        let status = broker.signal(sig, STOP);
        let log = broker.log_tail();
        let status =
            status.unwrap_or_else(|| panic!("{name}: still running after {STOP:?}:\n{log}"));
        assert!(status.success(), "{name}: exit {status:?}:\n{log}");
        assert!(
            log.contains("shutting down"),
            "{name}: no `shutting down`:\n{log}"
        );
        assert!(
            log.contains(name),
            "{name}: the signal is not named:\n{log}"
        );
        drop(broker);
        let ledger = common::child::open_offline(&data);
        assert!(ledger.product("p").is_ok(), "{name}: the store reopens");
    }
}
