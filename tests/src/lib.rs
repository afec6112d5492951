//! Harness for zklb's end-to-end tests: real ZooKeeper, control plane, Envoy with the filter, and
//! demo backends registered by zklb-agent, each a child process on 127.0.0.1 with its own ports
//! and temporary directory, stopped when dropped. When a test fails, the tail of every process's log is printed.

pub mod ensemble;
pub mod eventually;
pub mod load;
pub mod netns;
pub mod pki;
pub mod process;
pub mod procfs;
pub mod proxy;
pub mod registrars;
pub mod stack;
pub mod stats;

pub use eventually::eventually;
pub use stack::{Agent, Backend, ControlPlane, Envoy, Stack, ZooKeeper};
