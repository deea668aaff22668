//! The receiver's side of sd_notify.

use std::time::Duration;

/// Talks to the service manager (sd_notify): READY at start, WATCHDOG every half
/// `WATCHDOG_USEC`, STOPPING at shutdown. The pings are timed by a task on the runtime, so they
/// stop when the runtime stalls (and systemd restarts the service); they are sent by a thread
/// of its own, because a send blocks while the notify socket is full (a manager that is not
/// reading), and that must never stall the runtime. A ping that finds the thread busy is dropped.
pub(super) struct Notifier {
    stop: crossbeam_channel::Sender<crossbeam_channel::Sender<()>>,
    /// Told once STOPPING went out.
    stopped: Option<crossbeam_channel::Receiver<()>>,
}

impl Notifier {
    /// Starts the sending thread, sends READY, and starts the pings (within a tokio runtime).
    pub(super) fn start() -> Self {
        use crossbeam_channel::{bounded, select, unbounded};
        use sd_notify::NotifyState;
        let (ping, pinged) = bounded::<()>(1);
        let (stop, stopping) = unbounded::<crossbeam_channel::Sender<()>>();
        std::thread::spawn(move || {
            let _ = sd_notify::notify(false, &[NotifyState::Ready]);
            let done = loop {
                select! {
                    recv(pinged) -> p => match p {
                        Ok(()) => { let _ = sd_notify::notify(false, &[NotifyState::Watchdog]); }
                        Err(_) => break stopping.recv(),
                    },
                    recv(stopping) -> s => break s,
                }
            };
            if let Ok(done) = done {
                let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
                let _ = done.send(());
            }
        });
        let mut usec = 0;
        if sd_notify::watchdog_enabled(false, &mut usec) {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_micros(usec / 2));
                loop {
                    tick.tick().await;
                    if let Err(crossbeam_channel::TrySendError::Disconnected(_)) = ping.try_send(()) {
                        return;
                    }
                }
            });
        }
        Self { stop, stopped: None }
    }

    /// Asks for STOPPING to be sent, without waiting.
    pub(super) fn stopping(&mut self) {
        let (done, sent) = crossbeam_channel::bounded(1);
        if self.stop.send(done).is_ok() {
            self.stopped = Some(sent);
        }
    }

    /// Before the process exits: gives STOPPING a moment to go out, never longer.
    pub(super) fn finish(self) {
        if let Some(sent) = self.stopped {
            let _ = sent.recv_timeout(Duration::from_secs(1));
        }
    }
}
