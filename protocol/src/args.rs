//! The Redis connection flags every agentrun binary takes (feature `clap`), so that they are
//! spelled, documented and checked the same way everywhere.

use crate::{RedisSettings, SettingsError};
use std::path::PathBuf;

/// `--redis-url`, credentials and TLS files; flatten into a binary's arguments with
/// `#[command(flatten)]`.
#[derive(Debug, Clone, clap::Args)]
pub struct RedisArgs {
    /// Redis URL: redis://host:port, rediss:// for TLS, redis+sentinel://HOSTS/MASTER,
    /// redis+cluster://HOSTS.
    #[arg(long = "redis-url", env = "AGENTRUN_REDIS_URL")]
    pub url: String,
    /// Redis ACL user name (overrides the URL's).
    #[arg(long = "redis-username", env = "AGENTRUN_REDIS_USERNAME")]
    pub username: Option<String>,
    /// Redis password (overrides the URL's).
    #[arg(
        long = "redis-password",
        env = "AGENTRUN_REDIS_PASSWORD",
        hide_env_values = true
    )]
    pub password: Option<String>,
    /// PEM CA bundle for rediss:// (otherwise the system roots).
    #[arg(long = "redis-ca-file", env = "AGENTRUN_REDIS_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for Redis servers that require mutual TLS.
    #[arg(
        long = "redis-client-cert",
        env = "AGENTRUN_REDIS_CLIENT_CERT",
        requires = "client_key"
    )]
    pub client_cert: Option<PathBuf>,
    /// PEM key of --redis-client-cert.
    #[arg(
        long = "redis-client-key",
        env = "AGENTRUN_REDIS_CLIENT_KEY",
        requires = "client_cert"
    )]
    pub client_key: Option<PathBuf>,
}

impl RedisArgs {
    /// Arguments for `url` with everything else unset.
    pub fn for_url(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            username: None,
            password: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
        }
    }

    /// The connection settings these flags describe.
    pub fn settings(&self) -> Result<RedisSettings, SettingsError> {
        let mut s = RedisSettings::from_url(&self.url)?
            .with_credentials(self.username.clone(), self.password.clone());
        s.ca_file = self.ca_file.clone();
        s.client_cert = self.client_cert.clone();
        s.client_key = self.client_key.clone();
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        redis: RedisArgs,
    }

    #[test]
    fn flags_become_settings() {
        let cli = Cli::parse_from([
            "x",
            "--redis-url",
            "rediss://h:6380",
            "--redis-username",
            "u",
            "--redis-password",
            "p",
            "--redis-ca-file",
            "/ca.pem",
        ]);
        let s = cli.redis.settings().unwrap();
        assert!(s.tls);
        assert_eq!(s.ca_file.as_deref(), Some(std::path::Path::new("/ca.pem")));
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        let err = Cli::try_parse_from([
            "x",
            "--redis-url",
            "rediss://h",
            "--redis-client-cert",
            "/c.pem",
        ])
        .err()
        .expect("a certificate without its key is refused");
        assert!(err.to_string().contains("--redis-client-key"), "{err}");
    }
}
