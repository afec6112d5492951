//! What the figures were measured on: the machine, the versions, the time.

use std::path::Path;
use std::process::Command;

#[derive(Debug, Clone)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub envoy: String,
    pub zklb_rev: String,
    /// Where the control plane and the demo backends that were measured were built.
    pub binaries: String,
    pub nginx: String,
    pub wrk: String,
    pub date: String,
    /// `/proc/loadavg`'s 1-, 5- and 15-minute load averages when the run started.
    pub load_before: String,
}

impl Machine {
    pub fn read(root: &Path, envoy: &Path) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Machine {
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            cpu_model: cpu_model(&cpuinfo).unwrap_or("unknown").to_string(),
            kernel: output("uname", &["-sr"]).unwrap_or_else(|| "unknown".into()),
            envoy: output(&envoy.display().to_string(), &["--version"])
                .and_then(|text| envoy_version(&text).map(str::to_string))
                .unwrap_or_else(|| "unknown".into()),
            zklb_rev: zklb_rev(root),
            binaries: binaries(root),
            nginx: output("nginx", &["-v"]).map_or_else(
                || "unknown".into(),
                |text| text.replace("nginx version: ", ""),
            ),
            wrk: output("wrk", &["-v"])
                .and_then(|text| {
                    text.split_whitespace()
                        .take(2)
                        .collect::<Vec<_>>()
                        .join(" ")
                        .into()
                })
                .unwrap_or_else(|| "unknown".into()),
            date: output("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
                .unwrap_or_else(|| "unknown".into()),
            load_before: load_average(),
        }
    }
}

/// The 1-, 5- and 15-minute load averages, as `/proc/loadavg` gives them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".into())
}

/// The short commit of the working tree, marked `-dirty` when it has changes other than the
/// results file itself.
/// Where the measured binaries come from, relative to the workspace when inside it.
fn binaries(root: &Path) -> String {
    let directory = zklb_tests::stack::binaries_directory();
    directory
        .strip_prefix(root)
        .unwrap_or(&directory)
        .display()
        .to_string()
}

fn zklb_rev(root: &Path) -> String {
    let root = root.display().to_string();
    let Some(rev) = output("git", &["-C", &root, "rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".into();
    };
    let changed = output(
        "git",
        &[
            "-C",
            &root,
            "status",
            "--porcelain",
            "--",
            ".",
            ":!BENCHMARKS.md",
        ],
    )
    .is_some_and(|status| !status.is_empty());
    if changed {
        format!("{rev}-dirty")
    } else {
        rev
    }
}

/// A command's stdout and stderr (some tools print versions on stderr), trimmed; `None` if it
/// could not run.
fn output(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    Some(text.trim().to_string())
}

fn cpu_model(cpuinfo: &str) -> Option<&str> {
    cpuinfo
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split_once(':'))
        .map(|(_, model)| model.trim())
}

/// `1.40.0/Clean/RELEASE/BoringSSL` out of `envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL`.
fn envoy_version(text: &str) -> Option<&str> {
    let line = text.lines().find(|line| line.contains("version:"))?;
    let (_, version) = line.split_once("version:")?;
    let version = version.trim();
    Some(version.split_once('/').map_or(version, |(_, rest)| rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_cpu_model() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.80GHz\n";
        assert_eq!(cpu_model(cpuinfo), Some("Intel(R) Xeon(R) CPU @ 2.80GHz"));
        assert_eq!(cpu_model("processor : 0\n"), None);
    }

    #[test]
    fn reads_envoys_version_line() {
        let text = "\n.venv/bin/envoy  version: 9e5580933739775e8bce696a57a2e1bc99368f23/1.40.0/Clean/RELEASE/BoringSSL\n";
        assert_eq!(envoy_version(text), Some("1.40.0/Clean/RELEASE/BoringSSL"));
    }
}
