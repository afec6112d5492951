//! Registrars that are not ours: real client libraries writing the formats zklb reads.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

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
        let classpath = CURATOR_CLASSPATH
            .iter()
            .map(|jar| format!("/usr/share/java/{jar}.jar"))
            .collect::<Vec<_>>()
            .join(":");
        let mut command = Command::new("java");
        command
            .args(["-cp", &classpath])
            .arg(workspace_root().join("tests/registrars/CuratorRegistrar.java"))
            .args([
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
