//! Network namespaces that a test makes, so that a server can sit behind links the test cuts:
//! a partition drops packets silently, as a failed switch or firewall does, where a stopped
//! process or a closed relay refuses them at once.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};

/// Namespaces and links made by this test process so far, for unique names and subnets.
static NAMESPACES: AtomicU8 = AtomicU8::new(0);
static LINKS: AtomicU8 = AtomicU8::new(0);

/// A network namespace, deleted with its links when dropped.
pub struct Namespace {
    pub name: String,
    /// The host ends of its links: deleting one deletes both ends.
    host_interfaces: Vec<String>,
}

/// A veth pair between the host and a namespace, each end with an address of one /30.
pub struct Link {
    pub host_address: Ipv4Addr,
    pub namespace_address: Ipv4Addr,
}

impl Namespace {
    /// A new namespace with its loopback up (a test runs as root).
    pub fn create() -> Namespace {
        let count = NAMESPACES.fetch_add(1, Ordering::Relaxed);
        let name = format!("zklb-faults-{}-{count}", std::process::id());
        ip(&["netns", "add", &name]);
        let namespace = Namespace {
            name,
            host_interfaces: Vec::new(),
        };
        namespace.exec(&["ip", "link", "set", "lo", "up"]);
        namespace
    }

    /// A new link into the namespace. Its addresses come from the test process's id and a
    /// count, so that two test processes running at once do not share a subnet.
    pub fn link(&mut self) -> Link {
        let count = LINKS.fetch_add(1, Ordering::Relaxed);
        let process = std::process::id();
        let octet = u8::try_from(100 + process % 100).expect("below 200");
        let host_address = Ipv4Addr::new(10, octet, count, 1);
        let namespace_address = Ipv4Addr::new(10, octet, count, 2);
        // Interface names are at most 15 characters.
        let host_interface = format!("zf{}h{count}", process % 100_000);
        let namespace_interface = format!("zf{}n{count}", process % 100_000);
        ip(&[
            "link",
            "add",
            &host_interface,
            "type",
            "veth",
            "peer",
            "name",
            &namespace_interface,
        ]);
        self.host_interfaces.push(host_interface.clone());
        ip(&["link", "set", &namespace_interface, "netns", &self.name]);
        ip(&[
            "addr",
            "add",
            &format!("{host_address}/30"),
            "dev",
            &host_interface,
        ]);
        ip(&["link", "set", &host_interface, "up"]);
        let address = format!("{namespace_address}/30");
        self.exec(&["ip", "addr", "add", &address, "dev", &namespace_interface]);
        self.exec(&["ip", "link", "set", &namespace_interface, "up"]);
        Link {
            host_address,
            namespace_address,
        }
    }

    /// The command prefix that runs a program inside the namespace.
    pub fn launcher(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.name]
            .map(str::to_string)
            .to_vec()
    }

    /// Drops every packet between the host end of `link` and the namespace, both ways, with
    /// the namespace's own firewall: nothing is refused or reset, connections just go silent.
    pub fn cut(&self, link: &Link) {
        self.firewall("-I", link);
    }

    pub fn heal(&self, link: &Link) {
        self.firewall("-D", link);
    }

    fn firewall(&self, action: &str, link: &Link) {
        let peer = link.host_address.to_string();
        self.exec(&["iptables", action, "INPUT", "-s", &peer, "-j", "DROP"]);
        self.exec(&["iptables", action, "OUTPUT", "-d", &peer, "-j", "DROP"]);
    }

    fn exec(&self, command: &[&str]) {
        let mut arguments = vec!["netns", "exec", &self.name];
        arguments.extend_from_slice(command);
        ip(&arguments);
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        for interface in &self.host_interfaces {
            let _ = quiet_ip(&["link", "del", interface]);
        }
        let _ = quiet_ip(&["netns", "del", &self.name]);
    }
}

fn ip(arguments: &[&str]) {
    let output = Command::new("ip")
        .args(arguments)
        .output()
        .unwrap_or_else(|error| panic!("running ip {arguments:?}: {error}"));
    assert!(
        output.status.success(),
        "ip {arguments:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `ip` for clean-up, which goes on whatever fails.
fn quiet_ip(arguments: &[&str]) -> std::io::Result<std::process::ExitStatus> {
    Command::new("ip")
        .args(arguments)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
}
