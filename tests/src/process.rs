//! Child processes that log to a file and never outlive the test.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// TCP socket states as `/proc/net/tcp` writes them.
const ESTABLISHED: &str = "01";
const LISTEN: &str = "0A";

pub struct Child {
    name: String,
    child: std::process::Child,
    log: PathBuf,
    /// Where this process's own lines start in the log.
    log_start: usize,
}

impl Child {
    /// Starts `command` with stdout and stderr appended to `<log_dir>/<name>.log` (a restarted
    /// process adds to its predecessor's log).
    pub fn spawn(name: &str, mut command: Command, log_dir: &Path) -> Child {
        let log = log_dir.join(format!("{name}.log"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|error| panic!("opening {}: {error}", log.display()));
        let log_start = file
            .metadata()
            .map_or(0, |metadata| metadata.len() as usize);
        let stderr = file.try_clone().expect("duplicating a log file handle");
        // A group of its own, so that killing it also kills whatever it started (scripts).
        let child = command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|error| panic!("starting {name} ({command:?}): {error}"));
        Child {
            name: name.to_string(),
            child,
            log,
            log_start,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The addresses that this process, or anything it started, listens on (TCP).
    pub fn listening(&self) -> Vec<SocketAddr> {
        self.sockets(LISTEN)
            .into_iter()
            .map(|(local, _)| local)
            .collect()
    }

    /// The peers of this process's established TCP connections (or those of anything it
    /// started), with the local address of each: which server a client is talking to.
    pub fn connections(&self) -> Vec<(SocketAddr, SocketAddr)> {
        self.sockets(ESTABLISHED)
    }

    /// The local and remote addresses of the TCP sockets in `state` (as `/proc/net/tcp` writes
    /// it) that this process's group holds.
    fn sockets(&self, state: &str) -> Vec<(SocketAddr, SocketAddr)> {
        let group = self.child.id().to_string();
        let mut sockets = HashSet::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // pid (command) state ppid pgrp ...: the command may hold spaces and parentheses.
            let in_group = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.split_whitespace().nth(2))
                == Some(group.as_str());
            if !in_group {
                continue;
            }
            for fd in std::fs::read_dir(entry.path().join("fd"))
                .into_iter()
                .flatten()
                .flatten()
            {
                let target = std::fs::read_link(fd.path()).unwrap_or_default();
                if let Some(inode) = target
                    .to_str()
                    .and_then(|target| target.strip_prefix("socket:["))
                    .and_then(|rest| rest.strip_suffix(']'))
                {
                    sockets.insert(inode.to_string());
                }
            }
        }
        ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .flat_map(|table| {
                std::fs::read_to_string(table)
                    .unwrap_or_default()
                    .lines()
                    .skip(1)
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                // local_address, rem_address, st, ..., inode.
                let (local, remote) = (fields.get(1)?, fields.get(2)?);
                let (socket_state, inode) = (fields.get(3)?, fields.get(9)?);
                if *socket_state != state || !sockets.contains(*inode) {
                    return None;
                }
                Some((parse_proc_address(local)?, parse_proc_address(remote)?))
            })
            .collect()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What this process wrote, without the lines of a predecessor that logged to the same file.
    pub fn own_log(&self) -> String {
        self.log()
            .get(self.log_start..)
            .unwrap_or_default()
            .to_string()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `None` while it runs; once it has exited, its exit code (`None` if a signal ended it).
    pub fn exit_code(&mut self) -> Option<Option<i32>> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.code()),
            _ => None,
        }
    }

    /// Sends a signal (`"STOP"`, `"CONT"`, ...) to the process alone.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .is_ok_and(|status| status.success());
        assert!(sent, "sending SIG{signal} to {}", self.name);
    }

    /// Stops the process (SIGSTOP) and waits until the kernel has stopped every thread of it,
    /// so that nothing it was about to do still happens after this returns.
    pub fn freeze(&self) {
        self.signal("STOP");
        let stat = format!("/proc/{}/stat", self.child.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let state = std::fs::read_to_string(&stat).unwrap_or_default();
            // The state follows the command name, which is in parentheses.
            let stopped = state
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('T'));
            if stopped {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("{} did not stop within 10 s of SIGSTOP", self.name);
    }

    /// Asks the process to stop (SIGTERM), and kills it if it has not within `grace`.
    pub fn terminate(&mut self, grace: Duration) {
        if !self.is_running() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !self.is_running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    /// Kills the process and everything it started at once (SIGKILL): no clean-up runs.
    pub fn kill(&mut self) {
        // The group outlives its leader while anything it started still runs.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "----- last lines of {} ({}) -----",
                self.name,
                self.log.display()
            );
            for line in tail {
                eprintln!("{line}");
            }
        }
    }
}

/// An address of `/proc/net/tcp{,6}`: hex, each 32-bit word of the address printed as a number in
/// host (here little-endian) byte order.
fn parse_proc_address(text: &str) -> Option<SocketAddr> {
    let (address, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..address.len() / 8)
        .map(|i| u32::from_str_radix(&address[8 * i..8 * i + 8], 16))
        .collect::<Result<_, _>>()
        .ok()?;
    let ip = match words.as_slice() {
        [v4] => IpAddr::V4(Ipv4Addr::from(v4.to_le_bytes())),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (chunk, word) in bytes.chunks_mut(4).zip([a, b, c, d]) {
                chunk.copy_from_slice(&word.to_le_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_addresses_are_read_in_host_order() {
        assert_eq!(
            parse_proc_address("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().expect("address"))
        );
        assert_eq!(
            parse_proc_address("00000000000000000000000001000000:0050"),
            Some("[::1]:80".parse().expect("address"))
        );
        assert_eq!(
            parse_proc_address("00000000:0016"),
            Some("0.0.0.0:22".parse().expect("address"))
        );
    }
}
