//! Filter scale: the zklb filter's cost per request, and how fast a registration reaches requests,
//! when the registry holds many services. One ZooKeeper; per size a root of its own, a control
//! plane and an Envoy (one worker) with the filter. Requests go to the service `echo` (the same
//! three nginx backends at every size); the other services only fill the filter's table and
//! Envoy's clusters. wrk rounds are interleaved across sizes. Then what one service's change
//! costs Envoy on a large registry ([`list_update`]).

use std::path::Path;
use std::time::{Duration, Instant};

use zklb_tests::stack::{ControlPlane, Envoy};

use crate::data_plane::{self, SERVICE};
use crate::list_update;
use crate::nginx::Nginx;
use crate::propagation::{millis, wait_first, CHANGE_LIMIT, ISOLATION};
use crate::registration;
use crate::startup;
use crate::traffic::Traffic;
use crate::wrk::{self, WrkReport};
use zklb_tests::procfs;

/// Instances of every filler service (unreachable ports: no request is routed to them).
const FILLER_INSTANCES: usize = 3;
const TRAFFIC_LIMIT: Duration = Duration::from_secs(10 * 60);

#[derive(Debug, Clone)]
pub struct Settings {
    /// Registry sizes, in services (`echo` included).
    pub sizes: Vec<usize>,
    pub rounds: usize,
    pub round: Duration,
    pub warm_up: Duration,
    pub connections: u32,
    /// Isolated registrations timed at each size.
    pub changes: usize,
    pub clients: usize,
    pub update: list_update::Settings,
}

#[derive(Debug, Clone)]
pub struct Results {
    pub sizes: Vec<Size>,
    pub update: list_update::Results,
}

/// The figures of one registry size.
#[derive(Debug, Clone)]
pub struct Size {
    pub services: usize,
    /// wrk rounds with Envoy's CPU µs per request.
    pub rounds: Vec<(WrkReport, f64)>,
    /// Create returned → first answer from the new `echo` instance, per change.
    pub changes_ms: Vec<Option<f64>>,
}

struct Stack {
    services: usize,
    envoy: Envoy,
    _control_plane: ControlPlane,
}

pub async fn measure(dir: &Path, settings: &Settings) -> anyhow::Result<Results> {
    let dir = dir.join("filter-scale");
    std::fs::create_dir_all(&dir)?;
    // Labels 0..3 serve `echo`; label 3 is the instance that registers during the changes.
    let nginx = Nginx::start(&dir, "nginx-filter-scale", 0..4).await;
    let zookeeper = startup::zookeeper(&dir).await?;
    let registrar = zookeeper.client().await;
    let clock_ticks = procfs::clock_ticks_per_second()?;

    let mut stacks = Vec::new();
    for &services in &settings.sizes {
        let root = format!("/filter-scale-{services}");
        registration::create_service(&registrar, &root, SERVICE).await?;
        for (index, port) in nginx.ports[..3].iter().enumerate() {
            let id = format!("{SERVICE}-{index}");
            registration::register(&registrar, &root, SERVICE, &id, *port).await?;
        }
        let filler_ports: Vec<u16> = (0..FILLER_INSTANCES).map(|i| 20_000 + i as u16).collect();
        for s in 1..services {
            let service = format!("svc-{s}");
            registration::create_service(&registrar, &root, &service).await?;
            registration::register_many(&registrar, &root, &service, "i", &filler_ports).await?;
        }
        let size_dir = dir.join(format!("{services}"));
        std::fs::create_dir_all(&size_dir)?;
        let control_plane = ControlPlane::start(&zookeeper, &root, &size_dir).await;
        let envoy = Envoy::start_with_workers(&control_plane, 1, &size_dir).await;
        let name = format!("{services} services");
        data_plane::wait_for_every_backend(&name, &envoy, SERVICE, 3).await;
        println!("filter scale: {services} services up");
        stacks.push(Stack {
            services,
            envoy,
            _control_plane: control_plane,
        });
    }

    for stack in &stacks {
        wrk::run(
            &data_plane::url(&stack.envoy),
            SERVICE,
            settings.connections,
            settings.warm_up,
        )
        .await?;
    }
    let mut sizes: Vec<Size> = stacks
        .iter()
        .map(|stack| Size {
            services: stack.services,
            rounds: Vec::new(),
            changes_ms: Vec::new(),
        })
        .collect();
    for round in 1..=settings.rounds {
        for (stack, size) in stacks.iter().zip(&mut sizes) {
            let before = procfs::cpu_ticks(stack.envoy.pid())?;
            let url = data_plane::url(&stack.envoy);
            let report = wrk::run(&url, SERVICE, settings.connections, settings.round).await?;
            let after = procfs::cpu_ticks(stack.envoy.pid())?;
            let cpu =
                (after - before) as f64 * 1e6 / clock_ticks as f64 / report.requests.max(1) as f64;
            println!(
                "filter scale: round {round}/{} {:>5} services {:>9.0} rps  p99 {:.2} ms  {cpu:.1} µs CPU/req",
                settings.rounds, stack.services, report.requests_per_second, report.p99_ms,
            );
            size.rounds.push((report, cpu));
        }
    }

    let probe = Nginx::label(3);
    for (stack, size) in stacks.iter().zip(&mut sizes) {
        let root = format!("/filter-scale-{}", stack.services);
        let url = data_plane::url(&stack.envoy);
        let traffic = Traffic::start(&url, SERVICE, settings.clients, TRAFFIC_LIMIT);
        tokio::time::sleep(ISOLATION).await;
        for j in 0..settings.changes {
            let id = format!("probe-{j}");
            let path =
                registration::register(&registrar, &root, SERVICE, &id, nginx.ports[3]).await?;
            let created = Instant::now();
            let first = wait_first(&traffic, &probe, created, CHANGE_LIMIT).await;
            size.changes_ms.push(first.map(|at| millis(at - created)));
            // Each change meets an idle system: the registration's updates are through before
            // the deregistration, and the deregistration's before the next registration.
            tokio::time::sleep(ISOLATION).await;
            registration::deregister(&registrar, &path).await?;
            tokio::time::sleep(ISOLATION).await;
        }
        traffic.stop().await;
        println!(
            "filter scale: {} services: registrations reached requests after {:?} ms",
            stack.services,
            size.changes_ms
                .iter()
                .map(|ms| ms.map_or("never".to_string(), |ms| format!("{ms:.1}")))
                .collect::<Vec<_>>()
        );
    }
    drop(stacks);
    drop(registrar);
    let update =
        list_update::measure(&dir, &zookeeper, &nginx.ports[..3], &settings.update).await?;
    Ok(Results { sizes, update })
}
