//! The service's side of sd_notify (systemd `Type=notify`): READY once it listens, WATCHDOG
//! every half `WATCHDOG_USEC` from a task of the runtime that first proves the service can
//! still work (`alive`: it takes the fleet's lock), so a stalled runtime or a lock held forever
//! stops the pings and systemd restarts the service. Sends go through the blocking pool: a
//! manager that does not read its socket must not stall the runtime. Without systemd
//! (`NOTIFY_SOCKET` unset) every call is a no-op.

use std::time::Duration;

pub(super) fn start(alive: impl Fn() + Send + Sync + 'static) {
    tokio::task::spawn_blocking(|| sd_notify::notify(false, &[sd_notify::NotifyState::Ready]));
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) {
        return;
    }
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_micros(usec / 2));
        loop {
            every.tick().await;
            alive();
            let sent = tokio::task::spawn_blocking(|| sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]));
            let _ = sent.await;
        }
    });
}
