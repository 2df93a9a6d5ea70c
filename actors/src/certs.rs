//! The certificates every subject holds, as this node's realtime tree knows them: loaded at
//! start and kept current from the change feed. Certificates are documents of the reserved type
//! [`CERTIFICATE_TYPE`], so an issue (insert) or a revocation (delete) arrives in feed order with
//! every other change, and each actor can hold the book exactly as of its own position in the
//! stream. Expiry is applied by the realtime root's timer, not by reading the clock during
//! evaluation: a book answers the same way however often it is asked.
//!
//! Persistent maps (`imbl`): applying a change makes a new book that shares almost everything
//! with the old one, so handing a book to every type and live query is cheap.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::acl::Credentials;
use crate::change::Change;

/// The document type certificates are stored as. Reserved: only the server writes it.
pub const CERTIFICATE_TYPE: &str = "vibe.certificate";

/// One certificate: `issuer` claims `subject` is `cert_type` (e.g. `friend-of`) until
/// `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    pub id: Uuid,
    pub issuer: String,
    pub subject: String,
    pub cert_type: String,
    pub expires_at: Option<DateTime<Utc>>,
}

impl Certificate {
    /// Reads a certificate document (`owner` is the issuer); None if `data` lacks the fields.
    pub fn from_document(id: Uuid, owner: &str, data: &serde_json::Value) -> Option<Self> {
        let expires_at = match data.get("expires_at") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(v.as_str()?.parse::<DateTime<Utc>>().ok()?),
        };
        Some(Self {
            id,
            issuer: owner.to_owned(),
            subject: data.get("subject")?.as_str()?.to_owned(),
            cert_type: data.get("type")?.as_str()?.to_owned(),
            expires_at,
        })
    }
}

type ByType = imbl::HashMap<String, u32>;
type ByIssuer = imbl::HashMap<String, ByType>;

/// Valid certificates by subject, issuer and type.
#[derive(Debug, Clone, Default)]
pub struct CertificateBook {
    /// subject → issuer → type → how many valid certificates say so.
    held: imbl::HashMap<String, ByIssuer>,
    by_id: imbl::HashMap<Uuid, Arc<Certificate>>,
    /// (expiry, id) of every certificate that expires.
    expiries: imbl::OrdSet<(DateTime<Utc>, Uuid)>,
}

impl CertificateBook {
    /// A book of `certificates` (already expired ones left out as of `now`).
    pub fn new(certificates: impl IntoIterator<Item = Certificate>, now: DateTime<Utc>) -> Self {
        let mut book = Self::default();
        for c in certificates {
            if c.expires_at.is_none_or(|e| e > now) {
                book.insert(c);
            }
        }
        book
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Does `subject` hold a valid certificate of `cert_type` from `issuer`?
    pub fn holds(&self, subject: &str, issuer: &str, cert_type: &str) -> bool {
        self.held
            .get(subject)
            .and_then(|by_issuer| by_issuer.get(issuer))
            .and_then(|by_type| by_type.get(cert_type))
            .is_some_and(|n| *n > 0)
    }

    /// What `subject` holds, as ACL evaluation asks it.
    pub fn view<'a>(&'a self, subject: &'a str) -> BookView<'a> {
        BookView {
            book: self,
            subject,
        }
    }

    /// Adds a certificate (replacing one with the same id); returns its subject.
    pub fn insert(&mut self, c: Certificate) -> String {
        self.remove(c.id);
        let subject = c.subject.clone();
        let counts = self
            .held
            .entry(c.subject.clone())
            .or_default()
            .entry(c.issuer.clone())
            .or_default();
        *counts.entry(c.cert_type.clone()).or_insert(0) += 1;
        if let Some(at) = c.expires_at {
            self.expiries.insert((at, c.id));
        }
        self.by_id.insert(c.id, Arc::new(c));
        subject
    }

    /// Removes the certificate `id`; returns its subject if it was held.
    pub fn remove(&mut self, id: Uuid) -> Option<String> {
        let c = self.by_id.remove(&id)?;
        if let Some(at) = c.expires_at {
            self.expiries.remove(&(at, id));
        }
        if let Some(by_issuer) = self.held.get_mut(&c.subject) {
            if let Some(by_type) = by_issuer.get_mut(&c.issuer) {
                if let Some(n) = by_type.get_mut(&c.cert_type) {
                    *n -= 1;
                    if *n == 0 {
                        by_type.remove(&c.cert_type);
                    }
                }
                if by_type.is_empty() {
                    by_issuer.remove(&c.issuer);
                }
            }
            if by_issuer.is_empty() {
                self.held.remove(&c.subject);
            }
        }
        Some(c.subject.clone())
    }

    /// Applies a change of a certificate document; returns the subjects whose holdings changed
    /// (empty for other types). An already expired certificate is not added.
    pub fn apply(&mut self, change: &Change, now: DateTime<Utc>) -> Vec<String> {
        if change.doc_type != CERTIFICATE_TYPE {
            return Vec::new();
        }
        let mut subjects = Vec::new();
        if let Some(s) = self.remove(change.doc_id) {
            subjects.push(s);
        }
        let added = change
            .new
            .as_ref()
            .and_then(|image| Certificate::from_document(change.doc_id, &change.owner, &image.data))
            .filter(|c| c.expires_at.is_none_or(|e| e > now));
        if let Some(c) = added {
            let s = self.insert(c);
            if !subjects.contains(&s) {
                subjects.push(s);
            }
        }
        subjects
    }

    /// The earliest expiry among held certificates.
    pub fn next_expiry(&self) -> Option<DateTime<Utc>> {
        self.expiries.get_min().map(|(at, _)| *at)
    }

    /// Removes certificates expired at `now`; returns the subjects that lost some.
    pub fn expire(&mut self, now: DateTime<Utc>) -> Vec<String> {
        let mut subjects = Vec::new();
        while let Some(&(at, id)) = self.expiries.get_min() {
            if at > now {
                break;
            }
            if let Some(s) = self.remove(id)
                && !subjects.contains(&s)
            {
                subjects.push(s);
            }
        }
        subjects
    }
}

/// One subject's holdings in a book.
#[derive(Debug, Clone, Copy)]
pub struct BookView<'a> {
    book: &'a CertificateBook,
    subject: &'a str,
}

impl Credentials for BookView<'_> {
    fn holds(&self, issuer: &str, cert_type: &str) -> bool {
        self.book.holds(self.subject, issuer, cert_type)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(n: u128, issuer: &str, subject: &str, t: &str, exp: Option<i64>) -> Certificate {
        Certificate {
            id: Uuid::from_u128(n),
            issuer: issuer.into(),
            subject: subject.into(),
            cert_type: t.into(),
            expires_at: exp.map(|s| DateTime::from_timestamp(s, 0).unwrap()),
        }
    }

    #[test]
    fn insert_remove_and_expire() {
        let t0 = DateTime::from_timestamp(1000, 0).unwrap();
        let mut book = CertificateBook::new(
            [
                cert(1, "did:a", "did:s", "friend-of", None),
                cert(2, "did:a", "did:s", "friend-of", Some(2000)),
                cert(3, "did:b", "did:s", "member-of", Some(1500)),
                cert(4, "did:b", "did:t", "member-of", Some(500)),
            ],
            t0,
        );
        assert_eq!(book.len(), 3, "the one expired at start is left out");
        let before = book.clone();
        assert!(book.holds("did:s", "did:a", "friend-of"));
        assert!(!book.holds("did:t", "did:b", "member-of"));
        // Two certificates say the same thing: removing one keeps the holding.
        assert_eq!(book.remove(Uuid::from_u128(1)).as_deref(), Some("did:s"));
        assert!(book.holds("did:s", "did:a", "friend-of"));
        assert_eq!(book.next_expiry(), DateTime::from_timestamp(1500, 0));
        assert_eq!(
            book.expire(DateTime::from_timestamp(1500, 0).unwrap()),
            vec!["did:s".to_owned()]
        );
        assert!(!book.holds("did:s", "did:b", "member-of"));
        assert!(
            book.expire(DateTime::from_timestamp(1999, 0).unwrap())
                .is_empty()
        );
        book.expire(DateTime::from_timestamp(2000, 0).unwrap());
        assert!(book.is_empty());
        // The clone taken before is untouched.
        assert!(before.holds("did:s", "did:b", "member-of"));
        assert_eq!(before.len(), 3);
    }

    #[test]
    fn certificate_documents() {
        let data = serde_json::json!({"subject": "did:s", "type": "friend-of", "expires_at": "2030-01-01T00:00:00Z"});
        let c = Certificate::from_document(Uuid::nil(), "did:i", &data).unwrap();
        assert_eq!(c.issuer, "did:i");
        assert!(c.expires_at.is_some());
        assert!(
            Certificate::from_document(Uuid::nil(), "did:i", &serde_json::json!({"type": "x"}))
                .is_none()
        );
        assert!(
            Certificate::from_document(
                Uuid::nil(),
                "did:i",
                &serde_json::json!({"subject": "did:s", "type": "x", "expires_at": "soon"})
            )
            .is_none()
        );
    }
}
