//! What `/proc` says about a process: its CPU time (and its threads'), and its memory.

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

/// The CPU time so far of each thread of the process whose name (`comm`) is `name` or starts
/// with it, in nanoseconds (`/proc/<pid>/task/<tid>/schedstat`), by thread id. Clock ticks are
/// too coarse for what one thread does in one request.
pub fn thread_cpu_ns(pid: u32, name: &str) -> anyhow::Result<Vec<(u32, u64)>> {
    let tasks = format!("/proc/{pid}/task");
    let mut threads = Vec::new();
    for entry in std::fs::read_dir(&tasks).with_context(|| format!("reading {tasks}"))? {
        let entry = entry?;
        let Some(tid) = entry.file_name().to_str().and_then(|tid| tid.parse().ok()) else {
            continue;
        };
        // A thread may end between the listing and the reads; it is then no longer one of them.
        let Some(comm) = read_unless_gone(&entry.path().join("comm"))? else {
            continue;
        };
        if !comm.trim_end().starts_with(name) {
            continue;
        }
        let path = entry.path().join("schedstat");
        let Some(schedstat) = read_unless_gone(&path)? else {
            continue;
        };
        let ns = parse_schedstat_ns(&schedstat)
            .with_context(|| format!("reading {}: {schedstat}", path.display()))?;
        threads.push((tid, ns));
    }
    threads.sort_unstable();
    Ok(threads)
}

/// "No such process" (Linux errno 3).
const ESRCH: i32 = 3;

/// The file's text, or `None` when it (its thread) no longer exists.
fn read_unless_gone(path: &std::path::Path) -> anyhow::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        // ENOENT once the task directory is gone, ESRCH while the thread is being reaped.
        Err(error)
            if error.kind() == std::io::ErrorKind::NotFound
                || error.raw_os_error() == Some(ESRCH) =>
        {
            Ok(None)
        }
        Err(error) => Err(error).with_context(|| format!("reading {}", path.display())),
    }
}

/// The first field of a `schedstat`: time spent on the CPU, in nanoseconds.
fn parse_schedstat_ns(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().next()?.parse().ok()
}

/// How many files (sockets included) the process has open.
pub fn open_files(pid: u32) -> anyhow::Result<usize> {
    let path = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&path)
        .with_context(|| format!("reading {path}"))?
        .count())
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
    fn schedstat_starts_with_nanoseconds_on_the_cpu() {
        assert_eq!(parse_schedstat_ns("578034 3177788 2\n"), Some(578_034));
        assert_eq!(parse_schedstat_ns(""), None);
    }

    #[test]
    fn this_process_can_be_read() {
        let pid = std::process::id();
        assert!(cpu_ticks(pid).is_ok());
        assert!(resident_kib(pid).expect("VmRSS") > 0);
        let threads = thread_cpu_ns(pid, "").expect("threads");
        assert!(
            threads.iter().any(|(tid, ns)| *tid == pid && *ns > 0),
            "{threads:?}"
        );
        // Standard input, output and error at least.
        assert!(open_files(pid).expect("/proc/<pid>/fd") >= 3);
    }
}
