//! `--tls`: kube-sim serves https with a certificate of its own, so that kubectl sends bearer
//! tokens (client-go reads a kubeconfig's credentials only for TLS servers; over plain http it
//! sends none).

use std::sync::Arc;

use anyhow::Context;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tokio::net::TcpListener;

/// A CA (its PEM goes into kubeconfigs as `certificate-authority-data`) and a server
/// certificate for `127.0.0.1` and `localhost` signed by it.
pub struct Certs {
    pub ca_pem: String,
    config: Arc<rustls::ServerConfig>,
}

impl Certs {
    pub fn generate() -> anyhow::Result<Certs> {
        let ca_key = KeyPair::generate().context("CA key")?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).context("CA")?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kube-sim CA");
        let ca_cert = ca_params.self_signed(&ca_key).context("CA certificate")?;
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().context("server key")?;
        let params = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .context("server certificate")?;
        let cert = params.signed_by(&key, &issuer).context("signing")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .context("TLS config")?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Certs {
            ca_pem: ca_cert.pem(),
            config: Arc::new(config),
        })
    }

    /// Serves `router` over TLS (HTTP/1.1) until the task is aborted.
    pub async fn serve(&self, listener: TcpListener, router: axum::Router) {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config.clone());
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("kube-sim accept: {e}");
                    continue;
                }
            };
            let (acceptor, router) = (acceptor.clone(), router.clone());
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::debug!("kube-sim TLS handshake: {e}");
                        return;
                    }
                };
                let service = hyper_util::service::TowerToHyperService::new(router);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await
                {
                    tracing::debug!("kube-sim connection: {e}");
                }
            });
        }
    }
}
