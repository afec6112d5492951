//! Requests through Envoy in a tight loop from several concurrent clients, each answer stamped
//! with its arrival time and the backend that gave it, so that the moment a backend starts or
//! stops receiving requests can be read back.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::stats::percentile;

/// Requests each client sends at most, whatever the time limit.
const MAX_REQUESTS_PER_CLIENT: u64 = 20_000_000;

/// A running request loop; dropping it stops the clients.
pub struct Traffic {
    log: Arc<Mutex<Log>>,
    stop: Arc<AtomicBool>,
    clients: JoinSet<()>,
    started: Instant,
}

#[derive(Default)]
struct Log {
    /// Arrival times of the `200` answers, by body (the backend's label), in arrival order.
    answers: HashMap<String, Vec<Instant>>,
    /// Arrival times of the other answers by status; `0` for requests that got no answer at all.
    others: BTreeMap<u16, Vec<Instant>>,
    /// Every request's arrival time and latency in milliseconds, in arrival order.
    latencies: Vec<(Instant, f64)>,
}

/// What a stopped request loop did.
#[derive(Debug, Clone)]
pub struct Summary {
    /// `200` answers.
    pub answers: u64,
    /// Other answers by status; `0` for requests without an answer.
    pub others: BTreeMap<u16, u64>,
    pub seconds: f64,
}

/// The answers of one stretch of time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Window {
    pub ok: u64,
    /// Answers other than `200`, and requests without an answer.
    pub failed: u64,
    pub seconds: f64,
    /// Request latencies, sent to answered (or failed).
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl Window {
    pub fn per_second(&self) -> f64 {
        (self.ok + self.failed) as f64 / self.seconds.max(1e-9)
    }
}

impl Summary {
    pub fn answers_per_second(&self) -> f64 {
        self.answers as f64 / self.seconds.max(1e-9)
    }
}

impl Traffic {
    /// Starts `clients` loops of `GET url` with `Host: host`, each stopping at `limit` at the latest.
    pub fn start(url: &str, host: &str, clients: usize, limit: Duration) -> Traffic {
        let log = Arc::new(Mutex::new(Log::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(clients)
            .build()
            .expect("building an HTTP client");
        let started = Instant::now();
        let deadline = started + limit;
        let mut tasks = JoinSet::new();
        for _ in 0..clients {
            let (http, log, stop) = (http.clone(), log.clone(), stop.clone());
            let (url, host) = (url.to_string(), host.to_string());
            tasks.spawn(async move {
                for _ in 0..MAX_REQUESTS_PER_CLIENT {
                    if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                        break;
                    }
                    let sent = Instant::now();
                    let answer = match http.get(&url).header("host", &host).send().await {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            response.text().await.ok().map(|body| (status, body))
                        }
                        Err(_) => None,
                    };
                    let failed = answer.is_none();
                    {
                        let mut log = lock(&log);
                        // Stamped under the lock, so every list stays in time order.
                        let now = Instant::now();
                        log.latencies
                            .push((now, (now - sent).as_secs_f64() * 1000.0));
                        match answer {
                            Some((200, body)) => log.answers.entry(body).or_default().push(now),
                            Some((status, _)) => log.others.entry(status).or_default().push(now),
                            None => log.others.entry(0).or_default().push(now),
                        }
                    }
                    if failed {
                        // Envoy refused the connection: do not spin.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            });
        }
        Traffic {
            log,
            stop,
            clients: tasks,
            started,
        }
    }

    /// When `label` first answered in `[from, to)`.
    pub fn first_between(&self, label: &str, from: Instant, to: Instant) -> Option<Instant> {
        let log = lock(&self.log);
        let times = log.answers.get(label)?;
        times
            .get(times.partition_point(|&at| at < from))
            .copied()
            .filter(|&at| at < to)
    }

    /// When any backend first answered `200` at or after `since`.
    pub fn first_any_after(&self, since: Instant) -> Option<Instant> {
        let log = lock(&self.log);
        log.answers
            .values()
            .filter_map(|times| times.get(times.partition_point(|&at| at < since)).copied())
            .min()
    }

    /// When `label` last answered in `[from, to)`.
    pub fn last_between(&self, label: &str, from: Instant, to: Instant) -> Option<Instant> {
        let log = lock(&self.log);
        let times = log.answers.get(label)?;
        let end = times.partition_point(|&at| at < to);
        times[..end].last().copied().filter(|&at| at >= from)
    }

    /// How many `200` and other answers arrived in `[from, to)`.
    pub fn window(&self, from: Instant, to: Instant) -> Window {
        let log = lock(&self.log);
        let count = |times: &Vec<Instant>| {
            (times.partition_point(|&at| at < to) - times.partition_point(|&at| at < from)) as u64
        };
        let start = log.latencies.partition_point(|(at, _)| *at < from);
        let end = log.latencies.partition_point(|(at, _)| *at < to);
        let latencies: Vec<f64> = log.latencies[start..end]
            .iter()
            .map(|(_, ms)| *ms)
            .collect();
        Window {
            ok: log.answers.values().map(count).sum(),
            failed: log.others.values().map(count).sum(),
            seconds: to.saturating_duration_since(from).as_secs_f64(),
            p50_ms: percentile(&latencies, 50.0).unwrap_or(0.0),
            p99_ms: percentile(&latencies, 99.0).unwrap_or(0.0),
        }
    }

    /// Stops the clients and says what they did.
    pub async fn stop(mut self) -> Summary {
        self.stop.store(true, Ordering::Relaxed);
        while self.clients.join_next().await.is_some() {}
        let seconds = self.started.elapsed().as_secs_f64();
        let log = lock(&self.log);
        Summary {
            answers: log.answers.values().map(|times| times.len() as u64).sum(),
            others: log
                .others
                .iter()
                .map(|(status, times)| (*status, times.len() as u64))
                .collect(),
            seconds,
        }
    }
}

fn lock(log: &Mutex<Log>) -> MutexGuard<'_, Log> {
    // A client that panicked mid-record leaves a usable log behind.
    log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
