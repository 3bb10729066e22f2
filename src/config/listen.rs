//! Where the master's two ports listen, and whether they speak TLS.

use serde::Serialize;

/// A port's TLS: the files of Twisted's `ssl:` port string, as written
/// (relative to the master dir). The key and the certificate chain may be
/// in one PEM file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TlsConfig {
    /// Twisted's `privateKey`: a PEM private key (PKCS#8, RSA or EC).
    pub key: String,
    /// Twisted's `certKey` (the key's file when not given): PEM
    /// certificates, the master's first, then its chain.
    pub cert: String,
}

/// Buildbot's `protocols` key: the worker port.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProtocolsConfig {
    /// Port of the `msgpack_experimental_v7` WebSocket listener.
    pub msgpack_port: Option<u16>,
    /// The interface it listens on: every one (`0.0.0.0`) unless the port
    /// string names one.
    pub msgpack_interface: String,
    /// TLS on the worker port (an `ssl:` port string).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msgpack_tls: Option<TlsConfig>,
}

/// A listening port as a config writes it: a number, or Twisted's port
/// string (`"tcp:9989:interface=127.0.0.1"`,
/// `"ssl:8443:privateKey=key.pem:certKey=cert.pem"`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listen {
    pub port: u16,
    pub interface: Option<String>,
    pub tls: Option<TlsConfig>,
}

impl Listen {
    /// Reads a Twisted port string; the error says what is wrong in it.
    pub fn parse(text: &str) -> Result<Listen, String> {
        let parts = split_escaped(text);
        let (kind, rest) = match parts.first().map(String::as_str) {
            Some("tcp") => ("tcp", &parts[1..]),
            Some("ssl") => ("ssl", &parts[1..]),
            Some(p) if p.chars().all(|c| c.is_ascii_digit()) => ("tcp", &parts[..]),
            Some(other) => {
                return Err(format!(
                    "kiln listens on tcp: and ssl: ports, not `{other}:`"
                ))
            }
            None => return Err("no port number".into()),
        };
        let mut port = None;
        let mut interface = None;
        let (mut key, mut cert) = (None, None);
        for (i, part) in rest.iter().enumerate() {
            let (name, value) = match part.split_once('=') {
                Some((n, v)) => (n, v),
                None if i == 0 => ("port", part.as_str()),
                None => return Err(format!("`{part}` should be NAME=VALUE")),
            };
            let slot = match name {
                "port" => &mut port,
                "interface" => &mut interface,
                "privateKey" if kind == "ssl" => &mut key,
                "certKey" if kind == "ssl" => &mut cert,
                "privateKey" | "certKey" => {
                    return Err(format!(
                        "`{name}` is for an ssl: port (write ssl:PORT:privateKey=...)"
                    ))
                }
                _ => {
                    return Err(format!(
                        "kiln does not know `{name}` (it reads port, interface{})",
                        if kind == "ssl" {
                            ", privateKey and certKey"
                        } else {
                            ""
                        }
                    ))
                }
            };
            if slot.replace(value.to_string()).is_some() {
                return Err(format!("`{name}` is given twice"));
            }
        }
        let port = port
            .ok_or("no port number")?
            .parse::<u16>()
            .map_err(|_| "the port must be a number from 0 to 65535".to_string())?;
        let tls = match kind {
            "ssl" => {
                let key = key.ok_or("an ssl: port needs privateKey=FILE")?;
                Some(TlsConfig {
                    cert: cert.unwrap_or_else(|| key.clone()),
                    key,
                })
            }
            _ => None,
        };
        Ok(Listen {
            port,
            interface: interface.filter(|i| !i.is_empty()),
            tls,
        })
    }
}

/// Twisted's port strings separate fields with `:` and escape a `:` inside
/// one (an IPv6 interface, a Windows path) with `\`.
fn split_escaped(text: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let (Some(next), Some(last)) = (chars.next(), parts.last_mut()) {
                    last.push(next);
                }
            }
            ':' => parts.push(String::new()),
            c => {
                if let Some(last) = parts.last_mut() {
                    last.push(c);
                }
            }
        }
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twisted_port_strings_are_read_as_buildbot_users_write_them() {
        let l = Listen::parse("tcp:9989:interface=127.0.0.1").expect("tcp");
        assert_eq!(
            (l.port, l.interface.as_deref(), l.tls),
            (9989, Some("127.0.0.1"), None)
        );
        let l = Listen::parse("ssl:8443:privateKey=key.pem:certKey=cert.pem").expect("ssl");
        assert_eq!(l.port, 8443);
        assert_eq!(
            l.tls,
            Some(TlsConfig {
                key: "key.pem".into(),
                cert: "cert.pem".into()
            })
        );
        let l = Listen::parse("ssl:port=443:privateKey=both.pem:interface=\\:\\:1").expect("v6");
        assert_eq!(l.interface.as_deref(), Some("::1"));
        assert_eq!(l.tls.map(|t| t.cert), Some("both.pem".into()));
        assert_eq!(Listen::parse("8010").map(|l| l.port), Ok(8010));
    }

    #[test]
    fn a_wrong_port_string_says_what_is_wrong() {
        for (text, says) in [
            ("tcp:99999", "0 to 65535"),
            ("ssl:8443", "needs privateKey"),
            ("tcp:8010:privateKey=k.pem", "is for an ssl: port"),
            ("tcp:8010:backlog=5", "does not know `backlog`"),
            ("tcp:interface=127.0.0.1", "no port"),
            ("tcp:interface=::1", "should be NAME=VALUE"),
            ("tcp:1:port=2", "given twice"),
            ("unix:/tmp/s", "not `unix:`"),
            ("", "0 to 65535"),
        ] {
            let e = Listen::parse(text).expect_err(text);
            assert!(e.contains(says), "{text}: {e}");
        }
    }
}
