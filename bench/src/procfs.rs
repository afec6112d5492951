//! What `/proc` says about a process: its CPU time and its memory.

use anyhow::Context as _;

/// The kernel's clock ticks per second, the unit of CPU times in `/proc/<pid>/stat`.
pub fn clock_ticks_per_second() -> anyhow::Result<u64> {
    let output = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .context("running getconf CLK_TCK")?;
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .context("reading getconf CLK_TCK")
}

/// The process's user + system CPU time so far, in clock ticks.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_cpu_ticks(&stat).with_context(|| format!("reading utime and stime in {path}: {stat}"))
}

/// The process's resident memory, in KiB.
pub fn resident_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_resident_kib(&status).with_context(|| format!("no VmRSS in {path}"))
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line. The command name (field 2) is
/// in parentheses and may itself hold spaces and parentheses, so fields are counted after the
/// last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, after_name) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // after_name starts at field 3 (state), so field n is at index n - 3.
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS:    12345 kB` of a `/proc/<pid>/status`.
fn parse_resident_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_utime_plus_stime() {
        let stat = "4242 (envoy (main) x) S 1 4242 4242 0 -1 4194560 12016 0 0 0 1234 567 0 0 20 0 9 0 3456 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(1234 + 567));
        assert_eq!(parse_cpu_ticks("4242 (envoy) S 1 2"), None);
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn resident_memory_in_kib() {
        let status =
            "Name:\tzklb-control-pl\nVmPeak:\t  900000 kB\nVmRSS:\t   12345 kB\nThreads:\t4\n";
        assert_eq!(parse_resident_kib(status), Some(12345));
        assert_eq!(parse_resident_kib("Name:\tx\n"), None);
    }

    #[test]
    fn this_process_can_be_read() {
        let pid = std::process::id();
        assert!(cpu_ticks(pid).is_ok());
        assert!(resident_kib(pid).expect("VmRSS") > 0);
    }
}
