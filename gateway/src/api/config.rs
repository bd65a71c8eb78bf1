//! `[http]`: where the API listens, its bearer tokens and TLS. Parsing only.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::auth::TokenConfig;
use crate::tls::TlsConfig;

/// `[http]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// `[[http.tokens]]`: API bearer tokens. None: the API is open and must listen on loopback.
    pub tokens: Vec<TokenConfig>,
    /// `[http.tls]`: HTTPS on `listen`. None: plain HTTP.
    pub tls: Option<TlsConfig>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { listen: SocketAddr::from(([127, 0, 0, 1], 8080)), tokens: Vec::new(), tls: None }
    }
}

