//! Envoy's instructions per request for every data-plane variant, counted by valgrind's
//! callgrind. A count hardly depends on whatever else the machine does (under 1 % between runs),
//! so the filter's share shows to within a few thousand instructions, where CPU time scatters by
//! microseconds from one round to the next.
//!
//! Each variant's Envoy runs under callgrind with counting off. It is turned on for the counted
//! requests only, which follow a warm-up one after the other on one connection, then the counts
//! are dumped and read back. What Envoy does on its own meanwhile (timers, the filter's ticks and
//! list polls) counts too, and more so in a slower run: what moves the count between runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _};
use zklb_tests::eventually;
use zklb_tests::stack::envoy_executable;

use crate::data_plane::{self, url, Variant};

#[derive(Debug, Clone)]
pub struct Settings {
    /// Requests before counting starts: connections open, V8 compiles the filter's hot code.
    pub warm_up: usize,
    /// Requests counted.
    pub requests: usize,
}

/// One variant's count.
#[derive(Debug, Clone, PartialEq)]
pub struct Count {
    pub variant: Variant,
    pub per_request: f64,
}

pub async fn measure(
    dir: &Path,
    data_plane: &data_plane::Settings,
    settings: &Settings,
) -> anyhow::Result<Vec<Count>> {
    let version = Command::new("valgrind")
        .arg("--version")
        .output()
        .context("running valgrind (bench/run installs it)")?;
    if !version.status.success() {
        bail!("valgrind --version failed");
    }
    let dumps = dir.join("callgrind");
    std::fs::create_dir_all(&dumps)?;
    let envoy = envoy_executable().map_err(|error| anyhow::anyhow!("finding Envoy: {error}"))?;
    let launcher: Vec<String> = vec![
        "valgrind".into(),
        "--tool=callgrind".into(),
        // V8 writes the machine code it runs.
        "--smc-check=all-non-file".into(),
        "--instr-atstart=no".into(),
        format!("--callgrind-out-file={}/callgrind.out.%p", dumps.display()),
        envoy.display().to_string(),
    ];
    println!("instructions: starting every variant's Envoy under callgrind");
    let envoys = data_plane::start(dir, data_plane, &launcher).await?;
    let mut counts = Vec::new();
    for variant in Variant::ALL {
        let envoy = envoys.of(variant);
        let headers = envoys.headers(variant);
        let client = reqwest::Client::builder()
            .http1_only()
            .pool_max_idle_per_host(1)
            .timeout(Duration::from_secs(30))
            .build()?;
        let url = url(envoy);
        send(&client, &url, &headers, settings.warm_up).await?;
        let pid = envoy.pid();
        callgrind_control(pid, "--instr=on")?;
        send(&client, &url, &headers, settings.requests).await?;
        callgrind_control(pid, "--instr=off")?;
        let before = dumped(&dumps, pid)?;
        callgrind_control(pid, "--dump")?;
        let total = read_new_dump(&dumps, pid, before.len()).await?;
        let count = Count {
            variant,
            per_request: total as f64 / settings.requests as f64,
        };
        println!(
            "instructions: {:<26} {:>9.0} per request",
            variant.name(),
            count.per_request
        );
        counts.push(count);
    }
    Ok(counts)
}

/// Sends `requests` requests with `headers` one after the other; each must succeed.
async fn send(
    client: &reqwest::Client,
    url: &str,
    headers: &[String],
    requests: usize,
) -> anyhow::Result<()> {
    for _ in 0..requests {
        let mut request = client.get(url);
        for (name, value) in headers.iter().filter_map(|header| header.split_once(": ")) {
            request = request.header(name, value);
        }
        let response = request.send().await?;
        let status = response.status();
        response.bytes().await?;
        if !status.is_success() {
            bail!("{url} answered {status}");
        }
    }
    Ok(())
}

fn callgrind_control(pid: u32, command: &str) -> anyhow::Result<()> {
    let output = Command::new("callgrind_control")
        .arg(command)
        .arg(pid.to_string())
        .output()
        .context("running callgrind_control")?;
    // It says when it finds no such process, but exits with 0 all the same.
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() || said.contains("Error") {
        bail!("callgrind_control {command} {pid}: {said}");
    }
    Ok(())
}

/// The dumps of process `pid` so far (`callgrind.out.<pid>.<n>`).
fn dumped(dumps: &Path, pid: u32) -> anyhow::Result<Vec<PathBuf>> {
    let prefix = format!("callgrind.out.{pid}.");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dumps)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or("");
        if name.starts_with(&prefix) {
            files.push(path);
        }
    }
    Ok(files)
}

/// The instruction total of the dump that follows the `before` dumps of `pid`, once written.
async fn read_new_dump(dumps: &Path, pid: u32, before: usize) -> anyhow::Result<u64> {
    let what = format!("callgrind dump {} of Envoy {pid}", before + 1);
    let total = eventually(Duration::from_secs(60), &what, || async {
        let files = dumped(dumps, pid).map_err(|error| error.to_string())?;
        let newest = files
            .iter()
            .filter_map(|path| {
                let part = path.extension()?.to_str()?.parse::<usize>().ok()?;
                Some((part, path))
            })
            .max_by_key(|(part, _)| *part)
            .filter(|(part, _)| *part > before)
            .ok_or("not dumped yet")?;
        let text = std::fs::read_to_string(newest.1).map_err(|error| error.to_string())?;
        dump_total(&text).ok_or_else(|| "no totals yet".to_string())
    })
    .await;
    Ok(total)
}

/// The instruction total of a callgrind dump: its `totals:` line (its `summary:` line counts only
/// what was collected before the dump's first part, 0 when counting started later).
pub fn dump_total(text: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        line.strip_prefix("totals:")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dumps_total_is_its_totals_line() {
        let dump = "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nfn=(1) main\n\
                    3 120\ntotals: 249337967\n";
        assert_eq!(dump_total(dump), Some(249_337_967));
        // What callgrind writes when counting was turned on after the start.
        assert_eq!(
            dump_total("events: Ir\nsummary: 0\nfn=(1) main\n3 5\ntotals: 67933406\n"),
            Some(67_933_406)
        );
        assert_eq!(dump_total("events: Ir\nsummary: 42\n"), None);
    }
}
