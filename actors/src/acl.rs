//! Document access control lists: their JSON shape, validation, and evaluation for one caller.
//!
//! `{"read": {"allow": [...], "deny": [...]}, "write": {...}, "create": {...}}`. An entry is a DID,
//! `"*"` (everyone), or a list of certificate predicates `[{"issuer": DID, "type": "friend-of"}]`
//! that must all hold. Any allow entry grants, any matching deny wins, the owner always has full
//! access. An absent rule grants nobody but the owner (the default ACL is owner-only).
//!
//! Certificates do not exist yet in this version, so a predicate entry never matches: it grants
//! nothing and denies nothing until they do.
//!
//! PostgreSQL derives the summary columns `read_public`, `read_allow_dids` and `read_deny_dids`
//! from the same JSON (see the migrations); [`Acl`] validation guarantees the shapes it reads.

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

impl Acl {
    /// May `caller` (None: anonymous) perform `op` on a document owned by `owner`?
    pub fn allows(&self, op: Operation, caller: Option<&str>, owner: &str) -> bool {
        if caller == Some(owner) {
            return true;
        }
        let rule = match op {
            Operation::Read => &self.read,
            Operation::Write => &self.write,
            Operation::Create => &self.create,
        };
        let Some(rule) = rule else { return false };
        let matches = |entry: &Entry| match entry {
            Entry::Everyone => true,
            Entry::Did(did) => caller == Some(did.as_str()),
            Entry::AllOf(_) => false,
        };
        rule.allow.iter().any(matches) && !rule.deny.iter().any(matches)
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
        assert!(a.allows(Operation::Read, Some(OWNER), OWNER));
        assert!(!a.allows(Operation::Read, Some(ALICE), OWNER));
        assert!(!a.allows(Operation::Read, None, OWNER));
        assert!(!a.is_public());
    }

    #[test]
    fn allow_and_deny() {
        let a = acl(json!({"read": {"allow": ["*"], "deny": [BOB]}, "write": {"allow": [ALICE]}}));
        assert!(a.is_public());
        assert!(a.allows(Operation::Read, None, OWNER));
        assert!(a.allows(Operation::Read, Some(ALICE), OWNER));
        assert!(!a.allows(Operation::Read, Some(BOB), OWNER));
        assert!(a.allows(Operation::Write, Some(ALICE), OWNER));
        assert!(!a.allows(Operation::Write, Some(BOB), OWNER));
        // A deny never locks the owner out.
        let a = acl(json!({"read": {"deny": ["*"]}}));
        assert!(a.allows(Operation::Read, Some(OWNER), OWNER));
    }

    #[test]
    fn predicates_parse_and_round_trip_but_grant_nothing_yet() {
        let v = json!({"read": {"allow": [[{"issuer": OWNER, "type": "friend-of"}]], "deny": []}});
        let a = acl(v.clone());
        assert!(!a.allows(Operation::Read, Some(ALICE), OWNER));
        assert_eq!(serde_json::to_value(&a).unwrap(), v);
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
