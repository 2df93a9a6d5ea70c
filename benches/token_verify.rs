//! Token verification cost: what a REST request pays to check its bearer token (`verify`, with
//! scope and attenuation checks) and what a WebSocket `auth` pays (`identify`): on the node that
//! minted the token (remembered at mint), on another node seeing it first (one signature check
//! and the derived proof, `src/auth/minted.rs`), and seen before (the node's verified-token
//! cache); for operator tokens, OAuth access tokens (client, grant, identity scopes) and
//! attenuated tokens (always verified in full). The first line is biscuit's own verification of
//! the same tokens (every signature, the next key and the proof), what a first sight cost before.
//!
//!   cargo bench --bench token_verify [-- --iterations 20000]
//!
//! Prints one line per case: median, p90, p99 in microseconds. Single-threaded, no server.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant, SystemTime};

use biscuit_auth::Biscuit;
use biscuit_auth::macros::block;
use hdrhistogram::Histogram;
use vibe::auth::{Access, Issued, Scope, TokenAuthority};

fn main() {
    let iterations: usize = std::env::args()
        .skip_while(|a| a != "--iterations")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(5000);
    let dir = tempfile::tempdir().unwrap();
    let tokens = TokenAuthority::load_or_create(dir.path()).unwrap();
    let until = SystemTime::now() + Duration::from_secs(3600);
    let scopes: Vec<Scope> = vec![
        "read:posts".parse().unwrap(),
        "write:posts".parse().unwrap(),
    ];
    let identity = vec!["openid".to_owned(), "profile".to_owned()];

    let operator: Vec<String> = (0..iterations)
        .map(|i| {
            tokens
                .mint_until(&format!("did:key:zUser{i}"), &scopes, until)
                .unwrap()
        })
        .collect();
    let oauth: Vec<String> = (0..iterations)
        .map(|i| {
            let issued = Issued {
                client: "0193app",
                grant: uuid::Uuid::now_v7(),
                identity_scopes: &identity,
            };
            tokens
                .mint_issued(&format!("did:key:zUser{i}"), &scopes, until, Some(&issued))
                .unwrap()
                .0
        })
        .collect();
    let attenuated: Vec<String> = operator
        .iter()
        .take(iterations.min(2000))
        .map(|t| {
            Biscuit::from_base64(t, tokens.public_key())
                .unwrap()
                .append(block!(r#"check if operation("read");"#))
                .unwrap()
                .to_base64()
                .unwrap()
        })
        .collect();

    println!("case                                            n      median_us  p90_us  p99_us");
    // Biscuit's checks alone: decoding, the block signature, the next key, the proof.
    report("biscuit's checks (Biscuit::from_base64)", &operator, |t| {
        Biscuit::from_base64(t, tokens.public_key()).expect("parses");
    });
    // The minting node remembered every token it minted.
    report(
        "verify, first use on the minting node (OAuth)",
        &oauth,
        |t| {
            tokens
                .verify(t, Access::Read, Some("posts"))
                .expect("verifies");
        },
    );
    report(
        "identify (WS auth), first use, minting node",
        &operator,
        |t| {
            tokens.identify(t).expect("identifies");
        },
    );
    // Another node with the same root key (a cluster peer, or this one after a restart).
    let other = TokenAuthority::load_or_create(dir.path()).unwrap();
    let verify = |t: &str| {
        other
            .verify(t, Access::Read, Some("posts"))
            .expect("verifies");
    };
    report(
        "verify, first sight on another node (operator)",
        &operator,
        verify,
    );
    report("verify, cached (operator token)", &operator, verify);
    report(
        "verify, first sight on another node (OAuth)",
        &oauth,
        verify,
    );
    report("verify, cached (OAuth access token)", &oauth, verify);
    report("verify, attenuated (always in full)", &attenuated, verify);
    let fresh = TokenAuthority::load_or_create(dir.path()).unwrap();
    report(
        "identify (WS auth), first sight, another node",
        &oauth,
        |t| {
            fresh.identify(t).expect("identifies");
        },
    );
}

fn report(case: &str, tokens: &[String], mut run: impl FnMut(&str)) {
    let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).unwrap();
    for t in tokens {
        let started = Instant::now();
        run(t);
        h.saturating_record(
            u64::try_from(started.elapsed().as_nanos())
                .unwrap_or(u64::MAX)
                .max(1),
        );
    }
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{case:<46} {:>6} {:>10.1} {:>7.1} {:>7.1}",
        tokens.len(),
        us(0.5),
        us(0.9),
        us(0.99)
    );
}
