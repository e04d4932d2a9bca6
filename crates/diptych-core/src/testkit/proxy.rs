//! A TCP proxy a test can cut and restore, to take a server (a broker, a
//! database) away from a service without stopping the server, which other
//! tests share.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Forwards connections on a local port to a target, until cut.
pub struct TcpProxy {
    addr: SocketAddr,
    open: Arc<watch::Sender<bool>>,
    accepting: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a free local port and forwards to `target` (`host:port`).
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free port for the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let open = Arc::new(watch::channel(true).0);
        let target = target.to_owned();
        let state = open.clone();
        let accepting = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                if !*state.borrow() {
                    // Cut: the connection is refused as soon as it is made.
                    continue;
                }
                let mut cut = state.subscribe();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.wait_for(|open| !open) => {}
                    }
                });
            }
        });
        Self {
            addr,
            open,
            accepting,
        }
    }

    /// The proxy's address, to connect to instead of the target's.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accepting.abort();
        self.cut();
    }
}

/// A child process killed with SIGKILL and reaped when dropped, so a failing
/// test leaves nothing running.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
