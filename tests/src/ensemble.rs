//! A three-server ZooKeeper ensemble on 127.0.0.1, each server with its own directory and
//! ports, and what its servers say about themselves (four-letter words): who leads, and which
//! session a client's connection carries.

use std::net::SocketAddr;
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::stack::free_port;
use crate::ZooKeeper;

const SERVERS: u32 = 3;

pub struct Ensemble {
    /// Every server's client address, as clients are given them.
    pub connect: String,
    members: Vec<Member>,
    /// Dropped after the servers that write into it.
    _dir: TempDir,
}

struct Member {
    id: u32,
    address: SocketAddr,
    /// `None` once handed out by [`Ensemble::take`].
    server: Option<ZooKeeper>,
}

impl Ensemble {
    /// Starts the three servers together (each waits for a quorum) and returns once one leads.
    pub async fn start() -> Ensemble {
        let dir = tempfile::Builder::new()
            .prefix("zklb-ensemble")
            .tempdir()
            .expect("creating a temporary directory");
        let peers: String = (1..=SERVERS)
            .map(|id| format!("server.{id}=127.0.0.1:{}:{}\n", free_port(), free_port()))
            .collect();
        // Quorum timing in ticks of 500 ms; the four-letter words the tests ask.
        let settings =
            format!("initLimit=10\nsyncLimit=4\n4lw.commands.whitelist=srvr,cons\n{peers}");
        let start = |id: u32| {
            let member_dir = dir.path().join(format!("server-{id}"));
            let settings = settings.clone();
            async move {
                let data = member_dir.join("zookeeper-data");
                std::fs::create_dir_all(&data).expect("creating a data directory");
                std::fs::write(data.join("myid"), id.to_string()).expect("writing myid");
                (id, ZooKeeper::start_with(&member_dir, &settings).await)
            }
        };
        let (first, second, third) = tokio::join!(start(1), start(2), start(3));
        let addresses: Vec<SocketAddr> = [&first, &second, &third]
            .iter()
            .map(|(_, server)| server.connect.parse().expect("a server's address"))
            .collect();
        let connect = addresses
            .iter()
            .map(SocketAddr::to_string)
            .collect::<Vec<_>>()
            .join(",");
        // Every server's `connect` names the whole ensemble, so that clients started from any
        // of them (a control plane, agents, a test's own) can move to the other servers.
        let members: Vec<Member> = [first, second, third]
            .into_iter()
            .zip(addresses)
            .map(|((id, mut server), address)| {
                server.connect = connect.clone();
                Member {
                    id,
                    address,
                    server: Some(server),
                }
            })
            .collect();
        let ensemble = Ensemble {
            connect,
            members,
            _dir: dir,
        };
        assert!(ensemble.leader().await.is_some(), "no server leads");
        ensemble
    }

    /// The id of the server that says it leads, if one does.
    pub async fn leader(&self) -> Option<u32> {
        for member in &self.members {
            if self.mode(member.id).await.as_deref() == Ok("leader") {
                return Some(member.id);
            }
        }
        None
    }

    /// `leader`, `follower` or `standalone`, as server `id` reports it.
    pub async fn mode(&self, id: u32) -> Result<String, String> {
        let report = four_letter_word(self.member(id).address, "srvr").await?;
        report
            .lines()
            .find_map(|line| line.strip_prefix("Mode: "))
            .map(str::to_string)
            .ok_or_else(|| format!("no mode in {report:?}"))
    }

    /// A server not handed out yet, to start clients from: its `connect` names the ensemble.
    pub fn any_server(&self) -> &ZooKeeper {
        self.members
            .iter()
            .find_map(|member| member.server.as_ref())
            .expect("a server not handed out")
    }

    /// Hands out server `id`, to be crashed by whoever holds it.
    pub fn take(&mut self, id: u32) -> ZooKeeper {
        self.members
            .iter_mut()
            .find(|member| member.id == id)
            .and_then(|member| member.server.take())
            .unwrap_or_else(|| panic!("server {id} is unknown or was handed out before"))
    }

    /// The id of the server that `connections` (a process's, `(local, remote)`) go to, with
    /// the local address of that connection.
    pub fn server_of(&self, connections: &[(SocketAddr, SocketAddr)]) -> Option<(u32, SocketAddr)> {
        connections.iter().find_map(|(local, remote)| {
            let member = self
                .members
                .iter()
                .find(|member| member.address == *remote)?;
            Some((member.id, *local))
        })
    }

    /// The session id (`0x...`) of the connection that `client` (its local address) holds to
    /// server `id`, as the server lists its connections.
    pub async fn session_of(&self, id: u32, client: SocketAddr) -> Result<String, String> {
        let connections = four_letter_word(self.member(id).address, "cons").await?;
        let line = connections
            .lines()
            .find(|line| line.trim_start().starts_with(&format!("/{client}[")))
            .ok_or_else(|| format!("server {id} lists no connection from {client}"))?;
        line.split([',', '('])
            .find_map(|field| field.strip_prefix("sid="))
            .map(str::to_string)
            .ok_or_else(|| format!("no session id in {line:?}"))
    }

    fn member(&self, id: u32) -> &Member {
        self.members
            .iter()
            .find(|member| member.id == id)
            .unwrap_or_else(|| panic!("no server {id}"))
    }
}

/// Sends a four-letter word to a server and returns its whole answer.
async fn four_letter_word(server: SocketAddr, word: &str) -> Result<String, String> {
    let asking = async {
        let mut stream = TcpStream::connect(server).await?;
        stream.write_all(word.as_bytes()).await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    match tokio::time::timeout(Duration::from_secs(5), asking).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(error)) => Err(format!("{word} to {server}: {error}")),
        Err(_) => Err(format!("{word} to {server}: no answer within 5 s")),
    }
}
