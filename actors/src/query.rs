//! Live-query specifications: parsed from the wire, normalised into a key (identical queries
//! share one live-query actor), and evaluated in memory against a document. The same
//! specification compiles to SQL in the server's store; the two must agree (see tests there).
//!
//! This version supports: a type, own documents or public ones (`global`), equality filters on
//! `id`, `owner` and JSON paths under `data.`, a sort on `createdAt` or `updatedAt` (ties broken
//! by id), and a limit.

use std::cmp::Ordering;

use serde::Deserialize;
use uuid::Uuid;

use crate::wire::Document;

/// Filters per query, so that one query cannot make every change expensive.
pub const MAX_FILTERS: usize = 16;
/// Segments per JSON path.
pub const MAX_PATH_DEPTH: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct QueryError {
    /// The part of the query at fault: `type`, `where.<field>`, `sort`, `limit`.
    pub part: String,
    pub message: String,
}

fn invalid(part: impl Into<String>, message: impl Into<String>) -> QueryError {
    QueryError {
        part: part.into(),
        message: message.into(),
    }
}

/// Whose documents a query ranges over.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// The documents this DID owns.
    Own(String),
    /// Public documents (read allows `*`) of every owner.
    Global,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    Id,
    Owner,
    /// A path under `data`, e.g. `["author", "name"]` for `data.author.name`.
    Data(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SortKey {
    CreatedAt,
    UpdatedAt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sort {
    pub key: SortKey,
    pub descending: bool,
}

/// A validated, normalised query. Two requests that mean the same thing compare equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QuerySpec {
    pub doc_type: String,
    pub scope: Scope,
    /// Sorted by field, one value per field.
    pub filters: Vec<(Field, CanonicalValue)>,
    pub sort: Sort,
    pub limit: u32,
}

/// A JSON value with a total order and numbers normalised (`1` and `1.0` are equal, as in
/// PostgreSQL's jsonb), so specs can be compared and hashed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CanonicalValue(String);

impl CanonicalValue {
    pub fn new(value: &serde_json::Value) -> Self {
        Self(canonical(value))
    }

    pub fn value(&self) -> serde_json::Value {
        // Produced by `canonical`, which always writes valid JSON.
        serde_json::from_str(&self.0).unwrap_or(serde_json::Value::Null)
    }
}

fn canonical(value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::Number(n) => match n.as_f64() {
            // Integral floats print as integers, so 1.0 and 1 agree.
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => format!("{}", f as i64),
            _ => n.to_string(),
        },
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(canonical).collect();
            format!("[{}]", inner.join(","))
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, String)> =
                map.iter().map(|(k, v)| (k, canonical(v))).collect();
            entries.sort();
            let inner: Vec<String> = entries
                .into_iter()
                .map(|(k, v)| format!("{}:{v}", Value::String(k.clone())))
                .collect();
            format!("{{{}}}", inner.join(","))
        }
        other => other.to_string(),
    }
}

/// The wire form of a query (`read` / `readOnce`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryRequest {
    #[serde(rename = "type")]
    pub doc_type: String,
    #[serde(default, rename = "where")]
    pub filter: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub sort: Option<String>,
    #[serde(default)]
    pub limit: Option<u32>,
    #[serde(default)]
    pub global: bool,
}

/// Limits applied while parsing.
#[derive(Debug, Clone, Copy)]
pub struct QueryLimits {
    pub default_limit: u32,
    pub max_limit: u32,
}

impl QuerySpec {
    /// Validates `request` for `caller`.
    pub fn parse(
        request: &QueryRequest,
        caller: &str,
        limits: QueryLimits,
    ) -> Result<Self, QueryError> {
        if !crate::doc_type::is_valid(&request.doc_type) {
            return Err(invalid(
                "type",
                "a type name matches ^[a-z][a-z0-9_.-]{0,63}$",
            ));
        }
        if request.filter.len() > MAX_FILTERS {
            return Err(invalid("where", format!("at most {MAX_FILTERS} filters")));
        }
        let mut filters = Vec::with_capacity(request.filter.len());
        for (name, value) in &request.filter {
            let part = format!("where.{name}");
            let mut value = value.clone();
            let field = match name.as_str() {
                "id" => {
                    let Some(id) = value.as_str().and_then(|s| Uuid::try_parse(s).ok()) else {
                        return Err(invalid(part, "`id` is compared with a UUID string"));
                    };
                    // One spelling, so matching compares like the database's uuid type.
                    value = serde_json::Value::String(id.to_string());
                    Field::Id
                }
                "owner" => {
                    if !value.as_str().is_some_and(crate::acl::is_did) {
                        return Err(invalid(part, "`owner` is compared with a DID"));
                    }
                    Field::Owner
                }
                path => {
                    let Some(rest) = path.strip_prefix("data.") else {
                        return Err(invalid(
                            part,
                            "a filter field is `id`, `owner` or a path under `data.`",
                        ));
                    };
                    let segments: Vec<String> = rest.split('.').map(str::to_owned).collect();
                    // A numeric segment would index arrays in SQL (`#>`) but not in memory.
                    if segments.iter().any(|s| s.parse::<i64>().is_ok()) {
                        return Err(invalid(
                            part,
                            "path segments are object keys, not array indexes",
                        ));
                    }
                    if segments.len() > MAX_PATH_DEPTH || segments.iter().any(String::is_empty) {
                        return Err(invalid(
                            part,
                            format!("a path has 1 to {MAX_PATH_DEPTH} non-empty segments"),
                        ));
                    }
                    Field::Data(segments)
                }
            };
            filters.push((field, CanonicalValue::new(&value)));
        }
        filters.sort();
        let sort = match request.sort.as_deref().unwrap_or("-createdAt") {
            "createdAt" => Sort {
                key: SortKey::CreatedAt,
                descending: false,
            },
            "-createdAt" => Sort {
                key: SortKey::CreatedAt,
                descending: true,
            },
            "updatedAt" => Sort {
                key: SortKey::UpdatedAt,
                descending: false,
            },
            "-updatedAt" => Sort {
                key: SortKey::UpdatedAt,
                descending: true,
            },
            _ => {
                return Err(invalid(
                    "sort",
                    "sort is `createdAt`, `updatedAt`, or either with a leading `-` for descending",
                ));
            }
        };
        let limit = request.limit.unwrap_or(limits.default_limit);
        if limit == 0 || limit > limits.max_limit {
            return Err(invalid(
                "limit",
                format!("limit is 1 to {}", limits.max_limit),
            ));
        }
        Ok(Self {
            doc_type: request.doc_type.clone(),
            scope: if request.global {
                Scope::Global
            } else {
                Scope::Own(caller.to_owned())
            },
            filters,
            sort,
            limit,
        })
    }

    /// Does `doc` belong in this query's result (ignoring the limit)?
    pub fn matches(&self, doc: &Document) -> bool {
        if doc.doc_type != self.doc_type {
            return false;
        }
        let in_scope = match &self.scope {
            Scope::Own(owner) => &doc.owner == owner,
            Scope::Global => doc.acl.is_public(),
        };
        in_scope
            && self.filters.iter().all(|(field, expected)| match field {
                Field::Id => expected.value().as_str() == Some(doc.id.to_string().as_str()),
                Field::Owner => expected.value().as_str() == Some(doc.owner.as_str()),
                Field::Data(path) => path
                    .iter()
                    .try_fold(&doc.data, |v, segment| v.get(segment))
                    .is_some_and(|found| CanonicalValue::new(found) == *expected),
            })
    }

    /// The order of the result: `Less` means `a` comes first.
    pub fn order(&self, a: &Document, b: &Document) -> Ordering {
        let key = |d: &Document| match self.sort.key {
            SortKey::CreatedAt => (d.created_at, d.id),
            SortKey::UpdatedAt => (d.updated_at, d.id),
        };
        let ord = key(a).cmp(&key(b));
        if self.sort.descending {
            ord.reverse()
        } else {
            ord
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMITS: QueryLimits = QueryLimits {
        default_limit: 100,
        max_limit: 1000,
    };

    fn spec(v: serde_json::Value, caller: &str) -> Result<QuerySpec, QueryError> {
        QuerySpec::parse(&serde_json::from_value(v).unwrap(), caller, LIMITS)
    }

    fn doc(owner: &str, data: serde_json::Value, public: bool) -> Document {
        let acl = if public {
            serde_json::from_value(json!({"read": {"allow": ["*"]}})).unwrap()
        } else {
            Default::default()
        };
        Document {
            id: Uuid::now_v7(),
            doc_type: "posts".into(),
            owner: owner.into(),
            rev: 1,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            acl,
            data,
        }
    }

    #[test]
    fn equal_queries_normalise_equal() {
        let a = spec(
            json!({"type": "posts", "where": {"data.n": 1, "data.a": {"y": 2, "x": 1.0}}}),
            "did:key:zA",
        )
        .unwrap();
        let b = spec(json!({"type": "posts", "where": {"data.a": {"x": 1, "y": 2}, "data.n": 1.0}, "sort": "-createdAt", "limit": 100}), "did:key:zA").unwrap();
        assert_eq!(a, b);
        let other_user = spec(
            json!({"type": "posts", "where": {"data.n": 1, "data.a": {"x": 1, "y": 2}}}),
            "did:key:zB",
        )
        .unwrap();
        assert_ne!(a, other_user, "own-document queries are per owner");
        let g1 = spec(json!({"type": "posts", "global": true}), "did:key:zA").unwrap();
        let g2 = spec(json!({"type": "posts", "global": true}), "did:key:zB").unwrap();
        assert_eq!(g1, g2, "global queries are shared across users");
    }

    #[test]
    fn matching() {
        let q = spec(
            json!({"type": "posts", "where": {"data.tag": "x", "data.meta.n": 2}}),
            "did:key:zA",
        )
        .unwrap();
        assert!(q.matches(&doc(
            "did:key:zA",
            json!({"tag": "x", "meta": {"n": 2.0}}),
            false
        )));
        assert!(
            !q.matches(&doc(
                "did:key:zB",
                json!({"tag": "x", "meta": {"n": 2}}),
                true
            )),
            "not the owner"
        );
        assert!(!q.matches(&doc(
            "did:key:zA",
            json!({"tag": "y", "meta": {"n": 2}}),
            false
        )));
        assert!(
            !q.matches(&doc("did:key:zA", json!({"tag": "x"}), false)),
            "missing is not equal"
        );
        assert!(
            !q.matches(&doc(
                "did:key:zA",
                json!({"tag": ["x"], "meta": {"n": 2}}),
                false
            )),
            "arrays are not scalars"
        );
        let nulls = spec(
            json!({"type": "posts", "where": {"data.gone": null}}),
            "did:key:zA",
        )
        .unwrap();
        assert!(nulls.matches(&doc("did:key:zA", json!({"gone": null}), false)));
        assert!(
            !nulls.matches(&doc("did:key:zA", json!({}), false)),
            "missing is not null"
        );
        let global = spec(json!({"type": "posts", "global": true}), "did:key:zA").unwrap();
        assert!(global.matches(&doc("did:key:zB", json!({}), true)));
        assert!(
            !global.matches(&doc("did:key:zA", json!({}), false)),
            "global is public documents only"
        );
    }

    #[test]
    fn ids_match_however_they_are_spelled() {
        let d = doc("did:key:zA", json!({}), false);
        let upper = d.id.simple().to_string().to_uppercase();
        let q = spec(
            json!({"type": "posts", "where": {"id": upper}}),
            "did:key:zA",
        )
        .unwrap();
        assert!(q.matches(&d));
    }

    #[test]
    fn invalid_queries_name_the_part() {
        for (q, part) in [
            (json!({"type": "Bad"}), "type"),
            (
                json!({"type": "posts", "where": {"title": 1}}),
                "where.title",
            ),
            (
                json!({"type": "posts", "where": {"data.": 1}}),
                "where.data.",
            ),
            (
                json!({"type": "posts", "where": {"id": "nope"}}),
                "where.id",
            ),
            (
                json!({"type": "posts", "where": {"owner": 5}}),
                "where.owner",
            ),
            (json!({"type": "posts", "sort": "title"}), "sort"),
            (json!({"type": "posts", "limit": 0}), "limit"),
            (json!({"type": "posts", "limit": 5000}), "limit"),
        ] {
            assert_eq!(spec(q.clone(), "did:key:zA").unwrap_err().part, part, "{q}");
        }
    }

    #[test]
    fn order_breaks_ties_by_id() {
        let q = spec(json!({"type": "posts"}), "did:key:zA").unwrap();
        let a = doc("did:key:zA", json!({}), false);
        let mut b = a.clone();
        b.id = Uuid::now_v7();
        assert_eq!(
            q.order(&a, &b),
            Ordering::Greater,
            "descending: the larger id first"
        );
    }
}
