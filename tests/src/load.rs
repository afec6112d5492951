//! Continuous, bounded load through Envoy while a test breaks something: every answer and every
//! error is counted, and which backend answered, so that "no client saw a failure" is a count.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::stack::Answer;
use crate::Envoy;

/// A worker sends at most one request per period, so that several loaded stacks share two
/// cores with the servers they test.
const PERIOD: Duration = Duration::from_millis(10);
/// Longer than Envoy's route timeout (15 s), so that Envoy, not the client, gives up first.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// No load outlives this, whatever the test does.
const LONGEST: Duration = Duration::from_secs(300);
/// Errors kept as examples.
const EXAMPLES: usize = 5;

/// What the clients saw so far.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub requests: u64,
    /// Answers other than 200, and requests that got no answer.
    pub errors: u64,
    pub by_backend: BTreeMap<String, u64>,
    pub examples: Vec<String>,
}

impl Tally {
    /// Answers that `backend` gave.
    pub fn answered_by(&self, backend: &str) -> u64 {
        self.by_backend.get(backend).copied().unwrap_or(0)
    }

    fn count(&mut self, answer: &Answer) {
        self.requests += 1;
        if answer.status == 200 {
            if let Some(backend) = answer.backend() {
                *self.by_backend.entry(backend.to_string()).or_insert(0) += 1;
            }
        } else {
            self.errors += 1;
            if self.examples.len() < EXAMPLES {
                self.examples
                    .push(format!("{} {}", answer.status, answer.body));
            }
        }
    }
}

/// `workers` clients, each sending GET requests for a service through Envoy one after another,
/// until stopped (or dropped).
pub struct Load {
    tally: Arc<Mutex<Tally>>,
    stop: watch::Sender<bool>,
    workers: JoinSet<()>,
}

impl Load {
    pub fn start(envoy: &Envoy, service: &str, workers: usize) -> Load {
        let http = reqwest::Client::builder()
            .timeout(CLIENT_TIMEOUT)
            .build()
            .expect("building an HTTP client");
        let url = format!("http://127.0.0.1:{}/hello", envoy.listen_port);
        let tally = Arc::new(Mutex::new(Tally::default()));
        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();
        for _ in 0..workers {
            let (http, url, service) = (http.clone(), url.clone(), service.to_string());
            let (tally, mut stopped) = (Arc::clone(&tally), stopped.clone());
            tasks.spawn(async move {
                let until = tokio::time::Instant::now() + LONGEST;
                let mut pace = tokio::time::interval(PERIOD);
                while !*stopped.borrow() && tokio::time::Instant::now() < until {
                    tokio::select! {
                        _ = pace.tick() => {}
                        _ = stopped.changed() => break,
                    }
                    let sent = http.get(&url).header("host", &service).send().await;
                    let answer = Answer::of(sent).await;
                    tally.lock().expect("the tally").count(&answer);
                }
            });
        }
        Load {
            tally,
            stop,
            workers: tasks,
        }
    }

    /// What the clients saw so far.
    pub fn tally(&self) -> Tally {
        self.tally.lock().expect("the tally").clone()
    }

    /// Waits until `more` requests have been answered (or failed) after this call, so that a
    /// test knows the load went on through what it did.
    pub async fn after(&self, more: u64) {
        let target = self.tally().requests + more;
        let what = format!("{more} more requests go through");
        crate::eventually(Duration::from_secs(60), &what, || async {
            let requests = self.tally().requests;
            (requests >= target)
                .then_some(())
                .ok_or(format!("{requests} of {target}"))
        })
        .await;
    }

    /// Stops the clients, lets each finish its request, and returns the final count.
    pub async fn stop(mut self) -> Tally {
        self.stop.send_replace(true);
        while let Some(done) = self.workers.join_next().await {
            done.expect("a load worker");
        }
        self.tally()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.workers.abort_all();
    }
}
