//! zklb-agent registers local service instances in ZooKeeper the way Apache Curator does, for
//! backends that cannot register themselves (a Go service, nginx, a Python app), as Airbnb's
//! Nerve does for its registry.
//!
//! - [`config`]: flags, `ZKLB_AGENT_*` variables or a JSON file, validated before anything runs;
//! - [`curator`]: the Curator x-discovery JSON of an instance;
//! - [`health`]: HTTP or TCP checks and the rise/fall hysteresis that turns them into health;
//! - [`registration`]: the ZooKeeper session and one ephemeral znode per instance, following
//!   health and the agent's phase, created again whenever it disappears;
//! - [`drain`]: the stop sequence (out of rotation, grace period, deregistration);
//! - [`metrics`]: the agent's own `/metrics` and `/healthz`.

pub mod config;
pub mod curator;
pub mod drain;
pub mod health;
pub mod metrics;
pub mod registration;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

pub use config::{Args, Config};
pub use drain::Exit;

use drain::Phase;
use health::{Prober, Status};
use metrics::{InstanceMetrics, Metrics};
use registration::{Registration, SessionSettings};

/// Registers the configured instances and serves the agent's endpoint on `listener` until the
/// first of `signals`, then drains and deregisters them (see [`drain`]).
pub async fn run(
    config: Config,
    listener: TcpListener,
    mut signals: mpsc::UnboundedReceiver<()>,
) -> anyhow::Result<Exit> {
    let (phase_sender, phase) = watch::channel(Phase::Serving);
    let mut checks = JoinSet::new();
    let mut registrations = Vec::with_capacity(config.instances.len());
    for instance in &config.instances {
        let status = Status::initial(instance.check.is_some());
        let znode = instance.znode(&config.root);
        let metrics = Arc::new(InstanceMetrics::new(
            &instance.instance.service,
            &instance.instance.id,
            znode.clone(),
            status.healthy,
        ));
        let (status_sender, status) = watch::channel(status);
        if let Some(check) = &instance.check {
            let prober = Prober::new(check.probe.clone(), instance.target);
            checks.spawn(health::keep_checking(
                check.clone(),
                prober,
                status_sender,
                Arc::clone(&metrics),
            ));
        }
        registrations.push(Registration {
            instance: instance.instance.clone(),
            znode,
            on_unhealthy: instance.on_unhealthy,
            status,
            metrics,
        });
    }
    let metrics = Arc::new(Metrics::new(
        registrations
            .iter()
            .map(|registration| Arc::clone(&registration.metrics))
            .collect(),
    ));
    let endpoint = metrics::router(Arc::clone(&metrics), phase.clone());
    let server = tokio::spawn(async move { axum::serve(listener, endpoint).await });
    let settings = SessionSettings {
        connect: config.zookeeper.clone(),
        session_timeout: config.session_timeout,
        access: config.access.clone(),
        read_acls: config.read_acls.clone(),
    };
    let mut registrar = tokio::spawn(registration::keep_registered(
        settings,
        registrations,
        phase,
        metrics,
    ));
    tokio::select! {
        Some(()) = signals.recv() => {}
        ended = &mut registrar => anyhow::bail!("the registrar stopped unexpectedly: {ended:?}"),
    }
    let exit = drain::drain(&phase_sender, config.grace, &mut signals, &mut registrar).await;
    checks.abort_all();
    server.abort();
    Ok(exit)
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}
