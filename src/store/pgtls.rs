//! TLS to PostgreSQL, as libpq's URL parameters ask for it: `sslmode`
//! (`disable`, the default here as before; `prefer`; `require`, `verify-ca`
//! and `verify-full`, which kiln treats alike: the server's certificate is
//! always checked, against its authority and its host name) and
//! `sslrootcert` (a PEM file of the authorities to trust instead of the
//! public ones; relative to the master dir). rustls does the TLS.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _};

/// What a `db_url` asks for besides what `tokio-postgres` reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgUrl {
    /// The URL for `tokio-postgres` (`sslrootcert` taken out, `verify-*`
    /// read as `require`).
    pub url: String,
    /// TLS, and whose authorities (`None`: the public ones).
    pub tls: Option<Option<PathBuf>>,
}

impl PgUrl {
    /// Splits `db_url`; a relative `sslrootcert` is taken from `dir`.
    pub fn parse(db_url: &str, dir: Option<&Path>) -> anyhow::Result<PgUrl> {
        let (base, query) = match db_url.split_once('?') {
            Some((b, q)) => (b, q),
            None => (db_url, ""),
        };
        let mut kept = Vec::new();
        let (mut mode, mut root) = (None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "sslmode" => mode = Some(v.to_string()),
                "sslrootcert" => root = Some(decode(v)),
                _ => kept.push(pair.to_string()),
            }
        }
        let tls = match mode.as_deref() {
            None | Some("disable") => {
                if root.is_some() {
                    bail!("`sslrootcert` needs TLS: add sslmode=require to `db.db_url`");
                }
                None
            }
            Some("prefer") => {
                kept.push("sslmode=prefer".into());
                Some(root.clone())
            }
            Some("require" | "verify-ca" | "verify-full") => {
                kept.push("sslmode=require".into());
                Some(root.clone())
            }
            Some(other) => bail!(
                "`sslmode={other}` is not one kiln knows: write disable, prefer, require, verify-ca or verify-full"
            ),
        };
        let tls = tls.map(|root| {
            root.map(|r| {
                let p = PathBuf::from(r);
                match dir {
                    Some(d) if p.is_relative() => d.join(p),
                    _ => p,
                }
            })
        });
        let url = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Ok(PgUrl { url, tls })
    }

    /// The URL as given back to a config: `sslrootcert` absolute.
    pub fn to_db_url(&self) -> String {
        match &self.tls {
            Some(Some(root)) => {
                let sep = if self.url.contains('?') { '&' } else { '?' };
                let mut url = self.url.clone();
                if !url.contains("sslmode=") {
                    url.push(sep);
                    url.push_str("sslmode=require");
                }
                format!("{url}&sslrootcert={}", encode(&root.display().to_string()))
            }
            _ => self.url.clone(),
        }
    }
}

/// The connector for `root` (or the public authorities).
pub fn connector(root: Option<&Path>) -> anyhow::Result<tokio_postgres_rustls::MakeRustlsConnect> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::CertificateDer;
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    match root {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|c| c.collect::<Result<Vec<_>, _>>())
                .with_context(|| format!("cannot read sslrootcert {}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                bail!(
                    "sslrootcert {} holds no usable certificate (PEM)",
                    path.display()
                );
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// `%XX` escapes of a URL parameter.
fn decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'.' | b'-' | b'_' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_tls_parameters_are_read_and_the_rest_left_to_tokio_postgres() {
        let u = PgUrl::parse("postgresql://kiln@db/kiln", None).expect("plain");
        assert_eq!((u.url.as_str(), u.tls), ("postgresql://kiln@db/kiln", None));
        let u = PgUrl::parse(
            "postgresql://kiln@db/kiln?connect_timeout=5&sslmode=verify-full&sslrootcert=certs/ca%20x.pem",
            Some(Path::new("/m")),
        )
        .expect("tls");
        assert_eq!(
            u.url,
            "postgresql://kiln@db/kiln?connect_timeout=5&sslmode=require"
        );
        assert_eq!(u.tls, Some(Some(PathBuf::from("/m/certs/ca x.pem"))));
        let again = PgUrl::parse(&u.to_db_url(), None).expect("again");
        assert_eq!(again, u);
        let u = PgUrl::parse("postgres://db/k?sslmode=require", None).expect("public");
        assert_eq!(u.tls, Some(None));
        for (url, says) in [
            ("postgres://db/k?sslmode=allow", "not one kiln knows"),
            ("postgres://db/k?sslrootcert=ca.pem", "needs TLS"),
        ] {
            let e = PgUrl::parse(url, None).expect_err(url).to_string();
            assert!(e.contains(says), "{url}: {e}");
        }
    }
}
