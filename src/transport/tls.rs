//! TLS for the service's listeners (the MQTT broker's, and HTTP): a rustls server config built
//! from a `[… .tls]` table, on ring only, and the identity a client certificate names.
//!
//! Every error names the file and what is wrong with it, never the bytes of a key.

use std::path::{Path, PathBuf};
use std::sync::Arc;

// PEM through rustls-pki-types (`PemObject`), re-exported by rustls; rustls-pemfile is unmaintained.
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS {what} {}: {source}", .path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS {what} {}: not a regular file", .path.display())]
    NotAFile { what: &'static str, path: PathBuf },
    #[error(
        "TLS key {}: mode {mode:04o} lets others read the private key; make it readable by its \
         owner only (chmod 600 {})",
        .path.display(), .path.display()
    )]
    KeyMode { path: PathBuf, mode: u32 },
    #[error("TLS {what} {}: {reason}", .path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "TLS key {}: not a private key the listener can use: {reason}",
        .path.display()
    )]
    Key { path: PathBuf, reason: String },
    #[error(
        "TLS cert {} and key {}: the key is not the private key of the certificate (the first \
         certificate of the file must be the listener's own)",
        .cert.display(), .key.display()
    )]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("TLS client_ca {}: {reason}", .path.display())]
    ClientCa { path: PathBuf, reason: String },
}

/// A rustls server config for a listener: TLS 1.2 and 1.3 on ring (the one crypto library of
/// this crate; no process-wide default provider is installed or relied on), offering `alpn`
/// (e.g. `[b"mqtt"]`, `[b"http/1.1"]`). With `client_ca`, a client must present a certificate
/// it signed; without, none is asked for.
pub fn server_config(c: &TlsConfig, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs("cert", &c.cert)?;
    let key = read_key(&c.key)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3");
    let builder = match &c.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for ca in read_certs("client_ca", path)? {
                roots.add(ca).map_err(|e| TlsError::ClientCa {
                    path: path.clone(),
                    reason: format!("not a CA certificate rustls can use: {e}"),
                })?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| TlsError::ClientCa {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
            cert: c.cert.clone(),
            key: c.key.clone(),
        },
        // rustls's message names the key's kind or algorithm, never its bytes.
        e => TlsError::Key {
            path: c.key.clone(),
            reason: e.to_string(),
        },
    })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The identity a verified client certificate names: its subject's CommonName, else its first
/// DNS SubjectAltName. `None` without a client certificate (none asked for, i.e. no
/// `client_ca`), or when it names nothing usable (empty, or holding control characters, which
/// an identity stood in topics and logs must not).
pub fn client_identity(conn: &rustls::ServerConnection) -> Option<String> {
    let leaf = conn.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let usable = |s: &str| !s.is_empty() && !s.chars().any(char::is_control);
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .filter(|s| usable(s));
    if let Some(cn) = cn {
        return Some(cn.to_owned());
    }
    let san = cert.subject_alternative_name().ok().flatten()?;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(d) if usable(d) => Some((*d).to_owned()),
        _ => None,
    })
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let read = |source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read)?;
    if !meta.is_file() {
        return Err(TlsError::NotAFile {
            what,
            path: path.to_owned(),
        });
    }
    if what == "key" {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(TlsError::KeyMode {
                path: path.to_owned(),
                mode,
            });
        }
    }
    std::fs::read(path).map_err(read)
}

/// Every `CERTIFICATE` block of a PEM file, in order; at least one.
fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |reason: String| TlsError::Pem {
        what,
        path: path.to_owned(),
        reason,
    };
    let bytes = read_file(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(format!("not a PEM certificate file: {}", pem_reason(&e))))?;
    if certs.is_empty() {
        return Err(pem_error(
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    Ok(certs)
}

/// The first private key of a PEM file: PKCS#8, SEC1 (`EC PRIVATE KEY`) or PKCS#1
/// (`RSA PRIVATE KEY`).
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_file("key", path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
        what: "key",
        path: path.to_owned(),
        reason: match e {
            pem::Error::NoItemsFound => "holds no PEM private key (-----BEGIN PRIVATE KEY-----, \
                                         EC PRIVATE KEY or RSA PRIVATE KEY)"
                .into(),
            e => format!("not a PEM private key file: {}", pem_reason(&e)),
        },
    })
}

/// What is wrong with a PEM file, without quoting it: some of the parser's errors carry the
/// offending line, which in a key file could be key material.
fn pem_reason(e: &pem::Error) -> &'static str {
    match e {
        pem::Error::MissingSectionEnd { .. } => "a section has no -----END line",
        pem::Error::IllegalSectionStart { .. } => "a -----BEGIN line is malformed",
        pem::Error::Base64Decode(_) => "a section is not valid base64",
        pem::Error::NoItemsFound => "no PEM section found",
        _ => "it could not be read as PEM",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Ca {
        pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf certificate (PEM) and its key (PEM), signed by `ca`.
    fn leaf(ca: &Ca, cn: Option<&str>, dns: &[&str]) -> (String, String) {
        let mut params =
            CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>()).unwrap();
        // rcgen names every certificate "rcgen self signed cert" unless told otherwise.
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    /// A server certificate for `localhost` from a CA of its own, written to `dir`.
    fn server_files(dir: &Path, client_ca: Option<&Ca>) -> (TlsConfig, Ca) {
        let server_ca = ca("server CA");
        let (cert, key) = leaf(&server_ca, Some("edge"), &["localhost"]);
        let config = TlsConfig {
            cert: write(dir, "server.crt", &cert, 0o644),
            key: write(dir, "server.key", &key, 0o600),
            client_ca: client_ca.map(|c| write(dir, "clients.pem", &c.pem, 0o644)),
        };
        (config, server_ca)
    }

    #[test]
    fn a_good_config_loads_with_its_alpn() {
        let dir = tempfile::tempdir().unwrap();
        let devices = ca("devices");
        let (c, _) = server_files(dir.path(), Some(&devices));
        let config = server_config(&c, &[b"mqtt"]).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"mqtt".to_vec()]);
        let (c, _) = server_files(dir.path(), None);
        assert!(server_config(&c, &[]).is_ok());
        // Mode 0400 is stricter than 0600: fine.
        std::fs::set_permissions(&c.key, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(server_config(&c, &[]).is_ok());
    }

    #[test]
    fn a_key_others_can_read_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = server_files(dir.path(), None);
        let key_text = std::fs::read_to_string(&c.key).unwrap();
        std::fs::set_permissions(&c.key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = server_config(&c, &[]).unwrap_err();
        assert!(
            matches!(err, TlsError::KeyMode { mode: 0o644, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&c.key.display().to_string()) && msg.contains("mode 0644"),
            "{msg}"
        );
        let body = key_text.lines().nth(1).unwrap();
        assert!(!msg.contains(body));
    }

    #[test]
    fn a_certificate_that_is_not_the_keys_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (c, server_ca) = server_files(dir.path(), None);
        let (_, other_key) = leaf(&server_ca, Some("other"), &["localhost"]);
        let c = TlsConfig {
            key: write(dir.path(), "other.key", &other_key, 0o600),
            ..c
        };
        let err = server_config(&c, &[]).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("other.key") && msg.contains("server.crt"),
            "{msg}"
        );
    }

    #[test]
    fn garbage_pem_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (good, _) = server_files(dir.path(), None);
        let garbage =
            "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n";
        let cases = [
            TlsConfig {
                cert: write(dir.path(), "bad.crt", garbage, 0o644),
                ..good.clone()
            },
            TlsConfig {
                cert: write(dir.path(), "empty.crt", "hello\n", 0o644),
                ..good.clone()
            },
            TlsConfig {
                key: write(
                    dir.path(),
                    "bad.key",
                    "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n",
                    0o600,
                ),
                ..good.clone()
            },
            TlsConfig {
                // A certificate where the key should be.
                key: write(
                    dir.path(),
                    "cert-as.key",
                    &std::fs::read_to_string(&good.cert).unwrap(),
                    0o600,
                ),
                ..good.clone()
            },
            TlsConfig {
                key: write(
                    dir.path(),
                    "junk.key",
                    "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n",
                    0o600,
                ),
                ..good.clone()
            },
            TlsConfig {
                client_ca: Some(write(dir.path(), "bad-ca.pem", garbage, 0o644)),
                ..good.clone()
            },
            TlsConfig {
                cert: dir.path().join("absent.crt"),
                ..good.clone()
            },
        ];
        let names = [
            "bad.crt",
            "empty.crt",
            "bad.key",
            "cert-as.key",
            "junk.key",
            "bad-ca.pem",
            "absent.crt",
        ];
        for (c, name) in cases.iter().zip(names) {
            let msg = server_config(c, &[]).unwrap_err().to_string();
            assert!(msg.contains(name), "{name}: {msg}");
            // Neither the key's base64 ("secret") nor its bytes appear.
            assert!(
                !msg.contains("c2VjcmV0") && !msg.contains("secret"),
                "{msg}"
            );
        }
    }

    /// Runs one handshake over an in-memory pipe; the server's result is the identity it read.
    async fn handshake(
        server: Arc<ServerConfig>,
        server_ca: &Ca,
        client_cert: Option<(String, String)>,
    ) -> Result<Option<String>, std::io::Error> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(server_ca.pem.as_bytes()).unwrap())
            .unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let client = match client_cert {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        let (a, b) = tokio::io::duplex(1 << 16);
        let server_side = async move {
            let mut tls = tokio_rustls::TlsAcceptor::from(server).accept(a).await?;
            let identity = client_identity(tls.get_ref().1);
            // TLS 1.3 sends the client's certificate verdict after the client thinks it is done:
            // one round trip of data makes either side see a refusal.
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await?;
            tls.write_all(&byte).await?;
            tls.flush().await?;
            Ok::<_, std::io::Error>(identity)
        };
        let client_side = async move {
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client))
                .connect(name, b)
                .await?;
            tls.write_all(b"x").await?;
            tls.flush().await?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await?;
            Ok::<_, std::io::Error>(())
        };
        // The server's verdict first: a client only sees that the server gave up.
        let (server, client) = tokio::join!(server_side, client_side);
        let identity = server?;
        client?;
        Ok(identity)
    }

    #[tokio::test]
    async fn a_client_certificate_names_the_device_after_a_real_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let devices = ca("devices");
        let (c, server_ca) = server_files(dir.path(), Some(&devices));
        let server = server_config(&c, &[]).unwrap();

        let cert = leaf(&devices, Some("bed-4-monitor"), &["ignored.example"]);
        let got = handshake(server.clone(), &server_ca, Some(cert)).await;
        assert_eq!(got.unwrap().as_deref(), Some("bed-4-monitor"));

        // Without a CommonName, the first DNS name.
        let cert = leaf(&devices, None, &["pump-7.ward", "second.ward"]);
        let got = handshake(server.clone(), &server_ca, Some(cert)).await;
        assert_eq!(got.unwrap().as_deref(), Some("pump-7.ward"));

        // A certificate from another CA, and none at all, are refused by the handshake.
        let stranger = ca("devices");
        let cert = leaf(&stranger, Some("bed-4-monitor"), &[]);
        let err = handshake(server.clone(), &server_ca, Some(cert))
            .await
            .unwrap_err();
        // (BadSignature: the stranger CA has the same name as the real one, another key.)
        assert!(
            err.to_string().contains("invalid peer certificate"),
            "{err}"
        );
        let err = handshake(server.clone(), &server_ca, None)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no certificates"), "{err}");

        // Without client_ca no certificate is asked for: no identity.
        let (c, server_ca) = server_files(dir.path(), None);
        let server = server_config(&c, &[]).unwrap();
        assert_eq!(handshake(server, &server_ca, None).await.unwrap(), None);
    }
}
