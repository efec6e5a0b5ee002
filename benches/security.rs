//! What the broker's security costs, measured in one run: `cargo bench --bench security`.
//!
//! - `login/pbkdf2_verify`: checking one CONNECT's password against the credentials file at the
//!   default cost (PBKDF2-HMAC-SHA512, `credentials::DEFAULT_ITERATIONS`): the work an attacker
//!   guessing a password pays per guess, and the broker per new connection (at most two at once,
//!   on blocking threads; a reconnect with a password already verified costs an HMAC instead).
//! - `tls/handshake`: a full TLS 1.3 handshake (ECDSA P-256 certificate, X25519) on ring, both
//!   ends in memory: what a device's reconnect costs the broker besides the login.
//! - `publish/owned_by`: the identity check every publish from a device account passes (its
//!   topic against the ward pipeline's routes).

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use iomt_edge::config::{PipelineConfig, TlsConfig};
use iomt_edge::pipeline::routes::Owners;
use iomt_edge::transport::credentials::{self, Credentials};

fn login(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("credentials");
    let iterations = std::num::NonZeroU32::new(credentials::DEFAULT_ITERATIONS).unwrap();
    credentials::add(
        &file,
        "ward7-bed3-monitor",
        b"correct horse battery",
        iterations,
    )
    .unwrap();
    let creds = Credentials::load(&file).unwrap();
    let mut g = c.benchmark_group("login");
    g.sample_size(10);
    g.bench_function("pbkdf2_verify", |b| {
        b.iter(|| assert!(creds.verify("ward7-bed3-monitor", b"correct horse battery")))
    });
    g.finish();
}

fn handshake(c: &mut Criterion) {
    use rustls::pki_types::pem::PemObject;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let cert_path = dir.path().join("broker.crt");
    let key_path = dir.path().join("broker.key");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let server = iomt_edge::transport::tls::server_config(
        &TlsConfig {
            cert: cert_path,
            key: key_path,
            client_ca: None,
        },
        &[],
    )
    .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(cert.pem().as_bytes()).unwrap())
        .unwrap();
    let client = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    c.bench_function("tls/handshake", |b| {
        b.iter(|| {
            let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
            let mut cl =
                rustls::ClientConnection::new(client.clone(), "localhost".try_into().unwrap())
                    .unwrap();
            let mut buf = Vec::new();
            while cl.is_handshaking() || s.is_handshaking() {
                buf.clear();
                cl.write_tls(&mut buf).unwrap();
                s.read_tls(&mut &buf[..]).unwrap();
                s.process_new_packets().unwrap();
                buf.clear();
                s.write_tls(&mut buf).unwrap();
                cl.read_tls(&mut &buf[..]).unwrap();
                cl.process_new_packets().unwrap();
            }
        })
    });
}

fn owned_by(c: &mut Criterion) {
    let text = include_str!("../pipelines/ward.toml");
    let config = PipelineConfig::parse(text, "pipelines/ward.toml").unwrap();
    let owners = Owners::new(&config.routes).unwrap();
    c.bench_function("publish/owned_by", |b| {
        b.iter(|| {
            assert!(owners.owned_by(
                std::hint::black_box("ward/7/bed/3/vitals"),
                "ward7-bed3-monitor"
            ))
        })
    });
}

criterion_group!(benches, login, handshake, owned_by);
criterion_main!(benches);
