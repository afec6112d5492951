//! Harness for zklb's end-to-end tests: real ZooKeeper, control plane, Envoy with the filter, and
//! demo backends, each a child process on 127.0.0.1 with its own ports and temporary directory,
//! stopped when dropped. When a test fails, the tail of every process's log is printed.

pub mod eventually;
pub mod process;
pub mod proxy;
pub mod registrars;
pub mod stack;
pub mod stats;

pub use eventually::eventually;
pub use stack::{Backend, ControlPlane, Envoy, Stack, ZooKeeper};
