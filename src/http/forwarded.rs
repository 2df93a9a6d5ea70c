//! The client address a request is attributed to (per-address rate limits, request logs): the
//! connection's peer, or — when that peer is a reverse proxy the operator listed in
//! `http.trusted_proxies` — the address the proxies recorded in `X-Forwarded-For`.
//!
//! A client may send any `X-Forwarded-For` it likes and each proxy appends the address it saw, so
//! only the entries added by trusted proxies are believed: the list is read from its right end,
//! past every trusted address, and the first address that is not trusted is the client. Entries
//! further left are the client's own claims and are never read.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

/// The networks whose connections may tell where a request came from.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parses entries that are each an address (`10.0.0.7`, `::1`) or a network in CIDR form
    /// (`10.0.0.0/8`, `fd00::/8`). IPv4 written as IPv4-mapped IPv6 (`::ffff:10.0.0.5`, as a
    /// dual-stack socket shows peers) is taken as the IPv4 it is. A network of every address
    /// (`/0`) is refused: it would trust what any client writes.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        entries
            .iter()
            .map(|entry| {
                let entry = entry.as_ref().trim();
                let net = entry
                    .parse::<IpNet>()
                    .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        format!("`{entry}` is neither an IP address nor a network like 10.0.0.0/8")
                    })?;
                let net = canonical_net(net);
                if net.prefix_len() == 0 {
                    return Err(format!(
                        "`{entry}` would trust every address, and so any client's own \
                         X-Forwarded-For: list the proxies' addresses"
                    ));
                }
                Ok(net)
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    fn trusts(&self, address: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&address))
    }

    /// The address the request on a connection from `peer` is attributed to.
    pub fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut hop = canonical(peer);
        if !self.trusts(hop) {
            return hop;
        }
        // Repeated header lines form one list in order (RFC 9110 §5.3): read the last line first.
        let entries = headers
            .get_all("x-forwarded-for")
            .iter()
            .rev()
            .flat_map(|line| line.as_bytes().rsplit(|&b| b == b','));
        for entry in entries {
            let Some(address) = parse_entry(entry) else {
                // Not what a proxy writes (`unknown`, an obfuscated name, garbage): nothing left
                // of it can be placed, so the request stays with the last proxy that vouched.
                return hop;
            };
            hop = address;
            if !self.trusts(hop) {
                return hop;
            }
        }
        hop
    }
}

impl<'de> Deserialize<'de> for TrustedProxies {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let entries = Vec::<String>::deserialize(deserializer)?;
        Self::parse(&entries).map_err(serde::de::Error::custom)
    }
}

/// One `X-Forwarded-For` entry: an address, possibly with a port (`192.0.2.1:4711`,
/// `[2001:db8::1]:4711`), as some proxies write it.
fn parse_entry(entry: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(entry).ok()?.trim();
    // `[2001:db8::7]` without a port, as some proxies write IPv6.
    let text = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    let address = text
        .parse::<IpAddr>()
        .or_else(|_| text.parse::<SocketAddr>().map(|s| s.ip()))
        .ok()?;
    Some(canonical(address))
}

/// A network within `::ffff:0:0/96` (IPv4-mapped) as the IPv4 network it covers; host bits dropped.
fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && v6.prefix_len() >= 96
        && let Ok(mapped) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(mapped.trunc());
    }
    net.trunc()
}

/// An IPv4 client reached over an IPv6 socket appears as `::ffff:a.b.c.d`; it is the same client.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        IpAddr::V4(_) => address,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(entries: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(entries).unwrap()
    }

    fn client(trusted: &TrustedProxies, peer: &str, forwarded_for: &[&str]) -> String {
        let mut headers = HeaderMap::new();
        for line in forwarded_for {
            headers.append("x-forwarded-for", line.parse().unwrap());
        }
        trusted
            .client_address(peer.parse().unwrap(), &headers)
            .to_string()
    }

    #[test]
    fn without_trusted_proxies_the_header_is_ignored() {
        let none = TrustedProxies::default();
        assert_eq!(client(&none, "192.0.2.9", &["203.0.113.5"]), "192.0.2.9");
        let other = proxies(&["10.0.0.0/8"]);
        assert_eq!(client(&other, "192.0.2.9", &["203.0.113.5"]), "192.0.2.9");
    }

    #[test]
    fn the_rightmost_untrusted_entry_is_the_client() {
        let trusted = proxies(&["10.0.0.0/8", "127.0.0.1"]);
        assert_eq!(
            client(&trusted, "127.0.0.1", &["203.0.113.5"]),
            "203.0.113.5"
        );
        // The client claimed 198.51.100.1; the proxy appended what it saw.
        assert_eq!(
            client(&trusted, "127.0.0.1", &["198.51.100.1, 203.0.113.5"]),
            "203.0.113.5"
        );
        // Two proxies: the edge one (10.1.2.3) forwarded to the local one.
        assert_eq!(
            client(
                &trusted,
                "127.0.0.1",
                &["198.51.100.1, 203.0.113.5, 10.1.2.3"]
            ),
            "203.0.113.5"
        );
        // The same list over repeated header lines.
        assert_eq!(
            client(
                &trusted,
                "127.0.0.1",
                &["198.51.100.1", "203.0.113.5", "10.1.2.3"]
            ),
            "203.0.113.5"
        );
    }

    #[test]
    fn a_chain_of_trusted_hops_ends_at_its_leftmost_entry() {
        let trusted = proxies(&["10.0.0.0/8"]);
        assert_eq!(
            client(&trusted, "10.0.0.1", &["10.9.9.9, 10.0.0.2"]),
            "10.9.9.9"
        );
        // A trusted proxy that sent no header is itself the client.
        assert_eq!(client(&trusted, "10.0.0.1", &[]), "10.0.0.1");
        assert_eq!(client(&trusted, "10.0.0.1", &[""]), "10.0.0.1");
    }

    #[test]
    fn an_entry_that_is_not_an_address_stops_at_the_last_trusted_hop() {
        let trusted = proxies(&["10.0.0.0/8"]);
        assert_eq!(
            client(&trusted, "10.0.0.1", &["203.0.113.5, unknown"]),
            "10.0.0.1"
        );
        assert_eq!(
            client(&trusted, "10.0.0.1", &["203.0.113.5, garbage, 10.0.0.2"]),
            "10.0.0.2"
        );
    }

    #[test]
    fn ports_ipv6_and_mapped_addresses() {
        let trusted = proxies(&["fd00::/8", "127.0.0.1"]);
        assert_eq!(
            client(&trusted, "fd00::1", &["[2001:db8::7]:4711"]),
            "2001:db8::7"
        );
        assert_eq!(
            client(&trusted, "fd00::1", &[" 203.0.113.5:80 "]),
            "203.0.113.5"
        );
        // An IPv4 proxy reached over a dual-stack socket is still the listed proxy.
        assert_eq!(
            client(&trusted, "::ffff:127.0.0.1", &["::ffff:203.0.113.5"]),
            "203.0.113.5"
        );
        // Listed in the mapped form a dual-stack socket shows, it is the same IPv4 proxy.
        let mapped = proxies(&["::ffff:10.0.0.5", "::ffff:10.1.0.0/112"]);
        assert_eq!(client(&mapped, "10.0.0.5", &["203.0.113.5"]), "203.0.113.5");
        assert_eq!(
            client(&mapped, "::ffff:10.1.2.3", &["203.0.113.6"]),
            "203.0.113.6"
        );
        assert_eq!(client(&mapped, "10.2.0.1", &["203.0.113.7"]), "10.2.0.1");
        // IPv6 in brackets, with a port or without.
        assert_eq!(
            client(&trusted, "fd00::1", &["[2001:db8::8]"]),
            "2001:db8::8"
        );
    }

    #[test]
    fn entries_are_addresses_or_networks() {
        assert!(TrustedProxies::parse(&["10.0.0.0/8", "192.0.2.1", "::1", "fd00::/8"]).is_ok());
        let error = TrustedProxies::parse(&["10.0.0.0/33"]).unwrap_err();
        assert!(error.contains("10.0.0.0/33"), "{error}");
        assert!(TrustedProxies::parse(&["proxy.internal"]).is_err());
        // Every address: any client's own entries would be believed.
        for everyone in ["0.0.0.0/0", "::/0", "::ffff:0.0.0.0/96"] {
            let error = TrustedProxies::parse(&[everyone]).unwrap_err();
            assert!(error.contains("every address"), "{everyone}: {error}");
        }
        // Host bits are dropped: 10.1.2.3/8 is the network 10.0.0.0/8.
        assert!(proxies(&["10.1.2.3/8"]).trusts("10.200.0.1".parse().unwrap()));
    }
}
