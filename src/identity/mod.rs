//! Identity: accounts and their DIDs, the OpenID Connect provider's state and signing keys,
//! consent, and the token revocation list. The HTTP edge is `crate::http::oauth` (the provider's
//! endpoints and pages) and `crate::http::account` (accounts, consents, clients).

pub mod accounts;
pub mod certificates;
pub mod oauth;
pub mod revocation;
pub mod secrets;
pub mod signing;

use std::net::{IpAddr, Ipv6Addr};
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
    pub registrations: governor::DefaultKeyedRateLimiter<IpAddr>,
}

/// The key a client address is rate limited under: an IPv4 address itself (an IPv4-mapped IPv6
/// one as the IPv4 address), an IPv6 address by its /64 — one host usually holds a whole /64 and
/// could otherwise take a fresh address for every attempt.
pub fn rate_limit_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_are_limited_by_their_64_prefix() {
        let key = |s: &str| rate_limit_key(s.parse().unwrap());
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::7"));
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2::"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.1"), key("192.0.2.1"));
        assert_ne!(key("192.0.2.1"), key("192.0.2.2"));
    }
}
