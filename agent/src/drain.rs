//! Stopping without failing a request. The first SIGTERM (or Ctrl-C) marks every instance out of
//! service (`enabled: false`, which load balancers drain), waits the grace period while traffic
//! moves away, deletes the znodes and exits 0. Another signal exits at once: the instances stay
//! registered out of service until ZooKeeper expires the session.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout};

/// Where the agent is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Instances follow their health.
    Serving,
    /// Told to stop: every registered instance is out of rotation during the grace period.
    Draining,
    /// Deregistering everything before exiting.
    Leaving,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Serving => "serving",
            Phase::Draining => "draining",
            Phase::Leaving => "leaving",
        }
    }
}

/// How the agent ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Drained and deregistered (as far as ZooKeeper could be reached).
    Clean,
    /// Told twice: left without waiting.
    Forced,
}

impl Exit {
    pub fn code(self) -> u8 {
        match self {
            Exit::Clean => 0,
            Exit::Forced => 1,
        }
    }
}

/// How long deregistering may take after the grace period; an unreachable ZooKeeper removes the
/// znodes itself when the session expires.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The stop sequence, once the first signal has arrived. `registrar` ends when every znode is
/// deleted.
pub async fn drain(
    phase: &watch::Sender<Phase>,
    grace: Duration,
    signals: &mut mpsc::UnboundedReceiver<()>,
    registrar: &mut JoinHandle<()>,
) -> Exit {
    phase.send_replace(Phase::Draining);
    tracing::info!(
        ?grace,
        "stopping: the instances are out of rotation for the grace period"
    );
    tokio::select! {
        _ = sleep(grace) => {}
        Some(()) = signals.recv() => return forced(),
    }
    phase.send_replace(Phase::Leaving);
    tokio::select! {
        left = timeout(LEAVE_TIMEOUT, registrar) => match left {
            Ok(_) => tracing::info!("deregistered; exiting"),
            Err(_) => tracing::warn!(
                "could not deregister within {LEAVE_TIMEOUT:?}; ZooKeeper removes the registrations when the session expires"
            ),
        },
        Some(()) = signals.recv() => return forced(),
    }
    Exit::Clean
}

fn forced() -> Exit {
    tracing::warn!("told again to stop: exiting now; the registrations stay out of rotation until the session expires");
    Exit::Forced
}
