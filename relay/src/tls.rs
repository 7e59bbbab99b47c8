//! HTTPS for browsers: the relay's certificate and key (`--tls-cert`, `--tls-key`), offered with
//! ALPN `h2` and `http/1.1`.
//!
//! Browsers open at most six HTTP/1.1 connections to one host, and an SSE stream holds one for
//! as long as a run is watched: the seventh tab on the relay waits. Over HTTP/2 every tab's
//! stream shares one connection. Browsers speak HTTP/2 only over TLS, hence this module.
//!
//! The files are read again when they change (cert-manager renews a Secret in place, and the
//! kubelet updates the mounted files), checked at most every [`RELOAD_CHECK`]; a renewed pair
//! that does not load is logged and the last good one kept.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// How often, at most, a handshake checks whether the files changed.
pub const RELOAD_CHECK: Duration = Duration::from_secs(10);

/// A certificate and key that could not be used, naming the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    // Not `source`: the message already says it, and a chain would print it twice.
    #[error("cannot read {flag} {path}: {error}")]
    Read {
        flag: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "{flag} {path} holds no PEM {what}; give the PEM file (e.g. tls.crt / tls.key of a kubernetes.io/tls Secret)"
    )]
    Empty {
        flag: &'static str,
        path: PathBuf,
        what: &'static str,
    },
    #[error(
        "--tls-key {path} is not a PEM private key the relay can use (PKCS#8, PKCS#1 RSA or SEC1 EC): {message}"
    )]
    Key { path: PathBuf, message: String },
    #[error("--tls-cert and --tls-key do not make a pair: {0}")]
    Pair(String),
}

/// The server's TLS settings: HTTP/2 first, then HTTP/1.1.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let resolver = Arc::new(ReloadingCert::load(cert, key)?);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Pair(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Reads a PEM certificate chain and private key and checks that they belong together.
fn load_pair(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let read = |flag, path: &Path| {
        std::fs::read(path).map_err(|error| TlsError::Read {
            flag,
            path: path.to_owned(),
            error,
        })
    };
    let cert_pem = read("--tls-cert", cert)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::Empty {
            flag: "--tls-cert",
            path: cert.to_owned(),
            what: "certificate",
        });
    }
    let key_pem = read("--tls-key", key)?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            flag: "--tls-key",
            path: key.to_owned(),
            what: "private key",
        },
        other => TlsError::Key {
            path: key.to_owned(),
            message: other.to_string(),
        },
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| TlsError::Key {
            path: key.to_owned(),
            message: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| TlsError::Pair(e.to_string()))?;
    Ok(Arc::new(certified))
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The current certificate, read again when its files change.
#[derive(Debug)]
struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: Mutex<Current>,
}

#[derive(Debug)]
struct Current {
    pair: Arc<CertifiedKey>,
    stamps: (Option<SystemTime>, Option<SystemTime>),
    checked: Instant,
}

impl ReloadingCert {
    fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let stamps = (modified(cert), modified(key));
        let pair = load_pair(cert, key)?;
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: Mutex::new(Current {
                pair,
                stamps,
                checked: Instant::now(),
            }),
        })
    }

    fn pair(&self) -> Option<Arc<CertifiedKey>> {
        let mut current = self.current.lock().ok()?;
        if current.checked.elapsed() >= RELOAD_CHECK {
            current.checked = Instant::now();
            let stamps = (modified(&self.cert), modified(&self.key));
            if stamps != current.stamps {
                match load_pair(&self.cert, &self.key) {
                    Ok(pair) => {
                        tracing::info!(cert = %self.cert.display(), "loaded the renewed TLS certificate");
                        current.pair = pair;
                        current.stamps = stamps;
                    }
                    // A renewal caught half-written is read again at the next check.
                    Err(e) => {
                        tracing::warn!(error = %e, "keeping the previous TLS certificate")
                    }
                }
            }
        }
        Some(current.pair.clone())
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pair()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        let (c, k) = (dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(&c, cert.cert.pem()).unwrap();
        std::fs::write(&k, cert.signing_key.serialize_pem()).unwrap();
        (c, k)
    }

    #[test]
    fn a_pair_loads_and_offers_h2_then_http1() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = self_signed(dir.path(), "relay.example");
        let config = server_config(&c, &k).unwrap();
        assert_eq!(
            config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }

    #[test]
    fn bad_files_are_named_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = self_signed(dir.path(), "relay.example");
        let missing = dir.path().join("nope.crt");
        let e = server_config(&missing, &k).unwrap_err().to_string();
        assert!(e.contains("--tls-cert") && e.contains("nope.crt"), "{e}");

        let e = server_config(&k, &k).unwrap_err().to_string();
        assert!(
            e.contains("--tls-cert") && e.contains("no PEM certificate"),
            "{e}"
        );
        let e = server_config(&c, &c).unwrap_err().to_string();
        assert!(
            e.contains("--tls-key") && e.contains("no PEM private key"),
            "{e}"
        );

        let other = tempfile::tempdir().unwrap();
        let (_, other_key) = self_signed(other.path(), "other.example");
        let e = server_config(&c, &other_key).unwrap_err().to_string();
        assert!(e.contains("do not make a pair"), "{e}");
    }

    #[test]
    fn renewed_files_are_used_and_a_broken_renewal_keeps_the_last_good_pair() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = self_signed(dir.path(), "first.example");
        let certs = ReloadingCert::load(&c, &k).unwrap();
        let first = certs.pair().unwrap().cert[0].clone();

        // A renewal: new files, and the check is due.
        let renewed = tempfile::tempdir().unwrap();
        let (c2, k2) = self_signed(renewed.path(), "second.example");
        std::fs::copy(&c2, &c).unwrap();
        std::fs::copy(&k2, &k).unwrap();
        let due = |certs: &ReloadingCert| {
            let mut current = certs.current.lock().unwrap();
            current.checked -= RELOAD_CHECK;
            current.stamps = (None, None);
        };
        due(&certs);
        let second = certs.pair().unwrap().cert[0].clone();
        assert_ne!(first, second, "the renewed certificate is served");

        // A renewal caught half-written: the last good pair stays.
        std::fs::write(&k, b"-----BEGIN PRIVATE KEY-----\ntruncated").unwrap();
        due(&certs);
        assert_eq!(certs.pair().unwrap().cert[0], second);
    }
}
