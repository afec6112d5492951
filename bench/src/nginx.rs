//! Fast backends: one nginx (Debian's) answering a fixed small body on each of several
//! 127.0.0.1 ports, so the backends cost little and the same in every variant.

use std::net::TcpStream;
use std::ops::Range;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use zklb_tests::eventually;
use zklb_tests::process::Child;

/// One nginx process serving `ports`; its `i`-th port answers `200` with the body
/// [`Nginx::label`]`(first_label + i)`.
pub struct Nginx {
    pub ports: Vec<u16>,
    process: Child,
}

impl Nginx {
    /// Starts nginx with one worker on a free port for each of `labels`, its files in
    /// `dir/<name>`.
    pub async fn start(dir: &Path, name: &str, labels: Range<usize>) -> Nginx {
        let home = dir.join(name);
        std::fs::create_dir_all(&home).expect("creating nginx's directory");
        let ports = free_ports(labels.len());
        let config = home.join("nginx.conf");
        std::fs::write(&config, config_text(&home, &ports, labels.start))
            .expect("writing nginx.conf");
        let mut command = Command::new("nginx");
        command
            .arg("-p")
            .arg(&home)
            .arg("-e")
            .arg(home.join("error.log"))
            .arg("-c")
            .arg(&config);
        let process = Child::spawn(name, command, dir);
        for &port in &ports {
            eventually(
                Duration::from_secs(20),
                &format!("nginx listens on {port}"),
                || async move {
                    TcpStream::connect(("127.0.0.1", port))
                        .map(drop)
                        .map_err(|error| error.to_string())
                },
            )
            .await;
        }
        Nginx { ports, process }
    }

    /// Kills nginx at once (SIGKILL), as a crash would: its ports refuse connections.
    pub fn crash(&mut self) {
        self.process.kill();
    }

    /// The body that the backend with this label index answers with.
    pub fn label(index: usize) -> String {
        format!("b{index}")
    }
}

impl Drop for Nginx {
    /// Stops the master with SIGTERM so that it reaps its worker, rather than killing both at once.
    fn drop(&mut self) {
        self.process.terminate(Duration::from_secs(5));
    }
}

/// Where backends listen: above the instances that are registered but never listened on (ports
/// 20000 and up), below the kernel's ephemeral ports (32768 and up), which outgoing connections
/// take at any moment, so that a port found free here stays free until nginx binds it.
const PORTS: std::ops::RangeInclusive<u16> = 24_000..=32_767;

/// `count` ports of [`PORTS`] that are free now.
fn free_ports(count: usize) -> Vec<u16> {
    let ports: Vec<u16> = PORTS
        .filter(|&port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
        .take(count)
        .collect();
    assert_eq!(ports.len(), count, "not enough free ports in {PORTS:?}");
    ports
}

fn config_text(home: &Path, ports: &[u16], first_label: usize) -> String {
    let home = home.display();
    let servers: String = ports
        .iter()
        .enumerate()
        .map(|(index, port)| {
            format!(
                "    server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"{}\"; }} }}\n",
                Nginx::label(first_label + index)
            )
        })
        .collect();
    // Every listening socket takes a connection slot too, and each port may hold a connection
    // from every Envoy worker.
    let connections = 4096 + 2 * ports.len();
    format!(
        "daemon off;
worker_processes 1;
worker_rlimit_nofile {connections};
pid {home}/nginx.pid;
error_log {home}/error.log warn;
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    default_type text/plain;
    client_body_temp_path {home}/client_body;
    proxy_temp_path {home}/proxy;
    # Envoy keeps its upstream connections: never make it reconnect during a round.
    keepalive_requests 10000000;
    keepalive_timeout 600s;
{servers}}}
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_name_their_port_index() {
        assert_eq!(Nginx::label(3), "b3");
        assert_eq!(Nginx::label(12), "b12");
    }

    #[test]
    fn every_port_listens_on_loopback_only() {
        let text = config_text(Path::new("/tmp/x"), &[1001, 1002], 5);
        assert_eq!(text.matches("listen 127.0.0.1:").count(), 2);
        assert_eq!(text.matches("listen").count(), 2);
        assert!(text.contains("listen 127.0.0.1:1001; location / { return 200 \"b5\"; }"));
        assert!(text.contains("listen 127.0.0.1:1002; location / { return 200 \"b6\"; }"));
    }
}
