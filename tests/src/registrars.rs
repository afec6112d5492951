//! Registrars that are not ours: real client libraries writing the formats zklb reads, and
//! reading what zklb-agent writes.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::eventually;
use crate::process::Child;
use crate::stack::{workspace_root, ZooKeeper};

/// Debian's jars for Apache Curator's x-discovery and what it needs (`scripts/setup`).
const CURATOR_CLASSPATH: &[&str] = &[
    "curator-x-discovery",
    "curator-framework",
    "curator-client",
    "zookeeper",
    "zookeeper-jute",
    "guava",
    "jackson-databind",
    "jackson-core",
    "jackson-annotations",
    "slf4j-api",
];

fn curator_command() -> Command {
    let classpath = CURATOR_CLASSPATH
        .iter()
        .map(|jar| format!("/usr/share/java/{jar}.jar"))
        .collect::<Vec<_>>()
        .join(":");
    let mut command = Command::new("java");
    command
        .args(["-cp", &classpath])
        .arg(workspace_root().join("tests/registrars/CuratorRegistrar.java"));
    command
}

/// The instances of `service` as Apache Curator's own `ServiceDiscovery.queryForInstances`
/// reads them: one JSON object per instance of what Curator's getters return (`name`, `id`,
/// `address`, `port`, `sslPort`, `enabled`, `serviceType`, `registrationTimeUTC`, `uri`,
/// `payload`).
pub async fn curator_query(
    zookeeper: &ZooKeeper,
    base_path: &str,
    service: &str,
    dir: &Path,
) -> Vec<Value> {
    let mut command = curator_command();
    command.args(["query", &zookeeper.connect, base_path, service]);
    let process = Child::spawn(&format!("curator-query-{service}"), command, dir);
    // Compiling the source and starting a JVM takes a few seconds.
    let log = eventually(
        Duration::from_secs(60),
        &format!("Curator queries {service}"),
        || async {
            let log = process.log();
            assert!(
                !log.contains("Exception in thread"),
                "Curator could not query {service}:\n{log}"
            );
            if log.lines().any(|line| line.starts_with("queried ")) {
                Ok(log)
            } else {
                Err("not queried yet".to_string())
            }
        },
    )
    .await;
    log.lines()
        .filter_map(|line| line.strip_prefix("instance "))
        .map(|json| {
            serde_json::from_str(json)
                .unwrap_or_else(|error| panic!("Curator printed {json:?}: {error}"))
        })
        .collect()
}

/// An instance registered by Apache Curator's own `ServiceDiscovery`, for as long as this lives.
pub struct CuratorRegistrar {
    _process: Child,
}

impl CuratorRegistrar {
    pub async fn register(
        zookeeper: &ZooKeeper,
        base_path: &str,
        service: &str,
        id: &str,
        address: &str,
        port: u16,
        dir: &Path,
    ) -> CuratorRegistrar {
        let mut command = curator_command();
        command.args([
            &zookeeper.connect,
            base_path,
            service,
            id,
            address,
            &port.to_string(),
        ]);
        let process = Child::spawn(&format!("curator-{id}"), command, dir);
        // Compiling the source and starting a JVM takes a few seconds.
        eventually(
            Duration::from_secs(60),
            &format!("Curator registers {id}"),
            || async {
                if process
                    .log()
                    .lines()
                    .any(|line| line.starts_with("registered "))
                {
                    Ok(())
                } else {
                    Err("not registered yet".to_string())
                }
            },
        )
        .await;
        CuratorRegistrar { _process: process }
    }
}

/// Instances registered with kazoo (Debian's python3-kazoo) in the layouts of Finagle/Aurora
/// ServerSets, Nerve, Dubbo 2 and apisix-seed, for as long as this lives (see
/// `tests/registrars/kazoo_registrar.py` for the registrations it takes).
pub struct KazooRegistrar {
    process: Child,
    /// The znode of each registration, in order.
    pub znodes: Vec<String>,
}

impl KazooRegistrar {
    pub async fn register(
        zookeeper: &ZooKeeper,
        name: &str,
        registrations: Value,
        dir: &Path,
    ) -> KazooRegistrar {
        let mut command = Command::new("/usr/bin/python3");
        command
            .arg(workspace_root().join("tests/registrars/kazoo_registrar.py"))
            .arg(&zookeeper.connect)
            .arg(registrations.to_string());
        let process = Child::spawn(&format!("kazoo-{name}"), command, dir);
        eventually(
            Duration::from_secs(30),
            &format!("kazoo registers {name}"),
            || async {
                let log = process.log();
                if log.lines().any(|line| line == "ready") {
                    Ok(())
                } else {
                    Err(log)
                }
            },
        )
        .await;
        let znodes = process
            .log()
            .lines()
            .filter_map(|line| line.strip_prefix("registered "))
            .map(str::to_string)
            .collect();
        KazooRegistrar { process, znodes }
    }

    /// Closes the session (SIGTERM), which removes its ephemeral znodes at once.
    pub fn stop(&mut self) {
        self.process.terminate(Duration::from_secs(10));
    }
}
