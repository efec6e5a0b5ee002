//! What the security tests share: certificates made on the fly by rcgen (on ring), secret
//! files with their modes, TLS clients that trust one CA, and accounts made with the real
//! `iomt-edge credentials add`.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

pub type Issuer = rcgen::Issuer<'static, rcgen::KeyPair>;

/// A CA named `name`, as PEM, and what signs with it.
pub fn ca(name: &str) -> (String, Issuer) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let pem = params.self_signed(&key).unwrap().pem();
    (pem, rcgen::Issuer::new(params, key))
}

/// A certificate `issuer` signs: for the names in `sans` (a server: `127.0.0.1` becomes an IP
/// name), or with CommonName `cn` (a device). Returns its PEM and its key's.
pub fn signed(issuer: &Issuer, sans: &[&str], cn: Option<&str>) -> (String, String) {
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut params = rcgen::CertificateParams::new(sans).unwrap();
    if let Some(cn) = cn {
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
    }
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// `text` in a file of this mode (its directory made if missing).
pub fn write_file(path: &Path, text: &str, mode: u32) -> PathBuf {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    path.to_owned()
}

/// A rustls client config on ring trusting `ca_pem` only, presenting `identity` (certificate
/// and key PEMs) when given.
pub fn tls_client(ca_pem: &str, identity: Option<&(String, String)>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    Arc::new(config)
}

/// An HTTPS client that trusts `ca_pem` only and follows no redirect.
pub fn https_client(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(Arc::unwrap_or_clone(tls_client(ca_pem, None)))
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Adds (or replaces) an account with the real command, the password on standard input, at
/// a cost tests can afford (20,000 iterations).
pub fn add_account(file: &Path, name: &str, password: &str) {
    let out = super::output_with_stdin(
        Command::new(env!("CARGO_BIN_EXE_iomt-edge"))
            .args([
                "credentials",
                "add",
                name,
                "--iterations",
                "20000",
                "--file",
            ])
            .arg(file),
        format!("{password}\n").as_bytes(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `pipeline` on a fresh data directory; fails, and returns its exit status and stderr.
pub fn refused_at_start(dir: &Path, pipeline: &str) -> String {
    let pipeline_path = write_file(&dir.join("p.toml"), pipeline, 0o644);
    let data = dir.join("data");
    let out = Command::new(env!("CARGO_BIN_EXE_iomt-edge"))
        .arg("run")
        .arg("--pipeline")
        .arg(&pipeline_path)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "started: {err}");
    assert!(
        !data.join("endpoints.json").exists(),
        "it became ready: {err}"
    );
    err
}
