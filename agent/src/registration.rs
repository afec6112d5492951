//! Keeping instances registered: one ZooKeeper session at a time, each instance an ephemeral
//! znode `<root>/<service>/<id>` that follows the instance's health and the agent's phase.
//!
//! A znode that disappears (deleted by someone else, or with a session that expired) is created
//! again under the same name, so an instance is never registered twice; a connection lost for
//! less than the session timeout changes nothing, as the session and its znodes live on.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use zklb_zk_access::{Access, ReadAcl};
use zookeeper_client::{
    Acl, Acls, AddWatchMode, Client, CreateMode, Error, EventType, SessionId, SessionState,
};

use crate::config::OnUnhealthy;
use crate::curator::Instance;
use crate::drain::Phase;
use crate::health::Status;
use crate::metrics::{InstanceMetrics, Metrics};

/// How to reach ZooKeeper.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    pub connect: String,
    pub session_timeout: Duration,
    pub access: Access,
    /// Who may read the registrations.
    pub read_acls: Vec<ReadAcl>,
}

/// One instance to keep registered.
pub struct Registration {
    pub instance: Instance,
    pub znode: String,
    pub on_unhealthy: OnUnhealthy,
    pub status: watch::Receiver<Status>,
    pub metrics: Arc<InstanceMetrics>,
}

/// What an instance's znode should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    Absent,
    Registered { enabled: bool },
}

/// The znode an instance should have: in rotation while healthy and serving; out of rotation
/// (`enabled: false`, which load balancers drain) while the agent drains or, unless its
/// unhealthy instances are deregistered, while it is unhealthy; none once the agent leaves.
pub fn wanted(healthy: bool, on_unhealthy: OnUnhealthy, phase: Phase) -> Wanted {
    match (phase, healthy, on_unhealthy) {
        (Phase::Leaving, _, _) | (_, false, OnUnhealthy::Deregister) => Wanted::Absent,
        (Phase::Draining, _, _) | (_, false, OnUnhealthy::Disable) => {
            Wanted::Registered { enabled: false }
        }
        (Phase::Serving, true, _) => Wanted::Registered { enabled: true },
    }
}

/// What this agent last wrote to an instance's znode in the current session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Written {
    enabled: bool,
    since_ms: u64,
}

/// Between attempts to open a session.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// Before trying again a write that failed for another reason than a lost connection.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// How long closing the session may take once everything is deregistered.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Earlier sessions of this process whose leftover znodes are replaced rather than waited for.
const PAST_SESSIONS: usize = 16;

/// How a session ended.
enum SessionEnd {
    /// The agent left: every znode is deleted and the session closed.
    Left,
    /// Expired, or otherwise unusable: its znodes are gone or about to be.
    Lost(SessionState),
}

/// Keeps every instance registered as it should be until the agent leaves, opening a new session
/// whenever one ends. Returns once every znode is deleted after the phase turned `Leaving`.
pub async fn keep_registered(
    settings: SessionSettings,
    registrations: Vec<Registration>,
    phase: watch::Receiver<Phase>,
    metrics: Arc<Metrics>,
) {
    let (wake_sender, wake) = mpsc::unbounded_channel();
    // Health changes wake the registrar for as long as it runs; znode events, per session.
    let mut status_forwarders = JoinSet::new();
    for (index, registration) in registrations.iter().enumerate() {
        let mut status = registration.status.clone();
        let wake = wake_sender.clone();
        status_forwarders.spawn(async move {
            while status.changed().await.is_ok() && wake.send(index).is_ok() {}
        });
    }
    let mut registrar = Registrar {
        written: vec![None; registrations.len()],
        registrations,
        phase,
        metrics,
        wake,
        wake_sender,
        past_sessions: VecDeque::new(),
        instance_acls: settings.access.acls(&settings.read_acls),
        directory_acls: settings.access.directory_acls(&settings.read_acls),
    };
    loop {
        if *registrar.phase.borrow() == Phase::Leaving {
            // No session holds anything of ours.
            return;
        }
        let client = match open(&settings).await {
            Ok(client) => client,
            Err(error) => {
                tracing::warn!(connect = settings.connect, %error, "cannot open a ZooKeeper session");
                tokio::select! {
                    _ = sleep(RECONNECT_DELAY) => {}
                    _ = registrar.phase.changed() => {}
                }
                continue;
            }
        };
        let session = client.session_id();
        match registrar.serve(client).await {
            SessionEnd::Left => return,
            SessionEnd::Lost(state) => {
                tracing::warn!(
                    %session,
                    ?state,
                    "ZooKeeper session lost; registering again in a new session"
                );
                registrar.forget_session(session);
            }
        }
    }
}

async fn open(settings: &SessionSettings) -> Result<Client, Error> {
    let connecting = settings
        .access
        .connect(&settings.connect, settings.session_timeout);
    timeout(settings.session_timeout, connecting)
        .await
        .unwrap_or(Err(Error::Timeout))
}

struct Registrar {
    registrations: Vec<Registration>,
    written: Vec<Option<Written>>,
    phase: watch::Receiver<Phase>,
    metrics: Arc<Metrics>,
    /// Indexes of instances whose health or znode changed.
    wake: mpsc::UnboundedReceiver<usize>,
    wake_sender: mpsc::UnboundedSender<usize>,
    past_sessions: VecDeque<SessionId>,
    /// The ACLs of the instance znodes, and of the service znodes created on the way.
    instance_acls: Vec<Acl>,
    directory_acls: Vec<Acl>,
}

impl Registrar {
    async fn serve(&mut self, client: Client) -> SessionEnd {
        let session = client.session_id();
        tracing::info!(%session, "ZooKeeper session open");
        self.metrics.count_session();
        self.metrics.set_connected(true);
        let mut states = client.state_watcher();
        let mut watches = self.watch_znodes(&client).await;
        let mut retry_at = self.converge_all(&client).await;
        loop {
            if *self.phase.borrow() == Phase::Leaving && self.written.iter().all(Option::is_none) {
                drop(watches);
                close(client).await;
                return SessionEnd::Left;
            }
            tokio::select! {
                state = states.changed() => match state {
                    SessionState::Disconnected => {
                        self.metrics.set_connected(false);
                        tracing::warn!("ZooKeeper disconnected; the registrations stand while the session lives");
                    }
                    SessionState::SyncConnected | SessionState::ConnectedReadOnly => {
                        self.metrics.set_connected(true);
                        tracing::info!("ZooKeeper reconnected; checking the registrations");
                        // Persistent watches are not restored on a new connection, and events
                        // can be lost across it (ZOOKEEPER-4698): watch and look again.
                        watches = self.watch_znodes(&client).await;
                        for index in 0..self.registrations.len() {
                            self.verify(&client, index).await;
                        }
                        retry_at = self.converge_all(&client).await;
                    }
                    terminal => {
                        self.metrics.set_connected(false);
                        self.forget_written();
                        return SessionEnd::Lost(terminal);
                    }
                },
                Some(index) = self.wake.recv() => {
                    self.verify(&client, index).await;
                    if let Err(error) = self.converge(&client, index).await {
                        retry_at = self.after_failure(index, &error);
                    }
                }
                Ok(()) = self.phase.changed() => {
                    retry_at = self.converge_all(&client).await;
                }
                _ = sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                    retry_at = self.converge_all(&client).await;
                }
            }
        }
    }

    /// A persistent watch on each instance's znode, whose events wake the registrar.
    async fn watch_znodes(&self, client: &Client) -> JoinSet<()> {
        let mut watches = JoinSet::new();
        for (index, registration) in self.registrations.iter().enumerate() {
            let mut watcher = match client
                .watch(&registration.znode, AddWatchMode::Persistent)
                .await
            {
                Ok(watcher) => watcher,
                Err(error) => {
                    // A lost connection: the reconnection watches again.
                    tracing::warn!(znode = registration.znode, %error, "cannot watch");
                    continue;
                }
            };
            let wake = self.wake_sender.clone();
            watches.spawn(async move {
                loop {
                    let event = watcher.changed().await;
                    if event.event_type == EventType::Session {
                        // The watcher panics when asked again after a terminal state.
                        if event.session_state.is_terminated() {
                            return;
                        }
                    } else if wake.send(index).is_err() {
                        return;
                    }
                }
            });
        }
        watches
    }

    /// Forgets a write whose znode is gone or no longer this session's.
    async fn verify(&mut self, client: &Client, index: usize) {
        if self.written[index].is_none() {
            return;
        }
        let registration = &self.registrations[index];
        let owner = client.session_id().0;
        match client.check_stat(&registration.znode).await {
            Ok(Some(stat)) if stat.ephemeral_owner == owner => {}
            Ok(_) => {
                tracing::warn!(
                    znode = registration.znode,
                    "the registration was removed by someone else; registering again"
                );
                self.written[index] = None;
                registration.metrics.set_written(None);
            }
            // Not known now: the next event or reconnection looks again.
            Err(_) => {}
        }
    }

    /// Converges every instance; returns when to try again if one failed.
    async fn converge_all(&mut self, client: &Client) -> Option<Instant> {
        let mut retry_at = None;
        for index in 0..self.registrations.len() {
            if let Err(error) = self.converge(client, index).await {
                retry_at = self.after_failure(index, &error).or(retry_at);
            }
        }
        retry_at
    }

    /// When to try again after a failed write: never for a lost connection, as the reconnection
    /// converges everything.
    fn after_failure(&self, index: usize, error: &Error) -> Option<Instant> {
        let znode = &self.registrations[index].znode;
        if *error == Error::ConnectionLoss {
            tracing::debug!(
                znode,
                "connection lost during a write; converging on reconnection"
            );
            return None;
        }
        tracing::warn!(znode, %error, "cannot update the registration; trying again");
        Some(Instant::now() + RETRY_DELAY)
    }

    /// Makes one instance's znode what it should be.
    async fn converge(&mut self, client: &Client, index: usize) -> Result<(), Error> {
        let registration = &self.registrations[index];
        let status = *registration.status.borrow();
        let phase = *self.phase.borrow();
        let want = wanted(status.healthy, registration.on_unhealthy, phase);
        match (want, self.written[index]) {
            (Wanted::Absent, None) => Ok(()),
            (Wanted::Absent, Some(_)) => {
                match client.delete(&registration.znode, None).await {
                    Ok(()) | Err(Error::NoNode) => {}
                    Err(error) => return Err(error),
                }
                tracing::info!(znode = registration.znode, "deregistered");
                self.set_written(index, None);
                Ok(())
            }
            (Wanted::Registered { enabled }, written) => {
                let write = Written {
                    enabled,
                    since_ms: status.since_ms,
                };
                match written {
                    Some(written) if written == write => Ok(()),
                    Some(_) => self.update(client, index, write).await,
                    None => self.create(client, index, write).await,
                }
            }
        }
    }

    async fn update(&mut self, client: &Client, index: usize, write: Written) -> Result<(), Error> {
        let registration = &self.registrations[index];
        let data = registration.instance.to_json(write.enabled, write.since_ms);
        match client.set_data(&registration.znode, &data, None).await {
            Ok(_) => {
                tracing::info!(
                    znode = registration.znode,
                    enabled = write.enabled,
                    "updated"
                );
                self.set_written(index, Some(write));
                Ok(())
            }
            Err(Error::NoNode) => {
                self.set_written(index, None);
                self.create(client, index, write).await
            }
            Err(error) => Err(error),
        }
    }

    async fn create(&mut self, client: &Client, index: usize, write: Written) -> Result<(), Error> {
        let registration = &self.registrations[index];
        let znode = registration.znode.as_str();
        let data = registration.instance.to_json(write.enabled, write.since_ms);
        let ephemeral = CreateMode::Ephemeral.with_acls(Acls::new(&self.instance_acls));
        // A few rounds: the znode may come and go between the calls.
        for _ in 0..4 {
            match client.create(znode, &data, &ephemeral).await {
                Ok(_) => {}
                Err(Error::NoNode) => {
                    let (directory, _) = znode.rsplit_once('/').unwrap_or((znode, ""));
                    let persistent =
                        CreateMode::Persistent.with_acls(Acls::new(&self.directory_acls));
                    client.mkdir(directory, &persistent).await?;
                    continue;
                }
                Err(Error::NodeExists) => {
                    let Some(stat) = client.check_stat(znode).await? else {
                        continue;
                    };
                    let owner = SessionId(stat.ephemeral_owner);
                    if owner == client.session_id() {
                        // An earlier create of this session that seemed lost went through.
                        client.set_data(znode, &data, None).await?;
                    } else if self.past_sessions.contains(&owner) {
                        tracing::info!(znode, session = %owner, "replacing the registration of an expired session");
                        match client.delete(znode, Some(stat.version)).await {
                            Ok(()) | Err(Error::NoNode | Error::BadVersion) => continue,
                            Err(error) => return Err(error),
                        }
                    } else {
                        // Not ours to remove: the watch wakes us when it goes.
                        tracing::warn!(znode, session = %owner, "the znode is held by another session; registering once it is gone");
                        return Ok(());
                    }
                }
                Err(error) => return Err(error),
            }
            tracing::info!(znode, enabled = write.enabled, "registered");
            registration.metrics.count_registration();
            self.set_written(index, Some(write));
            return Ok(());
        }
        Err(Error::NodeExists)
    }

    fn set_written(&mut self, index: usize, written: Option<Written>) {
        self.written[index] = written;
        self.registrations[index]
            .metrics
            .set_written(written.map(|written| written.enabled));
    }

    fn forget_written(&mut self) {
        for index in 0..self.written.len() {
            self.set_written(index, None);
        }
    }

    /// Remembers an ended session, whose znodes may outlive it for a moment on the server.
    fn forget_session(&mut self, session: SessionId) {
        if self.past_sessions.len() == PAST_SESSIONS {
            self.past_sessions.pop_front();
        }
        self.past_sessions.push_back(session);
    }
}

/// Closes the session, so that ZooKeeper forgets it at once rather than after its timeout.
async fn close(client: Client) {
    let mut states = client.state_watcher();
    drop(client);
    let closed = async { while !states.changed().await.is_terminated() {} };
    if timeout(CLOSE_TIMEOUT, closed).await.is_err() {
        tracing::debug!("the session did not confirm its end; it expires on its own");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_healthy_serving_instance_is_in_rotation() {
        for on_unhealthy in [OnUnhealthy::Disable, OnUnhealthy::Deregister] {
            assert_eq!(
                wanted(true, on_unhealthy, Phase::Serving),
                Wanted::Registered { enabled: true }
            );
        }
    }

    #[test]
    fn an_unhealthy_instance_is_disabled_or_deregistered_as_configured() {
        assert_eq!(
            wanted(false, OnUnhealthy::Disable, Phase::Serving),
            Wanted::Registered { enabled: false }
        );
        assert_eq!(
            wanted(false, OnUnhealthy::Deregister, Phase::Serving),
            Wanted::Absent
        );
    }

    #[test]
    fn draining_takes_every_registered_instance_out_of_rotation() {
        assert_eq!(
            wanted(true, OnUnhealthy::Deregister, Phase::Draining),
            Wanted::Registered { enabled: false }
        );
        assert_eq!(
            wanted(false, OnUnhealthy::Disable, Phase::Draining),
            Wanted::Registered { enabled: false }
        );
        // An instance that was deregistered for its health is not brought back to drain.
        assert_eq!(
            wanted(false, OnUnhealthy::Deregister, Phase::Draining),
            Wanted::Absent
        );
    }

    #[test]
    fn leaving_deregisters_everything() {
        for healthy in [true, false] {
            for on_unhealthy in [OnUnhealthy::Disable, OnUnhealthy::Deregister] {
                assert_eq!(
                    wanted(healthy, on_unhealthy, Phase::Leaving),
                    Wanted::Absent
                );
            }
        }
    }
}
