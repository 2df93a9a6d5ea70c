//! Document access control lists: their JSON shape, validation, and evaluation for one caller.
//!
//! `{"read": {"allow": [...], "deny": [...]}, "write": {...}, "create": {...}}`. An entry is a DID,
//! `"*"` (everyone), or a list of certificate predicates `[{"issuer": DID, "type": "friend-of"}]`
//! that must all hold. Any allow entry grants, any matching deny wins, the owner always has full
//! access. An absent rule grants nobody but the owner (the default ACL is owner-only).
//!
//! A predicate entry matches a caller who holds, for every predicate, a valid certificate of that
//! type from that issuer; what a caller holds is given as [`Credentials`] (loaded from the
//! database per request on the REST path, the node's [`crate::certs::CertificateBook`] in
//! realtime). Anonymous callers hold nothing.
//!
//! PostgreSQL derives summary columns (`read_public`, `read_allow_dids`, ...) from the same JSON
//! and evaluates predicates with `vibe_acl_preds_hold` (see the migrations); [`Acl`] validation
//! guarantees the shapes they read, and tests/acl_agreement.rs checks both agree.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Entries per rule list, so one document cannot make every check expensive.
pub const MAX_ENTRIES: usize = 256;
/// Predicates in one entry.
pub const MAX_PREDICATES: usize = 8;
const MAX_DID_LEN: usize = 256;

/// The operations an ACL guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Read,
    Write,
    Create,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Acl {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read: Option<Rule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write: Option<Rule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create: Option<Rule>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default, deserialize_with = "bounded_entries")]
    pub allow: Vec<Entry>,
    #[serde(default, deserialize_with = "bounded_entries")]
    pub deny: Vec<Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Everyone,
    Did(String),
    AllOf(Vec<Predicate>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Predicate {
    pub issuer: String,
    #[serde(rename = "type")]
    pub cert_type: String,
}

/// The certificates a caller holds, as ACL predicates test them.
pub trait Credentials {
    /// Does the caller hold a valid certificate of `cert_type` issued by `issuer`?
    fn holds(&self, issuer: &str, cert_type: &str) -> bool;
}

/// A caller holding no certificates (anonymous, or known to hold none).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoCredentials;

impl Credentials for NoCredentials {
    fn holds(&self, _: &str, _: &str) -> bool {
        false
    }
}

/// A caller's certificates as `(issuer, type)` pairs, loaded for one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeldCertificates(pub Vec<(String, String)>);

impl Credentials for HeldCertificates {
    fn holds(&self, issuer: &str, cert_type: &str) -> bool {
        self.0.iter().any(|(i, t)| i == issuer && t == cert_type)
    }
}

impl Acl {
    /// May `caller` (None: anonymous), holding `credentials`, perform `op` on a document owned
    /// by `owner`?
    pub fn allows(
        &self,
        op: Operation,
        caller: Option<&str>,
        owner: &str,
        credentials: &dyn Credentials,
    ) -> bool {
        if caller == Some(owner) {
            return true;
        }
        let Some(rule) = self.rule(op) else {
            return false;
        };
        let matches = |entry: &Entry| match entry {
            Entry::Everyone => true,
            Entry::Did(did) => caller == Some(did.as_str()),
            Entry::AllOf(predicates) => {
                caller.is_some()
                    && predicates
                        .iter()
                        .all(|p| credentials.holds(&p.issuer, &p.cert_type))
            }
        };
        rule.allow.iter().any(matches) && !rule.deny.iter().any(matches)
    }

    fn rule(&self, op: Operation) -> Option<&Rule> {
        match op {
            Operation::Read => self.read.as_ref(),
            Operation::Write => self.write.as_ref(),
            Operation::Create => self.create.as_ref(),
        }
    }

    /// Does evaluating `op` for a non-owner depend on certificates? (Callers load credentials
    /// only then.)
    pub fn uses_certificates(&self, op: Operation) -> bool {
        self.rule(op).is_some_and(|r| {
            r.allow
                .iter()
                .chain(&r.deny)
                .any(|e| matches!(e, Entry::AllOf(_)))
        })
    }

    /// The certificates (issuer, type) evaluating `op` tests, each once.
    pub fn tested_certificates(&self, op: Operation) -> Vec<(&str, &str)> {
        let mut pairs: Vec<(&str, &str)> = self
            .rule(op)
            .into_iter()
            .flat_map(|r| r.allow.iter().chain(&r.deny))
            .filter_map(|e| match e {
                Entry::AllOf(ps) => Some(ps),
                _ => None,
            })
            .flatten()
            .map(|p| (p.issuer.as_str(), p.cert_type.as_str()))
            .collect();
        pairs.sort_unstable();
        pairs.dedup();
        pairs
    }

    /// Is the document readable by everyone (it belongs in the global index)?
    pub fn is_public(&self) -> bool {
        self.read
            .as_ref()
            .is_some_and(|r| r.allow.contains(&Entry::Everyone))
    }
}

impl Serialize for Entry {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Entry::Everyone => s.serialize_str("*"),
            Entry::Did(did) => s.serialize_str(did),
            Entry::AllOf(predicates) => predicates.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Entry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Predicates(Vec<Predicate>),
        }
        let raw = Raw::deserialize(d).map_err(|_| {
            D::Error::custom("an ACL entry is a DID, \"*\", or a list of {issuer, type} predicates")
        })?;
        match raw {
            Raw::Text(s) if s == "*" => Ok(Entry::Everyone),
            Raw::Text(s) if is_did(&s) => Ok(Entry::Did(s)),
            Raw::Text(s) => Err(D::Error::custom(format!(
                "ACL entry {s:?} is neither \"*\" nor a DID (did:<method>:<id>)"
            ))),
            Raw::Predicates(p) if p.is_empty() || p.len() > MAX_PREDICATES => {
                Err(D::Error::custom(format!(
                    "a predicate list holds 1 to {MAX_PREDICATES} predicates"
                )))
            }
            Raw::Predicates(p) => {
                if let Some(bad) = p.iter().find(|p| !is_did(&p.issuer)) {
                    return Err(D::Error::custom(format!(
                        "predicate issuer {:?} is not a DID",
                        bad.issuer
                    )));
                }
                if let Some(bad) = p.iter().find(|p| !crate::doc_type::is_valid(&p.cert_type)) {
                    return Err(D::Error::custom(format!(
                        "predicate type {:?} is not a valid name",
                        bad.cert_type
                    )));
                }
                Ok(Entry::AllOf(p))
            }
        }
    }
}

fn bounded_entries<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Entry>, D::Error> {
    let entries = Vec::<Entry>::deserialize(d)?;
    if entries.len() > MAX_ENTRIES {
        return Err(D::Error::custom(format!(
            "an ACL list holds at most {MAX_ENTRIES} entries"
        )));
    }
    Ok(entries)
}

/// `did:<method>:<method-specific-id>` with the character sets of the DID core grammar.
pub fn is_did(s: &str) -> bool {
    if s.len() > MAX_DID_LEN {
        return false;
    }
    let mut parts = s.splitn(3, ':');
    let (Some("did"), Some(method), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    !method.is_empty()
        && method
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && !id.is_empty()
        && !id.ends_with(':')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:%".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const OWNER: &str = "did:key:zOwner";
    const ALICE: &str = "did:key:zAlice";
    const BOB: &str = "did:key:zBob";

    fn acl(v: serde_json::Value) -> Acl {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn default_is_owner_only() {
        let a = Acl::default();
        assert!(a.allows(Operation::Read, Some(OWNER), OWNER, &NoCredentials));
        assert!(!a.allows(Operation::Read, Some(ALICE), OWNER, &NoCredentials));
        assert!(!a.allows(Operation::Read, None, OWNER, &NoCredentials));
        assert!(!a.is_public());
    }

    #[test]
    fn allow_and_deny() {
        let a = acl(json!({"read": {"allow": ["*"], "deny": [BOB]}, "write": {"allow": [ALICE]}}));
        let none = &NoCredentials;
        assert!(a.is_public());
        assert!(a.allows(Operation::Read, None, OWNER, none));
        assert!(a.allows(Operation::Read, Some(ALICE), OWNER, none));
        assert!(!a.allows(Operation::Read, Some(BOB), OWNER, none));
        assert!(a.allows(Operation::Write, Some(ALICE), OWNER, none));
        assert!(!a.allows(Operation::Write, Some(BOB), OWNER, none));
        // A deny never locks the owner out.
        let a = acl(json!({"read": {"deny": ["*"]}}));
        assert!(a.allows(Operation::Read, Some(OWNER), OWNER, none));
    }

    #[test]
    fn predicates_need_every_certificate() {
        let v = json!({"read": {"allow": [[
            {"issuer": OWNER, "type": "friend-of"},
            {"issuer": BOB, "type": "member-of"}
        ]], "deny": []}});
        let a = acl(v.clone());
        assert_eq!(serde_json::to_value(&a).unwrap(), v);
        assert!(a.uses_certificates(Operation::Read));
        assert!(!a.uses_certificates(Operation::Write));
        assert_eq!(
            a.tested_certificates(Operation::Read),
            [(BOB, "member-of"), (OWNER, "friend-of")]
        );
        assert_eq!(a.tested_certificates(Operation::Write), []);
        let one = HeldCertificates(vec![(OWNER.into(), "friend-of".into())]);
        let both = HeldCertificates(vec![
            (OWNER.into(), "friend-of".into()),
            (BOB.into(), "member-of".into()),
        ]);
        assert!(!a.allows(Operation::Read, Some(ALICE), OWNER, &one));
        assert!(a.allows(Operation::Read, Some(ALICE), OWNER, &both));
        // Anonymous callers hold nothing, whatever the credentials say.
        assert!(!a.allows(Operation::Read, None, OWNER, &both));
        // A predicate in deny takes access away from holders only.
        let d = acl(
            json!({"read": {"allow": ["*"], "deny": [[{"issuer": OWNER, "type": "blocked"}]]}}),
        );
        let blocked = HeldCertificates(vec![(OWNER.into(), "blocked".into())]);
        assert!(!d.allows(Operation::Read, Some(ALICE), OWNER, &blocked));
        assert!(d.allows(Operation::Read, Some(ALICE), OWNER, &both));
    }

    #[test]
    fn bad_shapes_are_rejected() {
        for bad in [
            json!({"read": {"allow": ["alice"]}}),
            json!({"read": {"allow": [42]}}),
            json!({"read": {"allow": [[]]}}),
            json!({"read": {"allow": [[{"issuer": "x", "type": "friend-of"}]]}}),
            json!({"read": {"allow": [[{"issuer": OWNER, "type": "Bad Type"}]]}}),
            json!({"read": {"allow": ["*"], "extra": 1}}),
            json!({"admin": {}}),
            json!({"read": {"allow": vec!["*"; MAX_ENTRIES + 1]}}),
        ] {
            assert!(serde_json::from_value::<Acl>(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn did_syntax() {
        assert!(is_did(
            "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK"
        ));
        assert!(is_did("did:web:example.com:user:alice"));
        for bad in [
            "did:",
            "did:key",
            "did:key:",
            "did:Key:x",
            "dog:key:x",
            "did:key:a b",
            "did:key:x:",
        ] {
            assert!(!is_did(bad), "{bad}");
        }
    }
}
