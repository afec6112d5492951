//! The compose stack, docker-compose.yml as shipped, on a Docker engine: it comes up serving,
//! publishes on the host's loopback only, spreads requests evenly over the demo backends, loses no
//! request when a backend container is stopped under load, takes the container back when it
//! starts again, follows `--scale`, and `down` leaves no container, network or volume behind.
//!
//! scripts/compose-test runs it, with images it built (none can be pulled where the tests run)
//! named in the compose file's variables, and the compose command and project in
//! `ZKLB_COMPOSE` and `ZKLB_COMPOSE_PROJECT`; a plain `cargo test` skips it as ignored.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use zklb_tests::stack::{assert_all_served, workspace_root, Answer};
use zklb_tests::stats::{chi_square_uniform, is_uniform};
use zklb_tests::{eventually, Stack};

/// Where docker-compose.yml publishes Envoy's listener and the control plane's API by default.
const ENVOY: &str = "http://127.0.0.1:10000/";
const CONTROL_PLANE: &str = "http://127.0.0.1:18000";
const SERVICE: &str = "echo";
/// The longest any one docker or compose command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
const SETTLE: Duration = Duration::from_secs(90);
const CONCURRENCY: usize = 8;

/// The compose project of this test; taken down when dropped, whatever happened.
struct Compose {
    command: Vec<String>,
    project: String,
}

impl Compose {
    fn from_env() -> Compose {
        let variable = |name: &str| {
            std::env::var(name)
                .unwrap_or_else(|_| panic!("{name} is not set: run scripts/compose-test"))
        };
        Compose {
            command: variable("ZKLB_COMPOSE")
                .split_whitespace()
                .map(str::to_string)
                .collect(),
            project: variable("ZKLB_COMPOSE_PROJECT"),
        }
    }

    /// Runs the compose command on docker-compose.yml with `args`: its stdout, or what went wrong.
    fn try_run(&self, args: &[&str]) -> Result<String, String> {
        let file = workspace_root().join("docker-compose.yml");
        let mut command = bounded(&self.command);
        command
            .args(["--project-name", &self.project, "--file"])
            .arg(file)
            .args(args);
        output_of(command)
    }

    fn run(&self, args: &[&str]) -> String {
        self.try_run(args)
            .unwrap_or_else(|error| panic!("compose {args:?}: {error}"))
    }

    /// The ids of the service's running containers.
    fn containers(&self, service: &str) -> Vec<String> {
        self.run(&["ps", "-q", service])
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn labelled(&self, kind: &str) -> Vec<String> {
        let label = format!("label=com.docker.compose.project={}", self.project);
        let mut args = vec![kind, "ls", "-q", "--filter", &label];
        if kind == "container" {
            args.push("--all");
        }
        docker(&args).lines().map(str::to_string).collect()
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(logs) = self.try_run(&["logs", "--no-color", "--tail", "40"]) {
                eprintln!("--- compose logs (tail) ---\n{logs}");
            }
        }
        if let Err(error) =
            self.try_run(&["down", "--volumes", "--remove-orphans", "--timeout", "5"])
        {
            eprintln!("compose down: {error}");
        }
    }
}

/// `command`, killed if it outlasts [`COMMAND_TIMEOUT`].
fn bounded(command: &[String]) -> Command {
    let mut bounded = Command::new("timeout");
    bounded
        .arg(COMMAND_TIMEOUT.as_secs().to_string())
        .args(command);
    bounded
}

fn output_of(mut command: Command) -> Result<String, String> {
    let output = command
        .output()
        .map_err(|error| format!("starting {command:?}: {error}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn docker(args: &[&str]) -> String {
    let mut command = bounded(&["docker".to_string()]);
    command.args(args);
    output_of(command).unwrap_or_else(|error| panic!("docker {args:?}: {error}"))
}

/// A container's health if it has a check, otherwise its status (with the exit code once exited).
fn state(container: &str) -> String {
    let format = "{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}\
                  {{if eq .State.Status \"exited\"}} {{.State.ExitCode}}{{end}}{{end}}";
    inspect(container, format).trim().to_string()
}

fn inspect(container: &str, format: &str) -> String {
    docker(&["inspect", "--format", format, container])
}

/// The instance ids demo backend containers register: the service and the container's hostname,
/// which is the first 12 digits of its id.
fn backend_ids(containers: &[String]) -> Vec<String> {
    containers
        .iter()
        .map(|container| format!("{SERVICE}-{}", &container[..12]))
        .collect()
}

/// How many instances of the service the control plane lists.
async fn registered(http: &reqwest::Client) -> Result<usize, String> {
    let service: Value = http
        .get(format!("{CONTROL_PLANE}/v1/services/{SERVICE}"))
        .send()
        .await
        .and_then(|response| response.error_for_status())
        .map_err(|error| error.to_string())?
        .json()
        .await
        .map_err(|error| error.to_string())?;
    service["instances"]
        .as_array()
        .map(Vec::len)
        .ok_or_else(|| format!("no instances in {service}"))
}

/// Requests through Envoy, `CONCURRENCY` at a time, until `limit` are sent or it is stopped.
struct Load {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    workers: tokio::task::JoinSet<Vec<(Instant, Answer)>>,
}

impl Load {
    fn start(http: &reqwest::Client, limit: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let sent = Arc::new(AtomicUsize::new(0));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..CONCURRENCY {
            let (http, stop, answered, sent) =
                (http.clone(), stop.clone(), answered.clone(), sent.clone());
            workers.spawn(async move {
                let mut answers = Vec::new();
                while !stop.load(Ordering::Relaxed) && sent.fetch_add(1, Ordering::Relaxed) < limit
                {
                    let request = http.get(ENVOY).header("host", SERVICE).send();
                    answers.push((Instant::now(), Answer::of(request.await).await));
                    answered.fetch_add(1, Ordering::Relaxed);
                }
                answers
            });
        }
        Load {
            stop,
            answered,
            workers,
        }
    }

    fn answered(&self) -> usize {
        self.answered.load(Ordering::Relaxed)
    }

    /// Waits until `count` more answers have come.
    async fn wait_for(&self, count: usize, what: &str) {
        let target = self.answered() + count;
        eventually(SETTLE, what, || async {
            match self.answered() {
                answered if answered >= target => Ok(()),
                answered => Err(format!("{answered} of {target} answers")),
            }
        })
        .await;
    }

    /// Every answer, each with when it came, once the workers are done (stopped, or the limit
    /// sent).
    async fn finish(mut self, stop: bool) -> Vec<(Instant, Answer)> {
        self.stop.store(stop, Ordering::Relaxed);
        let mut answers = Vec::with_capacity(self.answered());
        while let Some(done) = self.workers.join_next().await {
            answers.extend(done.expect("load worker"));
        }
        answers
    }
}

async fn requests(http: &reqwest::Client, count: usize) -> Vec<Answer> {
    let answers = Load::start(http, count).finish(false).await;
    answers.into_iter().map(|(_, answer)| answer).collect()
}

/// Waits until the control plane lists exactly `ids` and requests through Envoy reach all of
/// them and no other backend.
async fn wait_for_backends(http: &reqwest::Client, ids: &[String], what: &str) {
    let expected: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
    eventually(SETTLE, what, || {
        let expected = expected.clone();
        async move {
            let instances = registered(http).await?;
            let answers = requests(http, 30 * expected.len()).await;
            let seen: BTreeSet<&str> = answers.iter().filter_map(Answer::backend).collect();
            if instances == expected.len() && seen == expected {
                Ok(())
            } else {
                Err(format!("{instances} registered, requests reached {seen:?}"))
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the images scripts/compose-test builds; it runs this test"]
async fn compose_stack_serves_spreads_survives_a_stopped_backend_and_scales() {
    let compose = Compose::from_env();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("an HTTP client");

    // Up as a user brings it: Envoy is started only once the filter is in its volume and the
    // control plane and every backend are healthy, and is healthy itself once it can route.
    let started = Instant::now();
    compose.run(&["up", "--detach"]);
    for service in ["zookeeper", "control-plane", SERVICE] {
        for container in compose.containers(service) {
            assert_eq!(state(&container), "healthy", "{service} when up returned");
        }
    }
    for container in compose.run(&["ps", "--all", "-q", "filter"]).lines() {
        assert_eq!(
            state(container),
            "exited 0",
            "the filter copier when up returned"
        );
    }
    let envoy = compose.containers("envoy");
    eventually(SETTLE, "Envoy is healthy", || async {
        match state(&envoy[0]).as_str() {
            "healthy" => Ok(()),
            other => Err(other.to_string()),
        }
    })
    .await;
    let answer = Answer::of(http.get(ENVOY).header("host", SERVICE).send().await).await;
    assert_eq!(answer.status, 200, "healthy Envoy answered {answer:?}");
    let backends = compose.containers(SERVICE);
    assert_eq!(backends.len(), 3, "three demo backends: {backends:?}");
    let ids = backend_ids(&backends);
    wait_for_backends(&http, &ids, "the stack serves the three demo backends").await;
    println!(
        "compose-test: up and serving {ids:?} after {:?}",
        started.elapsed()
    );

    // Nothing is published beyond the host's loopback.
    for container in compose.labelled("container") {
        let ports = inspect(&container, "{{json .NetworkSettings.Ports}}");
        let ports: Value = serde_json::from_str(&ports).expect("published ports as JSON");
        for binding in ports
            .as_object()
            .into_iter()
            .flatten()
            .flat_map(|(_, bindings)| bindings.as_array().cloned().unwrap_or_default())
        {
            assert_eq!(
                binding["HostIp"], "127.0.0.1",
                "{container} publishes {binding}"
            );
        }
    }

    // The random policy spreads requests evenly.
    let answers = requests(&http, 3_000).await;
    assert_all_served(&answers);
    let counts = Stack::count_by_backend(&answers);
    let observed: Vec<u64> = ids
        .iter()
        .map(|id| counts.get(id).copied().unwrap_or(0))
        .collect();
    let chi_square = chi_square_uniform(&observed);
    println!("compose-test: 3000 requests over {ids:?}: {observed:?}, chi-square {chi_square:.2}");
    assert!(
        observed.iter().all(|&count| count > 0),
        "a backend got nothing: {counts:?}"
    );
    assert!(
        is_uniform(&observed),
        "not uniform at p = 0.001: {observed:?} (chi-square {chi_square:.2})"
    );

    // One backend container stopped under load: it deregisters and drains, no client sees it.
    let load = Load::start(&http, 200_000);
    load.wait_for(200, "requests flow before the stop").await;
    let stopping = backends[0].clone();
    let stopped = tokio::task::spawn_blocking(move || {
        docker(&["stop", "--time", "10", &stopping]);
        Instant::now()
    })
    .await
    .expect("docker stop");
    eventually(SETTLE, "the control plane lists two backends", || async {
        match registered(&http).await? {
            2 => Ok(()),
            other => Err(format!("{other} registered")),
        }
    })
    .await;
    load.wait_for(500, "requests flow after the stop").await;
    let answers = load.finish(true).await;
    let after_stop = answers.iter().filter(|(at, _)| *at > stopped).count();
    let errors = answers
        .iter()
        .filter(|(_, answer)| answer.status != 200)
        .count();
    println!(
        "compose-test: {} requests while {} stopped ({after_stop} after it was down): {errors} errors",
        answers.len(),
        ids[0]
    );
    let answers: Vec<Answer> = answers.into_iter().map(|(_, answer)| answer).collect();
    assert_all_served(&answers);
    assert!(
        answers
            .iter()
            .any(|answer| answer.backend() == Some(ids[0].as_str())),
        "the stopped backend served nothing before it stopped: the load missed it"
    );
    assert!(
        after_stop >= 100,
        "only {after_stop} requests after the stop"
    );

    // Started again, it registers again and is back in rotation.
    docker(&["start", &backends[0]]);
    wait_for_backends(&http, &ids, "the restarted backend is back in rotation").await;

    // Scaled up, the new container registers and gets traffic.
    compose.run(&[
        "up",
        "--detach",
        "--no-recreate",
        "--scale",
        &format!("{SERVICE}=4"),
    ]);
    let scaled = compose.containers(SERVICE);
    assert_eq!(scaled.len(), 4, "four demo backends: {scaled:?}");
    let scaled_ids = backend_ids(&scaled);
    wait_for_backends(&http, &scaled_ids, "a fourth backend joins").await;

    // Down takes every container, network and volume of the project with it, the anonymous
    // volumes of images that declare some included.
    let mut volumes = BTreeSet::new();
    for container in compose.labelled("container") {
        let names = inspect(
            &container,
            "{{range .Mounts}}{{if eq .Type \"volume\"}}{{.Name}} {{end}}{{end}}",
        );
        volumes.extend(names.split_whitespace().map(str::to_string));
    }
    assert!(
        !volumes.is_empty(),
        "the stack has volumes (filter, ZooKeeper's data)"
    );
    compose.run(&["down", "--volumes", "--remove-orphans", "--timeout", "5"]);
    assert_eq!(
        compose.labelled("container"),
        Vec::<String>::new(),
        "containers left"
    );
    assert_eq!(
        compose.labelled("network"),
        Vec::<String>::new(),
        "networks left"
    );
    let existing = docker(&["volume", "ls", "-q"]);
    let volumes_left: Vec<&str> = existing
        .lines()
        .filter(|name| volumes.contains(*name))
        .collect();
    assert!(volumes_left.is_empty(), "volumes left: {volumes_left:?}");
}
