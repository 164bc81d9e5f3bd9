//! The server's TLS: its certificate, key and client CA checked and built into one
//! rustls configuration, and the handshake done here rather than by tonic, so that the
//! configuration can be swapped while serving (`--tls-cert`, `--tls-key` and
//! `--tls-client-ca` reloaded live, see `reload.rs`). Each connection is handshaken
//! with the configuration in force when it was accepted; connections already up keep
//! theirs.

use std::{path::Path, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use rustls::{
    RootCertStore, ServerConfig, crypto::CryptoProvider, server::WebPkiClientVerifier,
    sign::CertifiedKey,
};
use rustls_pki_types::{PrivateKeyDer, pem::PemObject};
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

/// The TLS handshake of an accepted connection, with the configuration in force now,
/// within [`HANDSHAKE_TIMEOUT`]; a failed or timed-out one is counted and `None`.
pub(crate) async fn accept<IO>(current: &Current, io: IO) -> Option<TlsStream<IO>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    handshake(TlsAcceptor::from(current.load_full()), io).await
}

/// The handshake of one connection within [`HANDSHAKE_TIMEOUT`]; a failed or timed-out
/// one is counted and dropped.
pub(crate) async fn handshake<IO>(acceptor: TlsAcceptor, io: IO) -> Option<TlsStream<IO>>
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
