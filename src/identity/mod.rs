//! Identity: accounts and their DIDs, the OpenID Connect provider's state and signing keys,
//! consent, and the token revocation list. The HTTP edge is `crate::http::oauth` (the provider's
//! endpoints and pages) and `crate::http::account` (accounts, consents, clients).

pub mod accounts;
pub mod certificates;
pub mod oauth;
pub mod revocation;
pub mod secrets;
pub mod signing;

use std::sync::Arc;

pub use accounts::Accounts;
pub use oauth::OAuthStore;
pub use signing::SigningKeys;

/// Everything the identity endpoints share.
#[derive(Debug)]
pub struct Identity {
    /// The issuer URL: the `iss` of ID tokens and the base of every endpoint in discovery.
    pub issuer: String,
    pub accounts: Accounts,
    pub oauth: OAuthStore,
    pub signing: SigningKeys,
    pub secrets: Arc<secrets::SecretBox>,
    /// Open dynamic registrations (without an initial access token) per client address.
    pub registrations: governor::DefaultKeyedRateLimiter<std::net::IpAddr>,
}
