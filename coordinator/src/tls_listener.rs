//! An axum [`Listener`] that hands out TLS streams, for the HTTP listener.
//!
//! TCP connections are accepted by one task and each handshake runs in its
//! own, so a slow or silent client never holds up the others; axum only
//! sees connections whose handshake is done.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::Listener;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for axum to take them.
const READY_QUEUE: usize = 64;

/// The listener axum serves; fed by the task [`start`] returns.
pub(crate) struct TlsListener {
    local_addr: SocketAddr,
    handshaken: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

/// Starts accepting on `listener`. The returned task ends when `stop` turns
/// true or the [`TlsListener`] is dropped; it takes unfinished handshakes
/// with it.
pub(crate) fn start(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    stop: watch::Receiver<bool>,
) -> io::Result<(TlsListener, JoinHandle<()>)> {
    let local_addr = listener.local_addr()?;
    let (ready, handshaken) = mpsc::channel(READY_QUEUE);
    let task = tokio::spawn(accept_loop(
        listener,
        TlsAcceptor::from(config),
        ready,
        stop,
    ));
    Ok((
        TlsListener {
            local_addr,
            handshaken,
        },
        task,
    ))
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
    mut stop: watch::Receiver<bool>,
) {
    let mut handshakes = JoinSet::new();
    let stopped = async move {
        let _ = stop.wait_for(|stopped| *stopped).await;
    };
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            () = &mut stopped => break,
            () = ready.closed() => break,
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let acceptor = acceptor.clone();
                    let ready = ready.clone();
                    handshakes.spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => {
                                let _ = ready.send((tls, peer)).await;
                            }
                            Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    });
                }
                // Out of file descriptors and the like: back off, as axum's
                // own TCP listener does, instead of spinning.
                Err(error) => {
                    tracing::warn!(%error, "HTTP listener cannot accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.handshaken.recv().await {
            Some(connection) => connection,
            // The accept loop stopped: shutdown is under way, and axum's
            // graceful shutdown ends the serve loop.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}
