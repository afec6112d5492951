//! A TCP relay on 127.0.0.1 that a test can cut, to put a network partition between a process
//! and the server it talks to (a control plane and ZooKeeper, say) without stopping either.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct Relay {
    pub address: SocketAddr,
    cut: Arc<watch::Sender<bool>>,
    accepting: JoinHandle<()>,
}

impl Relay {
    /// Relays every connection made to [`Relay::address`] to `target`.
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the relay");
        let address = listener.local_addr().expect("relay address");
        let cut = Arc::new(watch::Sender::new(false));
        let accepting = tokio::spawn({
            let cut = Arc::clone(&cut);
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    if *cut.borrow() {
                        // Cut off: the connection is accepted and closed at once.
                        continue;
                    }
                    tokio::spawn(relay(client, target, cut.subscribe()));
                }
            }
        });
        Relay {
            address,
            cut,
            accepting,
        }
    }

    /// Drops every relayed connection and refuses new ones, as a partition would.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Relays again.
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accepting.abort();
    }
}

async fn relay(mut client: TcpStream, target: SocketAddr, mut cut: watch::Receiver<bool>) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = cut.wait_for(|cut| *cut) => {}
    }
}
