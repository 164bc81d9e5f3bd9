//! The server's TLS: its certificate, key and client CA checked and built into one
//! rustls configuration, and the handshake done here rather than by tonic, so that the
//! configuration can be swapped while serving (`--tls-cert`, `--tls-key` and
//! `--tls-client-ca` reloaded live, see `reload.rs`). Each connection is handshaken
//! with the configuration in force when it was accepted; connections already up keep
//! theirs.

use std::{
    io,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use arc_swap::ArcSwap;
use futures_util::Stream;
use rustls::{
    RootCertStore, ServerConfig, crypto::CryptoProvider, server::WebPkiClientVerifier,
    sign::CertifiedKey,
};
use rustls_pki_types::{PrivateKeyDer, pem::PemObject};
use tokio::task::JoinSet;
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tracing::debug;

use crate::{
    error::SetupError,
    files::{read, read_certificates},
};

/// A handshake not finished within this long is dropped: a peer that connects and
/// sends nothing holds no task for long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The one application protocol served.
const ALPN_H2: &[u8] = b"h2";

/// The files of the server's TLS, from the flags.
#[derive(Clone, Debug)]
pub(crate) struct Files<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    pub client_ca: Option<&'a Path>,
}

/// The configuration new handshakes use; swapped whole on a reload.
pub(crate) type Current = Arc<ArcSwap<ServerConfig>>;

/// Reads and checks the files and builds the configuration: the key must be the
/// certificate's, and a client certificate, when `--tls-client-ca` is given, is
/// optional (probes and API-key callers connect without one) but must verify when
/// presented. Errors name the flag and the file, never the key's bytes.
pub(crate) fn server_config(files: &Files<'_>) -> Result<Arc<ServerConfig>, SetupError> {
    let Files {
        cert,
        key,
        client_ca,
    } = *files;
    let (_, chain) = read_certificates(cert, "--tls-cert")?;
    let key_pem = read(key, "--tls-key")?;
    let der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            SetupError::file("--tls-key", key, "no PRIVATE KEY block in the PEM")
        }
        _ => SetupError::file("--tls-key", key, "not a PEM private key"),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certified = CertifiedKey::from_der(chain, der, &provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => SetupError::file(
            "--tls-key",
            key,
            format!(
                "not the key of the certificate in --tls-cert {}",
                cert.display()
            ),
        ),
        e => SetupError::file("--tls-key", key, format!("unusable private key: {e}")),
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| SetupError::file("--tls-cert", cert, format!("no usable TLS version: {e}")))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => builder.with_client_cert_verifier(client_verifier(ca, provider)?),
    };
    let mut config =
        builder.with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

fn client_verifier(
    ca: &Path,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, SetupError> {
    let flag = "--tls-client-ca";
    let mut roots = RootCertStore::empty();
    for (i, der) in read_certificates(ca, flag)?.1.into_iter().enumerate() {
        roots
            .add(der)
            .map_err(|e| SetupError::file(flag, ca, format!("certificate {}: {e}", i + 1)))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .allow_unauthenticated()
        .build()
        .map_err(|e| SetupError::file(flag, ca, format!("cannot verify clients with it: {e}")))
}

/// Connections from `incoming`, each handshaken in a task of its own with the
/// configuration in `current` at the time, so that a slow handshake delays no other.
/// Failed and timed-out handshakes are dropped and counted.
pub(crate) fn incoming<S, IO>(incoming: S, current: Current) -> Incoming<S, IO>
where
    S: Stream<Item = io::Result<IO>>,
{
    Incoming {
        incoming: Box::pin(incoming),
        done: false,
        current,
        handshakes: JoinSet::new(),
    }
}

/// See [`incoming`].
pub(crate) struct Incoming<S, IO> {
    incoming: Pin<Box<S>>,
    done: bool,
    current: Current,
    handshakes: JoinSet<Option<TlsStream<IO>>>,
}

impl<S, IO> Stream for Incoming<S, IO>
where
    S: Stream<Item = io::Result<IO>>,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Item = io::Result<TlsStream<IO>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        while !this.done {
            match this.incoming.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(io))) => {
                    let acceptor = TlsAcceptor::from(this.current.load_full());
                    this.handshakes.spawn(handshake(acceptor, io));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => this.done = true,
                Poll::Pending => break,
            }
        }
        loop {
            match this.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Some(tls)))) => return Poll::Ready(Some(Ok(tls))),
                Poll::Ready(Some(_)) => continue,
                // No handshake under way: the next connection wakes this stream.
                Poll::Ready(None) if this.done => return Poll::Ready(None),
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

async fn handshake<IO>(acceptor: TlsAcceptor, io: IO) -> Option<TlsStream<IO>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let failure = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
        Ok(Ok(tls)) => return Some(tls),
        Ok(Err(e)) => {
            debug!(error = %e, "TLS handshake failed");
            "failed"
        }
        Err(_) => "timeout",
    };
    crate::metrics::tls_handshake_failed(failure);
    None
}
