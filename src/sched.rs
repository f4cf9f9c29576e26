//! Scheduling class of the broker's background threads.
//!
//! The router thread sleeps between events and every connection's I/O
//! thread wakes it (a SUBSCRIBE, a PUBLISH, a new link). Woken as an
//! ordinary thread on a busy machine, it preempts the thread that woke it:
//! two context switches per event, and one event per pass. In Linux's
//! `SCHED_BATCH` class a woken thread does not preempt: the router runs
//! when a CPU is free (at once on an idle machine) and takes every event
//! that arrived meanwhile in one pass.

/// Puts the calling thread in Linux's `SCHED_BATCH` class (elsewhere:
/// nothing). A refusal is logged and the thread goes on as it was.
pub fn batch_this_thread() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: sched_setscheduler on the calling thread (pid 0) with a
        // valid, initialised parameter.
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
        if rc != 0 {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                "cannot put the thread in SCHED_BATCH"
            );
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn the_thread_is_in_sched_batch() {
        std::thread::spawn(|| {
            super::batch_this_thread();
            // SAFETY: reads the calling thread's policy.
            let policy = unsafe { libc::sched_getscheduler(0) };
            assert_eq!(policy, libc::SCHED_BATCH);
        })
        .join()
        .expect("thread");
    }
}
