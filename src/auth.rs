//! Capability tokens (biscuit): the node's root key, minting, and verification.
//!
//! A token's authority block carries `sub(DID)`, one `scope(S)` per scope, `exp(DATE)` and a
//! check that the request time is before it. Holders may attenuate a token by appending blocks
//! with checks over the request facts the verifier supplies: `time`, `operation("read"|"write")`
//! and `doc_type(TYPE)`. Subject and scopes are read from the authority block only, so an appended
//! block can narrow a token but never widen it.
//!
//! The authority block also carries the same claims as JSON in its context, and the token's
//! proof key is derived from the root key ([`minted`]): a first sight of an unattenuated token
//! checks one signature and reads its claims there, instead of biscuit's full verification and
//! the Datalog engine. Attenuated tokens, and tokens without such a context, go through both.

mod minted;

use std::fmt;
use std::path::Path;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

use biscuit_auth::builder::{
    Expression, Fact, Op, Policy, PolicyKind, Rule, Term, date, fact, pred, rule, string, var,
};
use biscuit_auth::datalog::SymbolTable;
use biscuit_auth::{AuthorizerLimits, Biscuit, KeyPair, PrivateKey, error as berror};

use crate::acl::is_did;
use crate::identity::revocation::Revocations;
use minted::{FirstSight, MintedContext, ProofKey};

/// Where the root key lives, relative to the data dir.
/// The root key's file inside the data dir.
pub const ROOT_KEY_FILE: &str = "keys/root.key";

/// Datalog budget per verification; generous enough for debug builds (biscuit's 1 ms default is not).
const LIMITS: AuthorizerLimits = AuthorizerLimits {
    max_facts: 1000,
    max_iterations: 100,
    max_time: Duration::from_millis(50),
};

/// The most work a token's own Datalog may ask of one verification, counted by
/// [`datalog_cost`]. Biscuit's `max_time` is looked at only between checks, not inside one, so a
/// check joining a few predicates over a few hundred appended facts would run for minutes on a
/// runtime thread. Attenuations in use cost tens; this refuses only such joins.
const MAX_DATALOG_COST: u64 = 20_000;

/// What one `.matches()` (a regular expression, compiled on every evaluation) counts as in
/// [`datalog_cost`], against 1 for any other operation.
const REGEX_COST: u64 = 200;

/// The largest token verified (base64 text) and the most blocks it may have: biscuit checks
/// every block's signature, and builds the engine over all of them, before any check of ours
/// runs. Tokens minted here take a few hundred bytes, an attenuation a few hundred more.
const MAX_TOKEN_BYTES: usize = 16 * 1024;
const MAX_TOKEN_BLOCKS: usize = 16;

/// The longest lifetime [`TokenAuthority::mint`] gives a token.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Verified tokens remembered per node (a few hundred bytes each).
const VERIFIED_CACHE_CAPACITY: usize = 16_384;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read or create the root key at {path}: {source}")]
    KeyFile {
        path: String,
        source: std::io::Error,
    },
    #[error("the root key file {0} is not a valid key")]
    BadKeyFile(String),
    #[error(
        "invalid scope {0:?}: expected `*`, `read:<type>`, `write:<type>`, `read:*`, `write:*` or `admin`"
    )]
    BadScope(String),
    #[error("a token may live at most 100 years")]
    TtlTooLong,
    #[error("invalid subject {0:?}: expected a DID (did:<method>:<id>)")]
    BadSubject(String),
    #[error("token could not be built: {0}")]
    Mint(berror::Token),
    #[error("token context could not be encoded: {0}")]
    MintContext(serde_json::Error),
    /// The token is malformed or not signed by this node's key.
    #[error("invalid token")]
    Invalid,
    /// The token is genuine, but a check in it (an attenuation) rejects this request.
    #[error("the token's own checks reject this request")]
    Restricted,
    #[error("token expired")]
    Expired,
    /// Revoked: its grant (consent withdrawn, refresh token replayed) or the token itself.
    #[error("token revoked")]
    Revoked,
    /// Its checks and rules would join more facts than one verification may ([`MAX_DATALOG_COST`]).
    #[error("the token's checks are too costly to evaluate")]
    TooComplex,
}

/// What a token lets its holder do.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Every document operation on every type (`*`); not administration.
    All,
    Read(TypeSelector),
    Write(TypeSelector),
    /// Administration of the node (`admin`): index governance. Only granted by name.
    Admin,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum TypeSelector {
    Any,
    Type(String),
}

/// The access a request needs, also given to the token's own checks as request facts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Admin,
    /// Managing the account itself (consents, key export): first-party tokens only, and an
    /// attenuation that limits operations (`check if operation("read")`) excludes it.
    Account,
}

impl Access {
    fn as_str(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::Admin => "admin",
            Access::Account => "account",
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = AuthError;
    fn from_str(s: &str) -> Result<Self, AuthError> {
        if s == "*" {
            return Ok(Scope::All);
        }
        if s == "admin" {
            return Ok(Scope::Admin);
        }
        let bad = || AuthError::BadScope(s.to_owned());
        let (access, target) = s.split_once(':').ok_or_else(bad)?;
        let selector = match target {
            "*" => TypeSelector::Any,
            t if crate::doc_type::is_valid(t) => TypeSelector::Type(t.to_owned()),
            _ => return Err(bad()),
        };
        match access {
            "read" => Ok(Scope::Read(selector)),
            "write" => Ok(Scope::Write(selector)),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (access, selector) = match self {
            Scope::All => return f.write_str("*"),
            Scope::Admin => return f.write_str("admin"),
            Scope::Read(s) => ("read", s),
            Scope::Write(s) => ("write", s),
        };
        match selector {
            TypeSelector::Any => write!(f, "{access}:*"),
            TypeSelector::Type(t) => write!(f, "{access}:{t}"),
        }
    }
}

/// A verified token's contents.
#[derive(Debug, Clone)]
pub struct Claims {
    pub subject: String,
    /// Sorted, without duplicates.
    pub scopes: Vec<Scope>,
    pub expires_at: SystemTime,
    /// The OAuth client the token was issued to (None: a first-party token, e.g. minted by the
    /// operator or issued by `POST /v1/sessions`).
    pub client: Option<String>,
    /// The authorization grant the token descends from (OAuth tokens only).
    pub grant: Option<uuid::Uuid>,
    /// OpenID scopes granted alongside (`openid`, `profile`, `offline_access`).
    pub identity_scopes: Vec<String>,
    /// The authority block's revocation id (hex): names the token and all its attenuations.
    pub token_id: String,
}

impl Claims {
    /// Does any scope grant `access` to documents of `doc_type`?
    pub fn permits(&self, access: Access, doc_type: &str) -> bool {
        self.scopes.iter().any(|scope| {
            let selector = match (scope, access) {
                (Scope::Admin, Access::Admin) => return true,
                (_, Access::Admin | Access::Account) | (Scope::Admin, _) => return false,
                (Scope::All, _) => return true,
                (Scope::Read(s), Access::Read) | (Scope::Write(s), Access::Write) => s,
                _ => return false,
            };
            match selector {
                // Writing a reserved type is the server acting for the subject (issuing a
                // certificate is signing a statement with their key): an app given `write:*`
                // for the user's documents gets it only by naming the type.
                TypeSelector::Any => {
                    access != Access::Write || !vibe_actors::doc_type::is_reserved(doc_type)
                }
                TypeSelector::Type(t) => t == doc_type,
            }
        })
    }
}

/// What an OAuth access token carries beyond subject and document scopes.
#[derive(Debug, Clone)]
pub struct Issued<'a> {
    pub client: &'a str,
    pub grant: uuid::Uuid,
    pub identity_scopes: &'a [String],
}

/// The node's token root key: mints and verifies tokens.
pub struct TokenAuthority {
    keypair: KeyPair,
    /// The root key as Ed25519 verifies it, for [`minted::verify_first_sight`] (None for a
    /// P-256 or a weak root key: such tokens verify in full).
    root: Option<ed25519_dalek::VerifyingKey>,
    /// Derives the proof keys of the tokens this node mints.
    proofs: ProofKey,
    revocations: Arc<Revocations>,
    /// Verified single-block tokens. Such a token is signed by this node and was minted by
    /// [`TokenAuthority::mint_until`], so its only check is the expiry, which every hit re-checks:
    /// its verdict cannot depend on the request. Attenuated tokens (more blocks) carry checks
    /// over request facts and are verified in full every time.
    verified: quick_cache::sync::Cache<String, Arc<Claims>>,
}

impl fmt::Debug for TokenAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the private key.
        f.debug_struct("TokenAuthority")
            .field("public_key", &self.keypair.public().to_bytes_hex())
            .finish_non_exhaustive()
    }
}

impl TokenAuthority {
    fn new(keypair: KeyPair) -> Self {
        // A weak (small-order) root key would make `verify` accept what `verify_strict` refuses
        // (`minted::Unattenuated::signature_holds`); no generated key is weak.
        let root = ed25519_dalek::VerifyingKey::try_from(keypair.public().to_bytes().as_slice())
            .ok()
            .filter(|key| !key.is_weak());
        Self {
            proofs: ProofKey::new(&keypair.private()),
            root,
            keypair,
            revocations: Arc::default(),
            verified: quick_cache::sync::Cache::new(VERIFIED_CACHE_CAPACITY),
        }
    }

    /// Loads `<data_dir>/keys/root.key`, creating it (mode 0600, folder 0700) on first run.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, AuthError> {
        let path = data_dir.join(ROOT_KEY_FILE);
        let io_err = |source| AuthError::KeyFile {
            path: path.display().to_string(),
            source,
        };
        match read_secret(&path) {
            Ok(text) => {
                let private = text
                    .trim()
                    .parse::<PrivateKey>()
                    .map_err(|_| AuthError::BadKeyFile(path.display().to_string()))?;
                Ok(Self::new(KeyPair::from(&private)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let keypair = KeyPair::new();
                write_secret(&path, keypair.private().to_prefixed_string().as_bytes())
                    .map_err(io_err)?;
                tracing::info!(path = %path.display(), "created token root key");
                Ok(Self::new(keypair))
            }
            Err(e) => Err(io_err(e)),
        }
    }

    /// The key that verifies this node's tokens; holders need it to attenuate offline.
    pub fn public_key(&self) -> biscuit_auth::PublicKey {
        self.keypair.public()
    }

    /// The revocation list every verification consults.
    pub fn revocations(&self) -> &Arc<Revocations> {
        &self.revocations
    }

    /// Mints a token for `subject` with `scopes`, valid for `ttl` from now.
    pub fn mint(
        &self,
        subject: &str,
        scopes: &[Scope],
        ttl: Duration,
    ) -> Result<String, AuthError> {
        // `vibe token mint --ttl` takes any duration; configured ones are at most 100 years.
        let expires_at = SystemTime::now()
            .checked_add(ttl)
            .filter(|_| ttl <= MAX_TOKEN_TTL)
            .ok_or(AuthError::TtlTooLong)?;
        self.mint_until(subject, scopes, expires_at)
    }

    /// Mints a token valid until `expires_at` (biscuit dates have one-second resolution).
    pub fn mint_until(
        &self,
        subject: &str,
        scopes: &[Scope],
        expires_at: SystemTime,
    ) -> Result<String, AuthError> {
        self.mint_issued(subject, scopes, expires_at, None)
            .map(|(token, _)| token)
    }

    /// Mints a token, with the OAuth facts when `issued` is given; returns it and its
    /// revocation id.
    pub fn mint_issued(
        &self,
        subject: &str,
        scopes: &[Scope],
        expires_at: SystemTime,
        issued: Option<&Issued<'_>>,
    ) -> Result<(String, String), AuthError> {
        if !is_did(subject) {
            return Err(AuthError::BadSubject(subject.to_owned()));
        }
        let mut scopes = scopes.to_vec();
        scopes.sort();
        scopes.dedup();
        let mut identity_scopes: Vec<String> = issued
            .map(|i| i.identity_scopes.to_vec())
            .unwrap_or_default();
        identity_scopes.sort();
        identity_scopes.dedup();
        // Biscuit dates have one-second resolution.
        let expires_secs = expires_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // Every block this root key signs with a nonce in its context names the key pair derived
        // from that nonce as its next key: `minted::verify_first_sight` relies on it.
        let nonce = ProofKey::nonce();
        let next_key_pair = self.proofs.next_key_pair(&nonce)?;
        let context = MintedContext {
            v: MintedContext::VERSION,
            sub: subject.to_owned(),
            exp: expires_secs,
            scopes: scopes.iter().map(Scope::to_string).collect(),
            client: issued.map(|i| i.client.to_owned()),
            grant: issued.map(|i| i.grant),
            identity_scopes: identity_scopes.clone(),
            n: Some(nonce),
        };
        let context = serde_json::to_string(&context).map_err(AuthError::MintContext)?;
        let mut builder = Biscuit::builder()
            .context(context)
            .fact(fact("sub", &[string(subject)]))
            .and_then(|b| b.fact(fact("exp", &[date(&expires_at)])))
            .and_then(|b| {
                b.code_with_params(
                    "check if time($t), $t <= {exp}",
                    std::collections::HashMap::from([("exp".to_owned(), date(&expires_at))]),
                    Default::default(),
                )
            })
            .map_err(AuthError::Mint)?;
        for scope in &scopes {
            builder = builder
                .fact(fact("scope", &[string(&scope.to_string())]))
                .map_err(AuthError::Mint)?;
        }
        if let Some(issued) = issued {
            builder = builder
                .fact(fact("client", &[string(issued.client)]))
                .and_then(|b| b.fact(fact("grant", &[string(&issued.grant.to_string())])))
                .map_err(AuthError::Mint)?;
            for s in issued.identity_scopes {
                builder = builder
                    .fact(fact("identity_scope", &[string(s)]))
                    .map_err(AuthError::Mint)?;
            }
        }
        let token = builder
            .build_with_key_pair(&self.keypair, SymbolTable::default(), &next_key_pair)
            .map_err(AuthError::Mint)?;
        let id = token_id(&token)?;
        let encoded = token.to_base64().map_err(AuthError::Mint)?;
        // This node knows exactly what it just minted: remembered now, the token's first use
        // here skips the signature checks and Datalog (its claims are what verification would
        // read; `minted_claims_match_verified_claims` holds them together).
        let claims = Claims {
            subject: subject.to_owned(),
            scopes,
            expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(expires_secs),
            client: issued.map(|i| i.client.to_owned()),
            grant: issued.map(|i| i.grant),
            identity_scopes,
            token_id: id.clone(),
        };
        self.verified.insert(encoded.clone(), Arc::new(claims));
        Ok((encoded, id))
    }

    /// Verifies `token` for a request needing `access` to `doc_type` (None: no type involved).
    pub fn verify(
        &self,
        token: &str,
        access: Access,
        doc_type: Option<&str>,
    ) -> Result<Arc<Claims>, AuthError> {
        self.verify_at(token, access, doc_type, SystemTime::now())
    }

    /// [`TokenAuthority::verify`] as of `now`.
    pub fn verify_at(
        &self,
        token: &str,
        access: Access,
        doc_type: Option<&str>,
        now: SystemTime,
    ) -> Result<Arc<Claims>, AuthError> {
        if let Some(claims) = self.remembered(token, now) {
            return claims;
        }
        if let Some(claims) = self.first_sight_of_minted(token, now) {
            return claims;
        }
        let biscuit = self.parse(token)?;
        let claims = match context_claims(&biscuit, now) {
            Some(claims) => claims?,
            None => self.authorize(&biscuit, now, access, doc_type)?,
        };
        let claims = Arc::new(claims);
        self.check_revoked(&claims)?;
        if biscuit.block_count() == 1 {
            self.verified.insert(token.to_owned(), claims.clone());
        }
        Ok(claims)
    }

    /// Does `token` carry appended blocks (an attenuation), whose checks may stop passing with
    /// time alone? Only decides how often a holder of long-lived access re-checks it: a token
    /// that is not even well-formed counts as attenuated.
    pub fn is_attenuated(&self, token: &str) -> bool {
        if self.verified.get(token).is_some() {
            // Only single-block tokens are remembered.
            return false;
        }
        biscuit_auth::UnverifiedBiscuit::from_base64(token)
            .ok()
            .is_none_or(|b| b.block_count() > 1)
    }

    /// The scopes of `token` (whose claims are `claims`) that its own checks let it use now:
    /// what introspection may call active. A token without appended blocks keeps them all; an
    /// attenuated one keeps each scope its checks pass for, tried with the access it names and
    /// its type (a wildcard without one, so a check naming a type drops it: the answer may say
    /// less than the token can do, never more). `*` narrows to `read:*` or `write:*` when only
    /// one of them passes.
    pub fn usable_scopes(&self, token: &str, claims: &Claims) -> Vec<Scope> {
        if !self.is_attenuated(token) {
            return claims.scopes.clone();
        }
        let passes = |access: Access, selector: &TypeSelector| {
            let doc_type = match selector {
                TypeSelector::Any => None,
                TypeSelector::Type(t) => Some(t.as_str()),
            };
            self.verify(token, access, doc_type).is_ok()
        };
        let mut usable = Vec::new();
        for scope in &claims.scopes {
            match scope {
                Scope::All => match (
                    passes(Access::Read, &TypeSelector::Any),
                    passes(Access::Write, &TypeSelector::Any),
                ) {
                    (true, true) => usable.push(Scope::All),
                    (true, false) => usable.push(Scope::Read(TypeSelector::Any)),
                    (false, true) => usable.push(Scope::Write(TypeSelector::Any)),
                    (false, false) => {}
                },
                Scope::Read(s) if passes(Access::Read, s) => usable.push(scope.clone()),
                Scope::Write(s) if passes(Access::Write, s) => usable.push(scope.clone()),
                Scope::Admin if self.verify(token, Access::Admin, None).is_ok() => {
                    usable.push(Scope::Admin);
                }
                _ => {}
            }
        }
        usable.sort();
        usable.dedup();
        usable
    }

    /// Checks signature and expiry and reads the claims, without running the checks of
    /// appended blocks (they depend on each request; [`TokenAuthority::verify`] runs them).
    pub fn identify(&self, token: &str) -> Result<Arc<Claims>, AuthError> {
        self.identify_at(token, SystemTime::now())
    }

    /// [`TokenAuthority::identify`] at `now`.
    fn identify_at(&self, token: &str, now: SystemTime) -> Result<Arc<Claims>, AuthError> {
        if let Some(claims) = self.remembered(token, now) {
            return claims;
        }
        if let Some(claims) = self.first_sight_of_minted(token, now) {
            return claims;
        }
        let biscuit = self.parse(token)?;
        let claims = match context_claims(&biscuit, now) {
            Some(claims) => claims?,
            None => match self.authorize(&biscuit, now, Access::Read, None) {
                Ok(claims) => claims,
                Err(AuthError::Restricted) => self.claims_unchecked(&biscuit, now)?,
                Err(e) => return Err(e),
            },
        };
        self.check_revoked(&claims)?;
        Ok(Arc::new(claims))
    }

    /// `token` parsed and its signatures checked, once it is known to be of a size and a
    /// number of blocks worth checking ([`MAX_TOKEN_BYTES`], [`MAX_TOKEN_BLOCKS`]).
    fn parse(&self, token: &str) -> Result<Biscuit, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooComplex);
        }
        // Decoding without the signatures is cheap; checking each block's is not.
        let blocks = biscuit_auth::UnverifiedBiscuit::from_base64(token)
            .map_err(|_| AuthError::Invalid)?
            .block_count();
        if blocks > MAX_TOKEN_BLOCKS {
            return Err(AuthError::TooComplex);
        }
        Biscuit::from_base64(token, self.keypair.public()).map_err(|_| AuthError::Invalid)
    }

    /// The claims of a token verified before (None: not remembered). Its only check, the
    /// expiry, is made again; an expired token is forgotten, so it stops taking a place in the
    /// bounded cache. Revocation is checked on every use.
    fn remembered(&self, token: &str, now: SystemTime) -> Option<Result<Arc<Claims>, AuthError>> {
        let claims = self.verified.get(token)?;
        if claims.expires_at < now {
            self.verified.remove(token);
            return Some(Err(AuthError::Expired));
        }
        Some(self.check_revoked(&claims).map(|()| claims))
    }

    /// A first sight of one of this node's unattenuated tokens, verified and remembered (its
    /// only check is the expiry, re-checked on every hit); None for a token that needs
    /// biscuit's full verification.
    fn first_sight_of_minted(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Option<Result<Arc<Claims>, AuthError>> {
        let root = self.root.as_ref()?;
        let FirstSight::Minted(claims) = minted::verify_first_sight(token, root, &self.proofs, now)
        else {
            return None;
        };
        Some(claims.and_then(|claims| {
            let claims = Arc::new(claims);
            self.check_revoked(&claims)?;
            self.verified.insert(token.to_owned(), claims.clone());
            Ok(claims)
        }))
    }

    fn check_revoked(&self, claims: &Claims) -> Result<(), AuthError> {
        if self.revocations.is_revoked(claims.grant, &claims.token_id) {
            return Err(AuthError::Revoked);
        }
        Ok(())
    }

    fn claims_unchecked(&self, biscuit: &Biscuit, now: SystemTime) -> Result<Claims, AuthError> {
        let mut authorizer = biscuit_auth::AuthorizerBuilder::new()
            .fact(fact("time", &[date(&now)]))
            .map_err(|_| AuthError::Invalid)?
            .set_limits(LIMITS)
            .build(biscuit)
            .map_err(|_| AuthError::Invalid)?;
        within_budget(&authorizer)?;
        read_claims(biscuit, &mut authorizer, now)
    }

    fn authorize(
        &self,
        biscuit: &Biscuit,
        now: SystemTime,
        access: Access,
        doc_type: Option<&str>,
    ) -> Result<Claims, AuthError> {
        let mut facts: Vec<Fact> = vec![
            fact("time", &[date(&now)]),
            fact("operation", &[string(access.as_str())]),
        ];
        if let Some(t) = doc_type {
            facts.push(fact("doc_type", &[string(t)]));
        }
        let mut builder = biscuit_auth::AuthorizerBuilder::new();
        for f in facts {
            builder = builder.fact(f).map_err(|_| AuthError::Invalid)?;
        }
        let mut authorizer = builder
            .policy(ALLOW_ALL.clone())
            .map_err(|_| AuthError::Invalid)?
            .set_limits(LIMITS)
            .build(biscuit)
            .map_err(|_| AuthError::Invalid)?;
        within_budget(&authorizer)?;
        let claims = read_claims(biscuit, &mut authorizer, now)?;
        authorizer.authorize().map_err(|_| AuthError::Restricted)?;
        Ok(claims)
    }
}

/// Refuses a token whose Datalog would cost more than [`MAX_DATALOG_COST`] before any of it runs.
fn within_budget(authorizer: &biscuit_auth::Authorizer) -> Result<(), AuthError> {
    let (facts, rules, checks, _) = authorizer.dump();
    if datalog_cost(&facts, &rules, &checks) > MAX_DATALOG_COST {
        return Err(AuthError::TooComplex);
    }
    Ok(())
}

/// An upper bound of the fact combinations the engine may try for these rules and checks, each
/// weighted by the expression it evaluates per combination. A body's combinations are the
/// product, over its predicates, of the facts that can match each one (name and arity); a
/// predicate that rules derive can match up to `LIMITS.max_facts`, and rules run up to
/// `LIMITS.max_iterations` times.
fn datalog_cost(facts: &[Fact], rules: &[Rule], checks: &[biscuit_auth::builder::Check]) -> u64 {
    use std::collections::HashMap;
    let mut matching: HashMap<(&str, usize), u64> = HashMap::new();
    for f in facts {
        *matching
            .entry((f.predicate.name.as_str(), f.predicate.terms.len()))
            .or_default() += 1;
    }
    for r in rules {
        matching.insert((r.head.name.as_str(), r.head.terms.len()), LIMITS.max_facts);
    }
    let body_cost = |r: &Rule| -> u64 {
        let combinations = r.body.iter().fold(1u64, |n, p| {
            let facts = matching
                .get(&(p.name.as_str(), p.terms.len()))
                .copied()
                .unwrap_or(0);
            n.saturating_mul(facts.max(1))
        });
        let ops = r.expressions.iter().try_fold(0u64, |n, e| {
            Some(n.saturating_add(expression_cost(&e.ops)?))
        });
        match ops {
            Some(ops) => combinations.saturating_mul(1 + ops),
            None => u64::MAX,
        }
    };
    let checks_cost = checks
        .iter()
        .flat_map(|c| &c.queries)
        .fold(0u64, |n, q| n.saturating_add(body_cost(q)));
    let rules_cost = rules.iter().fold(0u64, |n, r| {
        n.saturating_add(body_cost(r).saturating_mul(LIMITS.max_iterations))
    });
    checks_cost.saturating_add(rules_cost)
}

/// The work of an expression: its operations, the bodies of its closures included (`&&` and `||`
/// keep their right side in one, run at most once), a regular expression weighted by
/// [`REGEX_COST`]. None when it iterates a set with a closure (`.any()`, `.all()`): the body runs
/// once per element, and nested ones multiply — a few hundred bytes of token asked for billions
/// of evaluations, inside one check, where biscuit's time limit never looks.
fn expression_cost(ops: &[Op]) -> Option<u64> {
    use biscuit_auth::builder::Binary;
    ops.iter().try_fold(0u64, |cost, op| {
        let this = match op {
            Op::Closure(_, body) => expression_cost(body)?,
            Op::Binary(Binary::Any | Binary::All) => return None,
            Op::Binary(Binary::Regex) => REGEX_COST,
            _ => 1,
        };
        Some(cost.saturating_add(this))
    })
}

/// The claims of a verified token from its context, as of `now`; None when they must come
/// from Datalog instead. Only an unattenuated token qualifies: its one block was signed by this
/// node's key, so this node minted it, and its only check (the expiry) is the one made here.
/// Appended blocks carry checks that need the engine.
fn context_claims(biscuit: &Biscuit, now: SystemTime) -> Option<Result<Claims, AuthError>> {
    if biscuit.block_count() != 1 {
        return None;
    }
    let context = biscuit.context().into_iter().next().flatten()?;
    let minted = MintedContext::parse(&context)?;
    Some(token_id(biscuit).and_then(|id| minted.into_claims(id, now)))
}

/// The queries that read a token's claims, `data($v) <- NAME($v)` for each claim fact, built
/// once: parsing their text again on every first sight was a measurable share of it.
struct ClaimQueries {
    exp: Rule,
    sub: Rule,
    scope: Rule,
    client: Rule,
    grant: Rule,
    identity_scope: Rule,
}

/// `allow if true`, built once for the same reason.
static ALLOW_ALL: LazyLock<Policy> = LazyLock::new(|| Policy {
    queries: vec![Rule::new(
        pred("query", &[] as &[Term]),
        vec![],
        vec![Expression {
            ops: vec![Op::Value(Term::Bool(true))],
        }],
        vec![],
    )],
    kind: PolicyKind::Allow,
});

static CLAIM_QUERIES: LazyLock<ClaimQueries> = LazyLock::new(|| {
    let query = |name: &str| rule("data", &[var("v")], &[pred(name, &[var("v")])]);
    ClaimQueries {
        exp: query("exp"),
        sub: query("sub"),
        scope: query("scope"),
        client: query("client"),
        grant: query("grant"),
        identity_scope: query("identity_scope"),
    }
});

/// Subject, scopes and expiry from the authority block (queries see only trusted facts).
fn read_claims(
    biscuit: &Biscuit,
    authorizer: &mut biscuit_auth::Authorizer,
    now: SystemTime,
) -> Result<Claims, AuthError> {
    let expires: Vec<(SystemTime,)> = authorizer
        .query(CLAIM_QUERIES.exp.clone())
        .map_err(|_| AuthError::Invalid)?;
    let expires_at = match expires.as_slice() {
        [(t,)] => *t,
        _ => return Err(AuthError::Invalid),
    };
    if expires_at < now {
        return Err(AuthError::Expired);
    }
    let subjects: Vec<(String,)> = authorizer
        .query(CLAIM_QUERIES.sub.clone())
        .map_err(|_| AuthError::Invalid)?;
    let subject = match subjects.as_slice() {
        [(s,)] => s.clone(),
        _ => return Err(AuthError::Invalid),
    };
    let raw_scopes: Vec<(String,)> = authorizer
        .query(CLAIM_QUERIES.scope.clone())
        .map_err(|_| AuthError::Invalid)?;
    let mut scopes = raw_scopes
        .into_iter()
        .map(|(s,)| s.parse())
        .collect::<Result<Vec<Scope>, _>>()
        .map_err(|_| AuthError::Invalid)?;
    scopes.sort();
    scopes.dedup();
    let clients: Vec<(String,)> = authorizer
        .query(CLAIM_QUERIES.client.clone())
        .map_err(|_| AuthError::Invalid)?;
    let grants: Vec<(String,)> = authorizer
        .query(CLAIM_QUERIES.grant.clone())
        .map_err(|_| AuthError::Invalid)?;
    let (client, grant) = match (clients.as_slice(), grants.as_slice()) {
        ([], []) => (None, None),
        ([(c,)], [(g,)]) => (
            Some(c.clone()),
            Some(g.parse().map_err(|_| AuthError::Invalid)?),
        ),
        _ => return Err(AuthError::Invalid),
    };
    let identity_scopes: Vec<(String,)> = authorizer
        .query(CLAIM_QUERIES.identity_scope.clone())
        .map_err(|_| AuthError::Invalid)?;
    let mut identity_scopes: Vec<String> = identity_scopes.into_iter().map(|(s,)| s).collect();
    identity_scopes.sort();
    Ok(Claims {
        subject,
        scopes,
        expires_at,
        client,
        grant,
        identity_scopes,
        token_id: token_id(biscuit)?,
    })
}

/// The authority block's revocation id, hex.
fn token_id(biscuit: &Biscuit) -> Result<String, AuthError> {
    biscuit
        .revocation_identifiers()
        .first()
        .map(hex::encode)
        .ok_or(AuthError::Invalid)
}

/// Reads a secret file, refusing one that its group or others may read or write, as sshd and
/// PostgreSQL refuse such a private key: a key copied in with `cp` under a default umask
/// (0644) would otherwise go on working while anyone on the machine can take it. The mode is
/// read from the open file, so it is the mode of what was read.
pub(crate) fn read_secret(path: &Path) -> std::io::Result<zeroize::Zeroizing<String>> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let mut file = std::fs::File::open(path)?;
    let mode = file.metadata()?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "its mode is {mode:04o}: group or others may read or write it; \
                 `chmod 600` it (and, were others able to read it, make a new one)"
            ),
        ));
    }
    let mut text = zeroize::Zeroizing::new(String::new());
    file.read_to_string(&mut text)?;
    Ok(text)
}

/// Writes a secret file readable by its owner only, creating its folder with mode 0700.
pub(crate) fn write_secret(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use biscuit_auth::macros::block;

    const ALICE: &str = "did:key:zAlice";

    fn authority() -> (tempfile::TempDir, TokenAuthority) {
        let dir = tempfile::tempdir().unwrap();
        let auth = TokenAuthority::load_or_create(dir.path()).unwrap();
        (dir, auth)
    }

    #[test]
    fn the_prebuilt_policy_and_queries_are_what_their_text_says() {
        assert_eq!(*ALLOW_ALL, Policy::try_from("allow if true").unwrap());
        let q = &*CLAIM_QUERIES;
        for (built, text) in [
            (&q.exp, "data($v) <- exp($v)"),
            (&q.sub, "data($v) <- sub($v)"),
            (&q.scope, "data($v) <- scope($v)"),
            (&q.client, "data($v) <- client($v)"),
            (&q.grant, "data($v) <- grant($v)"),
            (&q.identity_scope, "data($v) <- identity_scope($v)"),
        ] {
            assert_eq!(*built, Rule::try_from(text).unwrap());
        }
    }

    #[test]
    fn key_is_created_once_with_tight_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, auth) = authority();
        let meta = std::fs::metadata(dir.path().join(ROOT_KEY_FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let again = TokenAuthority::load_or_create(dir.path()).unwrap();
        let token = auth
            .mint(ALICE, &[Scope::All], Duration::from_secs(60))
            .unwrap();
        assert!(again.verify(&token, Access::Read, Some("posts")).is_ok());
    }

    #[test]
    fn a_lifetime_past_a_century_is_refused_not_a_panic() {
        let (_dir, auth) = authority();
        for ttl in [Duration::MAX, MAX_TOKEN_TTL + Duration::from_secs(1)] {
            assert!(matches!(
                auth.mint(ALICE, &[Scope::All], ttl),
                Err(AuthError::TtlTooLong)
            ));
        }
        assert!(auth.mint(ALICE, &[Scope::All], MAX_TOKEN_TTL).is_ok());
    }

    #[test]
    fn a_key_file_others_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, _auth) = authority();
        let path = dir.path().join(ROOT_KEY_FILE);
        for mode in [0o644, 0o640, 0o604, 0o620] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let error = TokenAuthority::load_or_create(dir.path()).unwrap_err();
            assert!(
                matches!(&error, AuthError::KeyFile { source, .. }
                    if source.kind() == std::io::ErrorKind::PermissionDenied),
                "{mode:o}: {error}"
            );
            let message = error.to_string();
            assert!(message.contains(&format!("{mode:04o}")), "{message}");
            assert!(message.contains("chmod 600"), "{message}");
        }
        // The owner's own bits are the owner's business; 0400 is tighter still.
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert!(
                TokenAuthority::load_or_create(dir.path()).is_ok(),
                "{mode:o}"
            );
        }
    }

    #[test]
    fn round_trip_and_scopes() {
        let (_dir, auth) = authority();
        let scopes = vec!["write:*".parse().unwrap(), "read:posts".parse().unwrap()];
        let token = auth.mint(ALICE, &scopes, Duration::from_secs(60)).unwrap();
        let mut scopes = scopes;
        scopes.sort();
        let claims = auth.verify(&token, Access::Read, Some("posts")).unwrap();
        assert_eq!(claims.subject, ALICE);
        assert_eq!(claims.scopes, scopes);
        assert!(claims.permits(Access::Read, "posts"));
        assert!(!claims.permits(Access::Read, "notes"));
        assert!(claims.permits(Access::Write, "notes"));
        // `write:*` stops short of the server's own types: those are named to be granted.
        assert!(!claims.permits(Access::Write, "vibe.certificate"));
        let named = Claims {
            scopes: vec!["write:vibe.certificate".parse().unwrap()],
            ..(*claims).clone()
        };
        assert!(named.permits(Access::Write, "vibe.certificate"));
        let all = Claims {
            scopes: vec![Scope::All],
            ..(*claims).clone()
        };
        assert!(all.permits(Access::Write, "vibe.certificate"));
    }

    #[test]
    fn expired_forged_and_garbage_tokens_fail() {
        let (_dir, auth) = authority();
        let (_dir2, other) = authority();
        let expired = auth
            .mint_until(
                ALICE,
                &[Scope::All],
                SystemTime::now() - Duration::from_secs(5),
            )
            .unwrap();
        assert!(matches!(
            auth.verify(&expired, Access::Read, None),
            Err(AuthError::Expired)
        ));
        let forged = other
            .mint(ALICE, &[Scope::All], Duration::from_secs(60))
            .unwrap();
        assert!(matches!(
            auth.verify(&forged, Access::Read, None),
            Err(AuthError::Invalid)
        ));
        assert!(matches!(
            auth.verify("not-a-token", Access::Read, None),
            Err(AuthError::Invalid)
        ));
    }

    #[test]
    fn attenuation_narrows_but_never_widens() {
        let (_dir, auth) = authority();
        let token = auth
            .mint(
                ALICE,
                &["read:posts".parse().unwrap()],
                Duration::from_secs(60),
            )
            .unwrap();
        let biscuit = Biscuit::from_base64(&token, auth.keypair.public()).unwrap();
        let narrowed = biscuit
            .append(block!(
                r#"check if operation("read"), doc_type("posts"); scope("*");"#
            ))
            .unwrap()
            .to_base64()
            .unwrap();
        let appended = Biscuit::from_base64(&narrowed, auth.keypair.public()).unwrap();
        assert!(
            context_claims(&appended, SystemTime::now()).is_none(),
            "an attenuated token's checks need Datalog"
        );
        let claims = auth.verify(&narrowed, Access::Read, Some("posts")).unwrap();
        // The appended `scope("*")` is not trusted: only the authority's scopes count.
        assert_eq!(claims.scopes, vec!["read:posts".parse::<Scope>().unwrap()]);
        assert!(matches!(
            auth.verify(&narrowed, Access::Read, Some("notes")),
            Err(AuthError::Restricted)
        ));
        assert!(matches!(
            auth.verify(&narrowed, Access::Write, Some("posts")),
            Err(AuthError::Restricted)
        ));
    }

    /// A check joining four predicates over 200 appended facts would try 1.6e9 combinations,
    /// and biscuit's time limit is looked at only between checks: it is refused before it runs.
    /// The same facts under a one-predicate check stay cheap and are evaluated.
    #[test]
    fn a_costly_attenuation_is_refused_before_it_runs() {
        let (_dir, auth) = authority();
        let token = auth
            .mint(ALICE, &[Scope::All], Duration::from_secs(60))
            .unwrap();
        let biscuit = Biscuit::from_base64(&token, auth.keypair.public()).unwrap();
        let with_facts = |check: &str| {
            let mut block = biscuit_auth::BlockBuilder::new();
            for i in 0..200 {
                block = block
                    .fact(fact("f", &[biscuit_auth::builder::int(i)]))
                    .unwrap();
            }
            let block = block.code(check).unwrap();
            biscuit.append(block).unwrap().to_base64().unwrap()
        };
        let costly = with_facts("check if f($a), f($b), f($c), f($d), $a == -1");
        assert!(matches!(
            auth.verify(&costly, Access::Read, Some("posts")),
            Err(AuthError::TooComplex)
        ));
        assert!(matches!(auth.identify(&costly), Err(AuthError::TooComplex)));
        let cheap = with_facts("check if f($a), $a == 7");
        assert!(auth.verify(&cheap, Access::Read, Some("posts")).is_ok());
        // A set iterated by a closure runs its body per element, nested ones multiply, all inside
        // one check: refused, however few facts.
        let attenuate = |code: &str| {
            let block = biscuit_auth::BlockBuilder::new().code(code).unwrap();
            biscuit.append(block).unwrap().to_base64().unwrap()
        };
        let set: Vec<String> = (0..200).map(|i| i.to_string()).collect();
        let set = format!("{{{}}}", set.join(","));
        let nested = attenuate(&format!(
            "check if {set}.any($a -> {set}.any($b -> {set}.any($c -> $c == -1)))"
        ));
        assert!(matches!(
            auth.verify(&nested, Access::Read, Some("posts")),
            Err(AuthError::TooComplex)
        ));
        assert!(matches!(auth.identify(&nested), Err(AuthError::TooComplex)));
        // Lazy `&&` / `||` keep a closure too, run once: counted, and cheap.
        let lazy = attenuate(r#"check if time($t), $t > 2020-01-01T00:00:00Z && true || false"#);
        assert!(auth.verify(&lazy, Access::Read, Some("posts")).is_ok());
        // More blocks than any attenuation needs: refused before their signatures are checked.
        let mut many = biscuit.clone();
        for _ in 0..MAX_TOKEN_BLOCKS {
            many = many
                .append(
                    biscuit_auth::BlockBuilder::new()
                        .code("check if true")
                        .unwrap(),
                )
                .unwrap();
        }
        let many = many.to_base64().unwrap();
        assert!(matches!(
            auth.verify(&many, Access::Read, Some("posts")),
            Err(AuthError::TooComplex)
        ));
        let oversized = format!("{cheap}{}", "A".repeat(MAX_TOKEN_BYTES));
        assert!(matches!(
            auth.verify(&oversized, Access::Read, Some("posts")),
            Err(AuthError::TooComplex)
        ));
        let failing = with_facts("check if f($a), $a == -1");
        assert!(matches!(
            auth.verify(&failing, Access::Read, Some("posts")),
            Err(AuthError::Restricted)
        ));
    }

    #[test]
    fn rules_are_costed_at_their_iteration_budget() {
        let one = |name: &str| pred(name, &[var("x")]);
        let facts: Vec<Fact> = (0..10)
            .map(|i| fact("f", &[biscuit_auth::builder::int(i)]))
            .collect();
        let check = |body: Vec<biscuit_auth::builder::Predicate>| biscuit_auth::builder::Check {
            queries: vec![Rule::new(
                pred("query", &[] as &[Term]),
                body,
                vec![],
                vec![],
            )],
            kind: biscuit_auth::builder::CheckKind::One,
        };
        assert_eq!(datalog_cost(&facts, &[], &[check(vec![one("f")])]), 10);
        assert_eq!(
            datalog_cost(&facts, &[], &[check(vec![one("f"), one("f")])]),
            100
        );
        // A predicate nothing can match costs one attempt, not zero.
        assert_eq!(datalog_cost(&facts, &[], &[check(vec![one("g")])]), 1);
        // `g` is derived by a rule: it may match up to `max_facts`.
        let derive = Rule::new(one("g"), vec![one("f")], vec![], vec![]);
        assert_eq!(
            datalog_cost(
                &facts,
                std::slice::from_ref(&derive),
                &[check(vec![one("g")])]
            ),
            LIMITS.max_facts + 10 * LIMITS.max_iterations
        );
    }

    #[test]
    fn minted_claims_match_verified_claims() {
        let (dir, auth) = authority();
        let identity = vec![
            "profile".to_owned(),
            "openid".to_owned(),
            "openid".to_owned(),
        ];
        let issued = Issued {
            client: "app1",
            grant: uuid::Uuid::now_v7(),
            identity_scopes: &identity,
        };
        let scopes: Vec<Scope> = vec![
            "write:posts".parse().unwrap(),
            "read:posts".parse().unwrap(),
            "read:posts".parse().unwrap(),
        ];
        let until = SystemTime::now() + Duration::from_millis(60_500);
        for issued in [None, Some(&issued)] {
            let (token, _) = auth.mint_issued(ALICE, &scopes, until, issued).unwrap();
            let remembered = auth.verified.get(&token).expect("remembered at mint");
            // Another node with the same key has not seen it: full verification.
            let other = TokenAuthority::load_or_create(dir.path()).unwrap();
            assert!(other.verified.get(&token).is_none());
            let verified = other.verify(&token, Access::Read, Some("posts")).unwrap();
            assert_eq!(format!("{remembered:?}"), format!("{verified:?}"));
            // That first sight read the context; Datalog reads the same from the facts.
            let biscuit = Biscuit::from_base64(&token, auth.keypair.public()).unwrap();
            let now = SystemTime::now();
            let from_context = context_claims(&biscuit, now)
                .expect("a minted token carries its claims in its context")
                .unwrap();
            let from_facts = other
                .authorize(&biscuit, now, Access::Read, Some("posts"))
                .unwrap();
            assert_eq!(format!("{from_context:?}"), format!("{verified:?}"));
            assert_eq!(format!("{from_facts:?}"), format!("{verified:?}"));
        }
    }

    #[test]
    fn tokens_without_a_readable_context_are_read_through_datalog() {
        let (_dir, auth) = authority();
        let until = SystemTime::now() + Duration::from_secs(60);
        // What `mint` writes, with no context, a context of another version, and one that is
        // not JSON (tokens of earlier versions, or of later layouts).
        for context in [
            None,
            Some(r#"{"v":2,"sub":"did:key:zMallory","exp":1,"scopes":["*"]}"#),
            Some("not json"),
        ] {
            let mut builder = Biscuit::builder()
                .fact(fact("sub", &[string(ALICE)]))
                .unwrap()
                .fact(fact("exp", &[date(&until)]))
                .unwrap()
                .fact(fact("scope", &[string("read:posts")]))
                .unwrap()
                .code_with_params(
                    "check if time($t), $t <= {exp}",
                    std::collections::HashMap::from([("exp".to_owned(), date(&until))]),
                    Default::default(),
                )
                .unwrap();
            if let Some(c) = context {
                builder = builder.context(c.to_owned());
            }
            let token = builder.build(&auth.keypair).unwrap().to_base64().unwrap();
            let biscuit = Biscuit::from_base64(&token, auth.keypair.public()).unwrap();
            assert!(context_claims(&biscuit, SystemTime::now()).is_none());
            let claims = auth.verify(&token, Access::Read, Some("posts")).unwrap();
            assert_eq!(claims.subject, ALICE, "{context:?}");
            assert_eq!(claims.scopes, vec!["read:posts".parse::<Scope>().unwrap()]);
            assert!(claims.client.is_none());
        }
    }

    /// The token's protobuf, changed by `edit` and encoded again.
    fn tampered(
        token: &str,
        edit: impl FnOnce(&mut biscuit_auth::format::schema::Biscuit),
    ) -> String {
        use base64::Engine as _;
        use prost::Message as _;
        let b64 = base64::engine::general_purpose::URL_SAFE;
        let mut decoded =
            biscuit_auth::format::schema::Biscuit::decode(b64.decode(token).unwrap().as_slice())
                .unwrap();
        edit(&mut decoded);
        b64.encode(decoded.encode_to_vec())
    }

    /// What biscuit's own verification (every signature and the proof) and Datalog make of a
    /// token, with nothing remembered.
    fn verified_in_full(auth: &TokenAuthority, token: &str) -> Result<Claims, AuthError> {
        let biscuit =
            Biscuit::from_base64(token, auth.keypair.public()).map_err(|_| AuthError::Invalid)?;
        auth.authorize(&biscuit, SystemTime::now(), Access::Read, Some("posts"))
    }

    #[test]
    fn a_first_sight_of_a_minted_token_agrees_with_biscuit() {
        let (dir, auth) = authority();
        let identity = vec!["openid".to_owned()];
        let scopes: Vec<Scope> = vec!["read:posts".parse().unwrap()];
        let until = SystemTime::now() + Duration::from_secs(600);
        for i in 0..50 {
            let issued = Issued {
                client: "app1",
                grant: uuid::Uuid::now_v7(),
                identity_scopes: &identity,
            };
            let subject = format!("did:key:zUser{i}");
            let (token, _) = auth
                .mint_issued(&subject, &scopes, until, (i % 2 == 0).then_some(&issued))
                .unwrap();
            let fresh = TokenAuthority::load_or_create(dir.path()).unwrap();
            let root = fresh.root.as_ref().unwrap();
            let FirstSight::Minted(Ok(fast)) =
                minted::verify_first_sight(&token, root, &fresh.proofs, SystemTime::now())
            else {
                panic!("a token this key minted is verified by the first-sight path");
            };
            let full = verified_in_full(&fresh, &token).unwrap();
            assert_eq!(format!("{fast:?}"), format!("{full:?}"));
            assert!(fresh.verify(&token, Access::Read, Some("posts")).is_ok());
            assert!(fresh.verified.get(&token).is_some(), "remembered");
        }
    }

    /// What the first-sight path alone makes of a token, as this node's key sees it.
    #[derive(Debug, PartialEq)]
    enum Fast {
        Accepted,
        Refused,
        LeftToBiscuit,
    }

    fn fast(auth: &TokenAuthority, token: &str) -> Fast {
        let root = auth.root.as_ref().unwrap();
        match minted::verify_first_sight(token, root, &auth.proofs, SystemTime::now()) {
            FirstSight::Minted(Ok(_)) => Fast::Accepted,
            FirstSight::Minted(Err(_)) => Fast::Refused,
            FirstSight::Other => Fast::LeftToBiscuit,
        }
    }

    /// The token with its authority block's context rewritten by `edit` (the block re-encoded,
    /// the signature left as it was).
    fn with_context(token: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
        use prost::Message as _;
        tampered(token, |b| {
            let mut block =
                biscuit_auth::format::schema::Block::decode(b.authority.block.as_slice()).unwrap();
            let mut context: serde_json::Value =
                serde_json::from_str(block.context.as_deref().unwrap()).unwrap();
            edit(&mut context);
            block.context = Some(context.to_string());
            b.authority.block = block.encode_to_vec();
        })
    }

    #[test]
    fn a_first_sight_refuses_what_biscuit_refuses() {
        use biscuit_auth::format::schema;
        let (dir, auth) = authority();
        let (_dir2, other) = authority();
        let mint = |auth: &TokenAuthority| {
            auth.mint(
                ALICE,
                &["read:posts".parse().unwrap()],
                Duration::from_secs(600),
            )
            .unwrap()
        };
        let token = mint(&auth);
        let second = mint(&auth);
        let secret_of = |token: &str| {
            let mut secret = None;
            tampered(token, |b| secret = b.proof.content.clone());
            secret
        };
        let next_secret = |bytes: Vec<u8>| Some(schema::proof::Content::NextSecret(bytes));
        let attenuated = Biscuit::from_base64(&token, auth.keypair.public())
            .unwrap()
            .append(block!(r#"check if operation("read");"#))
            .unwrap()
            .to_base64()
            .unwrap();
        use Fast::{LeftToBiscuit, Refused};
        let forgeries = [
            // Every signed part changed in turn: the claims, the nonce, the next key, the
            // signature, the payload's version. The signature check refuses each.
            (
                "scopes widened in the context",
                with_context(&token, |c| c["scopes"] = serde_json::json!(["*"])),
                Refused,
            ),
            (
                "nonce changed",
                with_context(&second, |c| c["n"] = serde_json::json!("00")),
                Refused,
            ),
            (
                "next key changed",
                tampered(&token, |b| b.authority.next_key.key[0] ^= 1),
                Refused,
            ),
            (
                "signature changed",
                tampered(&token, |b| b.authority.signature[10] ^= 1),
                Refused,
            ),
            (
                "signed as version 1",
                tampered(&token, |b| b.authority.version = Some(1)),
                Refused,
            ),
            ("another root key", mint(&other), Refused),
            // A proof that is not the derived secret: biscuit's proof check decides.
            (
                "random proof",
                tampered(&token, |b| {
                    b.proof.content = next_secret(rand::random::<[u8; 32]>().to_vec());
                }),
                LeftToBiscuit,
            ),
            (
                "another token's proof",
                tampered(&token, |b| b.proof.content = secret_of(&second)),
                LeftToBiscuit,
            ),
            (
                "truncated proof",
                tampered(&token, |b| {
                    let Some(schema::proof::Content::NextSecret(s)) = &mut b.proof.content else {
                        unreachable!()
                    };
                    s.pop();
                }),
                LeftToBiscuit,
            ),
            (
                "empty proof",
                tampered(&token, |b| b.proof.content = next_secret(vec![])),
                LeftToBiscuit,
            ),
            // An attenuated token stripped of its appended block: its proof is that block's
            // secret, not the authority's.
            (
                "attenuation stripped",
                tampered(&attenuated, |b| b.blocks.clear()),
                LeftToBiscuit,
            ),
            // Shapes the path does not read.
            (
                "unknown version",
                tampered(&token, |b| b.authority.version = Some(7)),
                LeftToBiscuit,
            ),
            (
                "P-256 next key",
                tampered(&token, |b| {
                    b.authority.next_key.algorithm =
                        schema::public_key::Algorithm::Secp256r1 as i32;
                }),
                LeftToBiscuit,
            ),
            (
                "external signature on the authority block",
                tampered(&token, |b| {
                    b.authority.external_signature = Some(schema::ExternalSignature {
                        signature: vec![0; 64],
                        public_key: b.authority.next_key.clone(),
                    });
                }),
                LeftToBiscuit,
            ),
        ];
        for (name, forged, expected) in &forgeries {
            let fresh = TokenAuthority::load_or_create(dir.path()).unwrap();
            assert_eq!(fast(&fresh, forged), *expected, "{name}");
            assert!(
                verified_in_full(&fresh, forged).is_err(),
                "biscuit refuses: {name}"
            );
            assert!(
                matches!(
                    fresh.verify(forged, Access::Read, Some("posts")),
                    Err(AuthError::Invalid)
                ),
                "verify refuses: {name}"
            );
            assert!(fresh.identify(forged).is_err(), "identify refuses: {name}");
            assert!(
                fresh.verified.get(forged).is_none(),
                "not remembered: {name}"
            );
        }
        // Genuine tokens the path leaves to biscuit: a sealed copy (its proof is a signature),
        // the attenuated one, and a copy naming a root key id (outside the signature, so
        // biscuit accepts it: it is the same token, with the same revocation id).
        let sealed = Biscuit::from_base64(&token, auth.keypair.public())
            .unwrap()
            .seal()
            .unwrap()
            .to_base64()
            .unwrap();
        let with_key_id = tampered(&token, |b| b.root_key_id = Some(1));
        for (good, expected) in [
            (&token, Fast::Accepted),
            (&sealed, LeftToBiscuit),
            (&attenuated, LeftToBiscuit),
            (&with_key_id, LeftToBiscuit),
        ] {
            let fresh = TokenAuthority::load_or_create(dir.path()).unwrap();
            assert_eq!(fast(&fresh, good), expected);
            let claims = fresh.verify(good, Access::Read, Some("posts")).unwrap();
            assert_eq!(claims.subject, ALICE);
        }
        // Revoking the token revokes every spelling of it.
        let fresh = TokenAuthority::load_or_create(dir.path()).unwrap();
        let id = fresh
            .verify(&token, Access::Read, None)
            .unwrap()
            .token_id
            .clone();
        fresh
            .revocations()
            .apply_locally(crate::identity::revocation::Revoked::Token(id));
        for spelling in [&token, &sealed, &with_key_id] {
            assert!(matches!(fresh.identify(spelling), Err(AuthError::Revoked)));
        }
    }

    #[test]
    fn a_first_sight_reads_both_signature_payload_versions() {
        let (_dir, auth) = authority();
        let root = auth.root.as_ref().unwrap();
        let until = SystemTime::now() + Duration::from_secs(600);
        let minted = auth.mint_until(ALICE, &[Scope::All], until).unwrap();
        // A `reject if` needs Datalog 3.3, which biscuit signs with its version-1 payload.
        let nonce = ProofKey::nonce();
        let context = format!(
            r#"{{"v":1,"sub":"{ALICE}","exp":{},"scopes":["*"],"n":"{nonce}"}}"#,
            until
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        );
        let v1 = Biscuit::builder()
            .context(context)
            .fact(fact("sub", &[string(ALICE)]))
            .unwrap()
            .code("reject if false")
            .unwrap()
            .build_with_key_pair(
                &auth.keypair,
                SymbolTable::default(),
                &auth.proofs.next_key_pair(&nonce).unwrap(),
            )
            .unwrap()
            .to_base64()
            .unwrap();
        let mut versions = vec![];
        for token in [&minted, &v1] {
            tampered(token, |b| versions.push(b.authority.version.unwrap_or(0)));
            let FirstSight::Minted(Ok(claims)) =
                minted::verify_first_sight(token, root, &auth.proofs, SystemTime::now())
            else {
                panic!("verified by the first-sight path");
            };
            assert_eq!(claims.subject, ALICE);
        }
        assert_eq!(versions, [0, 1]);
    }

    /// The time now and a token for Alice (scope `*`) that expires ten seconds from it.
    fn ten_second_token(auth: &TokenAuthority) -> (SystemTime, String) {
        let now = SystemTime::now();
        let token = auth
            .mint_until(ALICE, &[Scope::All], now + Duration::from_secs(10))
            .unwrap();
        (now, token)
    }

    #[test]
    fn a_first_sight_checks_expiry_and_revocation() {
        let (dir, auth) = authority();
        let (now, token) = ten_second_token(&auth);
        let fresh = TokenAuthority::load_or_create(dir.path()).unwrap();
        assert!(matches!(
            fresh.verify_at(&token, Access::Read, None, now + Duration::from_secs(20)),
            Err(AuthError::Expired)
        ));
        let claims = fresh.verify_at(&token, Access::Read, None, now).unwrap();
        let fresh = TokenAuthority::load_or_create(dir.path()).unwrap();
        fresh
            .revocations()
            .apply_locally(crate::identity::revocation::Revoked::Token(
                claims.token_id.clone(),
            ));
        assert!(matches!(
            fresh.verify_at(&token, Access::Read, None, now),
            Err(AuthError::Revoked)
        ));
        assert!(matches!(fresh.identify(&token), Err(AuthError::Revoked)));
    }

    #[test]
    fn remembered_tokens_still_expire() {
        let (dir, auth) = authority();
        let (now, token) = ten_second_token(&auth);
        assert!(auth.verify_at(&token, Access::Read, None, now).is_ok());
        assert!(
            auth.verified.get(&token).is_some(),
            "a single-block token is remembered"
        );
        assert!(matches!(
            auth.verify_at(&token, Access::Read, None, now + Duration::from_secs(20)),
            Err(AuthError::Expired)
        ));
        assert!(
            auth.verified.get(&token).is_none(),
            "an expired token is forgotten"
        );
        // The same through `identify` (WebSocket auth, userinfo), which remembers a first sight.
        let fresh = TokenAuthority::load_or_create(dir.path()).unwrap();
        assert!(fresh.identify_at(&token, now).is_ok());
        assert!(fresh.verified.get(&token).is_some());
        assert!(matches!(
            fresh.identify_at(&token, now + Duration::from_secs(20)),
            Err(AuthError::Expired)
        ));
        assert!(
            fresh.verified.get(&token).is_none(),
            "an expired token is forgotten"
        );
    }

    #[test]
    fn scope_syntax() {
        for ok in ["*", "read:posts", "write:*", "read:chat.messages"] {
            assert_eq!(ok.parse::<Scope>().unwrap().to_string(), ok);
        }
        for bad in [
            "",
            "read",
            "read:",
            "delete:posts",
            "read:Posts",
            "write:a b",
        ] {
            assert!(bad.parse::<Scope>().is_err(), "{bad}");
        }
    }
}
