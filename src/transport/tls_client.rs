//! TLS for this node's MQTT client connections (the external broker's two connections, `replay`):
//! a rustls client config on ring, trusting either a given CA file or the operating system's
//! trust store, and the broker URL that says whether to use it.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls_platform_verifier::BuilderVerifierExt;

pub use crate::config::BrokerUrl;

/// A client config on ring (the process-wide default provider is left alone): trusting the
/// certificates of the PEM file `ca` when given, else the operating system's trust store.
pub fn client_config(ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS: {e}"))?;
    let config = match ca {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: not a PEM certificate file: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("{}: holds no PEM certificate", path.display()));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
            builder.with_root_certificates(roots)
        }
        None => builder
            .with_platform_verifier()
            .map_err(|e| format!("TLS: the operating system's trust store: {e}"))?,
    };
    Ok(Arc::new(config.with_no_client_auth()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_host_port_and_tls() {
        let u = |s| BrokerUrl::parse(s).unwrap();
        assert_eq!(
            u("mqtts://broker.example"),
            BrokerUrl {
                host: "broker.example".into(),
                port: 8883,
                tls: true
            }
        );
        assert_eq!(u("mqtt://10.0.0.5:1884").port, 1884);
        assert!(!u("mqtt://10.0.0.5:1884").tls);
        assert_eq!(u("mqtts://[::1]:9999").host, "::1");
        assert!(BrokerUrl::parse("http://x").is_err());
        assert!(BrokerUrl::parse("mqtts://:1").is_err());
        assert!(BrokerUrl::parse("mqtts://x:port").is_err());
    }

    #[test]
    fn a_ca_file_without_certificates_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("ca.pem");
        std::fs::write(&empty, "not pem\n").unwrap();
        let e = client_config(Some(&empty)).unwrap_err();
        assert!(e.contains("ca.pem"), "{e}");
        let e = client_config(Some(&dir.path().join("missing.pem"))).unwrap_err();
        assert!(e.contains("missing.pem"), "{e}");
    }
}
