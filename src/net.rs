//! The master's listening ports: bound where the config says, plain TCP or
//! TLS (rustls, its `ring` provider), and a connection's stream either way.
//!
//! The TLS acceptor of a listening port can be replaced while it listens:
//! a reload reads the key and certificate files again, so that a renewed
//! certificate is served from the next connection on (`kiln reconfig`).

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// How long a client has to finish its TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A port's TLS, replaceable while it listens.
pub struct Tls(RwLock<TlsAcceptor>);

impl Tls {
    pub fn new(acceptor: TlsAcceptor) -> Arc<Tls> {
        Arc::new(Tls(RwLock::new(acceptor)))
    }

    /// Serves `acceptor` from the next connection on.
    pub fn replace(&self, acceptor: TlsAcceptor) {
        *crate::sync::write(&self.0) = acceptor;
    }

    fn acceptor(&self) -> TlsAcceptor {
        crate::sync::read(&self.0).clone()
    }
}

/// Reads a port's key and certificates (paths relative to `dir`) into a
/// TLS acceptor; the error names the file and what is wrong with it.
pub fn load_tls(dir: &Path, cfg: &TlsConfig) -> anyhow::Result<TlsAcceptor> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let cert_path = dir.join(&cfg.cert);
    let key_path = dir.join(&cfg.key);
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| {
            format!(
                "cannot read the certificates (certKey) in {}",
                cert_path.display()
            )
        })?;
    if certs.is_empty() {
        bail!(
            "{} holds no certificate (certKey must be PEM: -----BEGIN CERTIFICATE-----)",
            cert_path.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(&key_path).with_context(|| {
        format!(
            "cannot read a private key (privateKey, PEM: PKCS#8, RSA or EC) in {}",
            key_path.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!(
                "the key in {} does not go with the certificate in {}",
                key_path.display(),
                cert_path.display()
            )
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A bound port, and its TLS if it has one.
pub struct Bound {
    pub tcp: TcpListener,
    pub tls: Option<Arc<Tls>>,
}

impl Bound {
    /// `http` or `https`, `ws` or `wss`: the scheme of this port's URL.
    pub fn scheme(&self, plain: &'static str, secure: &'static str) -> &'static str {
        if self.tls.is_some() {
            secure
        } else {
            plain
        }
    }
}

/// Binds `host:port`, with TLS from `tls`'s files (read now, so that a key
/// that cannot be read fails the start or the reload, not a client).
pub async fn bind(
    host: &str,
    port: u16,
    tls: Option<&TlsConfig>,
    dir: &Path,
) -> anyhow::Result<Bound> {
    let tls = match tls {
        Some(cfg) => Some(Tls::new(load_tls(dir, cfg)?)),
        None => None,
    };
    let tcp = TcpListener::bind((host, port))
        .await
        .with_context(|| format!("cannot listen on {host}:{port}"))?;
    Ok(Bound { tcp, tls })
}

/// An accepted connection, through its TLS handshake if the port has TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Stream {
    /// `tcp` as it is, or through a TLS handshake of at most
    /// [`TLS_HANDSHAKE_TIMEOUT`].
    pub async fn accept(tcp: TcpStream, tls: Option<&Tls>) -> anyhow::Result<Stream> {
        let Some(tls) = tls else {
            return Ok(Stream::Plain(tcp));
        };
        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.acceptor().accept(tcp)).await {
            Err(_) => bail!(
                "no TLS handshake within {} s",
                TLS_HANDSHAKE_TIMEOUT.as_secs()
            ),
            Ok(Err(e)) => bail!("TLS handshake failed: {e}"),
            Ok(Ok(s)) => Ok(Stream::Tls(Box::new(s))),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}
