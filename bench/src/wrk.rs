//! Load from `wrk`: one run, and the figures read from its `--latency` report.

use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::process::Command;

/// What one wrk run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct WrkReport {
    pub requests: u64,
    pub seconds: f64,
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Answers with a status other than 2xx or 3xx.
    pub non_2xx: u64,
    /// Connect, read, write errors and timeouts.
    pub socket_errors: u64,
}

/// Runs `wrk -t1 -c<connections> -d<seconds>s --latency -H 'Host: <host>' <url>` to completion.
pub async fn run(
    url: &str,
    host: &str,
    connections: u32,
    duration: Duration,
) -> anyhow::Result<WrkReport> {
    run_with_headers(url, &[format!("Host: {host}")], connections, duration).await
}

/// [`run`] sending `headers` (`Name: value` each) with every request.
pub async fn run_with_headers(
    url: &str,
    headers: &[String],
    connections: u32,
    duration: Duration,
) -> anyhow::Result<WrkReport> {
    let seconds = duration.as_secs().max(1);
    let run = Command::new("wrk")
        .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s")])
        .args(["--latency", "--timeout", "5s"])
        .args(headers.iter().flat_map(|header| ["-H", header.as_str()]))
        .arg(url)
        .kill_on_drop(true)
        .output();
    // wrk stops itself after its duration; the margin only guards against a hang.
    let output = tokio::time::timeout(Duration::from_secs(seconds + 30), run)
        .await
        .context("wrk did not finish")?
        .context("running wrk (bench/run installs it)")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed ({}): {stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse(&stdout).with_context(|| format!("reading wrk's report:\n{stdout}"))
}

/// Reads a wrk `--latency` report.
pub fn parse(report: &str) -> anyhow::Result<WrkReport> {
    let mut requests = None;
    let mut seconds = None;
    let mut requests_per_second = None;
    let mut p50_ms = None;
    let mut p99_ms = None;
    let mut non_2xx = 0;
    let mut socket_errors = 0;
    for line in report.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            // "175490 requests in 10.00s, 24.76MB read"
            [count, "requests", "in", took, ..] => {
                requests = Some(
                    count
                        .parse::<u64>()
                        .with_context(|| format!("request count in {line:?}"))?,
                );
                seconds = Some(duration_ms(took.trim_end_matches(','))? / 1000.0);
            }
            ["Requests/sec:", rate] => {
                requests_per_second = Some(
                    rate.parse::<f64>()
                        .with_context(|| format!("rate in {line:?}"))?,
                )
            }
            ["50%", latency] => p50_ms = Some(duration_ms(latency)?),
            ["99%", latency] => p99_ms = Some(duration_ms(latency)?),
            ["Non-2xx", "or", "3xx", "responses:", count] => {
                non_2xx = count
                    .parse()
                    .with_context(|| format!("count in {line:?}"))?
            }
            // "Socket errors: connect 0, read 0, write 0, timeout 0"
            ["Socket", "errors:", rest @ ..] => {
                for count in rest.iter().skip(1).step_by(2) {
                    socket_errors += count
                        .trim_end_matches(',')
                        .parse::<u64>()
                        .with_context(|| format!("count in {line:?}"))?;
                }
            }
            _ => {}
        }
    }
    Ok(WrkReport {
        requests: requests.context("no \"N requests in\" line")?,
        seconds: seconds.context("no run duration")?,
        requests_per_second: requests_per_second.context("no \"Requests/sec:\" line")?,
        p50_ms: p50_ms.context("no 50% latency (was --latency given?)")?,
        p99_ms: p99_ms.context("no 99% latency (was --latency given?)")?,
        non_2xx,
        socket_errors,
    })
}

/// A wrk duration (`812.00us`, `2.78ms`, `1.02s`, `1.50m`) in milliseconds.
fn duration_ms(text: &str) -> anyhow::Result<f64> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in duration {text:?}"))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .with_context(|| format!("duration {text:?}"))?;
    let scale = match unit {
        "us" => return Ok(number / 1000.0),
        "ms" => 1.0,
        "s" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        _ => bail!("unknown unit in duration {text:?}"),
    };
    Ok(number * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "\
Running 10s test @ http://127.0.0.1:10000/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.85ms  379.36us   9.97ms   86.42%
    Req/Sec    17.63k     1.05k   19.35k    73.00%
  Latency Distribution
     50%    2.78ms
     75%    2.95ms
     90%    3.22ms
     99%    4.18ms
  175490 requests in 10.00s, 24.76MB read
  Socket errors: connect 1, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 12
Requests/sec:  17547.24
Transfer/sec:      2.48MB
";

    #[test]
    fn reads_a_latency_report() {
        let report = parse(REPORT).expect("a valid report");
        assert_eq!(
            report,
            WrkReport {
                requests: 175_490,
                seconds: 10.0,
                requests_per_second: 17547.24,
                p50_ms: 2.78,
                p99_ms: 4.18,
                non_2xx: 12,
                socket_errors: 6,
            }
        );
    }

    #[test]
    fn a_report_without_latency_distribution_is_refused() {
        let without: String = REPORT
            .lines()
            .filter(|line| !line.contains('%') || line.contains("Stdev"))
            .map(|line| format!("{line}\n"))
            .collect();
        let error = parse(&without).expect_err("no percentiles");
        assert!(error.to_string().contains("50%"), "{error}");
    }

    #[test]
    fn durations_in_every_unit() {
        assert_eq!(duration_ms("812.00us").ok(), Some(0.812));
        assert_eq!(duration_ms("2.5ms").ok(), Some(2.5));
        assert_eq!(duration_ms("1.50s").ok(), Some(1500.0));
        assert_eq!(duration_ms("2.00m").ok(), Some(120_000.0));
        assert!(duration_ms("3.0").is_err());
        assert!(duration_ms("3.0xs").is_err());
    }
}
