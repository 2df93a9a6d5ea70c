//! The query language: one definition of a query over documents, parsed from the wire
//! ([`parse`]), normalised so that identical queries compare equal (they share one live-query
//! actor), and evaluated in memory against a document ([`QuerySpec::matches`],
//! [`QuerySpec::order`]). The server compiles the same [`QuerySpec`] to SQL; property tests
//! (`tests/query_agreement.rs`) hold the two evaluators to the same answers.
//!
//! Semantics, in brief (docs/queries.md has them in full):
//! - a data path walks objects only; a path through anything else is *missing*;
//! - `eq` is JSON equality (numbers by value, `1` = `1.0`; arrays and objects whole); missing is
//!   never equal to anything, not even `null`;
//! - `gt gte lt lte` hold only between values of the same kind: numbers by value, strings by
//!   Unicode code point, timestamps in time order; any other pairing is false, never an error;
//! - `ne`, `nin` and `not` are the exact negations, so they match missing fields;
//! - `contains` is PostgreSQL's JSONB containment (`@>`) of the field's value;
//! - sorting on a data path orders kinds first (missing, null, booleans, numbers, strings, then
//!   arrays and objects, which tie), then values; the document id breaks every tie.

mod eval;
pub mod keyset;
mod parse;
pub mod shape;

use std::cmp::Ordering;
use std::hash::{Hash, Hasher};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use uuid::Uuid;

pub use eval::lookup;
pub use parse::QueryLimits;

use crate::acl::Acl;
use crate::change::Change;
use crate::wire::Document;

/// Whether the database can take `time` as a bound value: years 1 to 9999 (chrono reaches far
/// past PostgreSQL's range, and a value it refuses would fail the statement).
pub fn storable_time(time: &DateTime<Utc>) -> bool {
    use chrono::Datelike as _;
    (1..=9999).contains(&time.year())
}

/// Segments per JSON path.
pub const MAX_PATH_DEPTH: usize = 8;
/// Keys in one `sort`.
pub const MAX_SORT_KEYS: usize = 4;
/// Paths in one `expand`.
pub const MAX_EXPAND: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{part}: {message}")]
pub struct QueryError {
    /// The part of the query at fault, as the client wrote it: `type`, `where.data.n.gt`,
    /// `where.or[1].owner`, `sort[0]`, `limit`, `cursor`, `expand[0]`.
    pub part: String,
    pub message: String,
}

fn invalid(part: impl Into<String>, message: impl Into<String>) -> QueryError {
    QueryError {
        part: part.into(),
        message: message.into(),
    }
}

/// Whether a string in `value` (a key or a value, at any depth) holds U+0000. PostgreSQL's text
/// cannot hold it, so such a value bound to a statement fails there rather than matching nothing.
fn holds_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(holds_nul),
        serde_json::Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

/// Whose documents a query ranges over.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// The documents this DID owns.
    Own(String),
    /// Public documents (read allows `*`) of every owner.
    Global,
    /// Documents of others shared with this DID specifically (by a DID entry or certificate
    /// predicates in their read rule), not public. Which ones depends on the DID's
    /// certificates: [`QuerySpec::matches`] is a superset test here (it holds no credentials);
    /// live queries and SQL apply the exact rule.
    Shared(String),
}

/// What a condition or a sort key looks at.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    Id,
    Owner,
    Type,
    CreatedAt,
    UpdatedAt,
    /// The document this one was made under; missing (like an absent data path) for a document
    /// made under none. Not a sort key.
    Parent,
    /// A path under `data`, e.g. `["author", "name"]` for `data.author.name`. Every segment
    /// passes [`is_path_segment`], so the path may appear in SQL text.
    Data(Vec<String>),
}

impl Field {
    /// The name as written in queries.
    pub fn name(&self) -> String {
        match self {
            Field::Id => "id".into(),
            Field::Owner => "owner".into(),
            Field::Type => "type".into(),
            Field::CreatedAt => "createdAt".into(),
            Field::UpdatedAt => "updatedAt".into(),
            Field::Parent => "parent".into(),
            Field::Data(path) => format!("data.{}", path.join(".")),
        }
    }
}

/// Whether `s` may be one segment of a data path: letters (any script), digits, `_`, `-` and `$`,
/// not starting with a digit or `-` (so it can never be read as an array index), at most 64
/// bytes. No quoting character can appear, which is what lets the SQL compiler put paths into
/// its text (expression indexes only match literal paths).
pub fn is_path_segment(s: &str) -> bool {
    let mut chars = s.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    s.len() <= 64
        && (first.is_alphabetic() || first == '_' || first == '$')
        && chars.all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '$'))
}

/// A JSON value with numbers normalised (`1` and `1.0` are one value, as in PostgreSQL's jsonb)
/// and a canonical text, so that specs compare and hash by meaning.
#[derive(Debug, Clone)]
pub struct CanonicalValue {
    text: String,
    value: serde_json::Value,
}

impl CanonicalValue {
    pub fn new(value: &serde_json::Value) -> Self {
        Self {
            text: canonical(value),
            value: value.clone(),
        }
    }

    pub fn value(&self) -> &serde_json::Value {
        &self.value
    }

    /// Object or array.
    pub fn is_container(&self) -> bool {
        self.value.is_object() || self.value.is_array()
    }

    /// The canonical text: equal for values jsonb holds equal.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// The canonical text of any JSON value (see [`CanonicalValue::text`]).
pub fn canonical_text(value: &serde_json::Value) -> String {
    canonical(value)
}

impl PartialEq for CanonicalValue {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}
impl Eq for CanonicalValue {}
impl Hash for CanonicalValue {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.text.hash(state);
    }
}
impl PartialOrd for CanonicalValue {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for CanonicalValue {
    fn cmp(&self, other: &Self) -> Ordering {
        self.text.cmp(&other.text)
    }
}

fn canonical(value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        // Integers as they are; whole doubles as the integer they equal, so 1.0 and 1 agree
        // (and 9e15 and 9000000000000000: a cut-off below 2^53 made their keys differ, and a
        // live query routed by one missed changes written as the other).
        Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
        Value::Number(n) => match n.as_f64() {
            // Every whole double below 2^127 converts to an i128 exactly.
            Some(f) if f.fract() == 0.0 && f.abs() < 1.7e38 => format!("{}", f as i128),
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

/// A value a condition compares with, typed by its field.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operand {
    /// For data paths.
    Json(CanonicalValue),
    /// For `owner` and `type`.
    Text(String),
    Id(Uuid),
    /// For `createdAt` and `updatedAt`, at the database's microsecond precision.
    Time(DateTime<Utc>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Comparison {
    Gt,
    Gte,
    Lt,
    Lte,
}

impl Comparison {
    /// Does `ordering` (field against operand) satisfy the comparison?
    pub fn holds(self, ordering: Ordering) -> bool {
        match self {
            Comparison::Gt => ordering.is_gt(),
            Comparison::Gte => ordering.is_ge(),
            Comparison::Lt => ordering.is_lt(),
            Comparison::Lte => ordering.is_le(),
        }
    }

    /// The operator's name in queries.
    pub fn name(self) -> &'static str {
        match self {
            Comparison::Gt => "gt",
            Comparison::Gte => "gte",
            Comparison::Lt => "lt",
            Comparison::Lte => "lte",
        }
    }

    pub fn sql(self) -> &'static str {
        match self {
            Comparison::Gt => ">",
            Comparison::Gte => ">=",
            Comparison::Lt => "<",
            Comparison::Lte => "<=",
        }
    }
}

/// One condition on one field. `ne`, `nin` and `exists: false` are written as [`Filter::Not`]
/// of these, so each meaning has one form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Predicate {
    /// The field exists and equals the operand.
    Eq(Field, Operand),
    /// The field equals one of the operands (sorted, deduplicated, two or more).
    In(Field, Vec<Operand>),
    /// The field and the operand are of the same kind and compare so.
    Compare(Field, Comparison, Operand),
    /// The field has a value: a data path leads to one (`null` included), or the document was
    /// made under a parent. Only those two fields can be missing.
    Exists(Field),
    /// The value at the data path contains the operand (JSONB `@>`).
    Contains(Vec<String>, CanonicalValue),
    /// The field is a string that starts with the prefix.
    StartsWith(Field, String),
}

/// A boolean combination of predicates, normalised: nested `All`s and `Any`s are flattened,
/// their members sorted and deduplicated, double negations removed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Filter {
    /// Every member holds (none: always true).
    All(Vec<Filter>),
    /// At least one member holds (never empty).
    Any(Vec<Filter>),
    Not(Box<Filter>),
    Is(Predicate),
}

impl Filter {
    /// `All` of `members`, flattened, sorted and deduplicated; one member stands for itself.
    pub fn all(members: Vec<Filter>) -> Filter {
        Self::combine(members, true)
    }

    /// `Any` of `members` (at least one), flattened, sorted and deduplicated.
    pub fn any(members: Vec<Filter>) -> Filter {
        Self::combine(members, false)
    }

    fn combine(members: Vec<Filter>, all: bool) -> Filter {
        let mut flat = Vec::with_capacity(members.len());
        for member in members {
            match (member, all) {
                (Filter::All(inner), true) | (Filter::Any(inner), false) => flat.extend(inner),
                (other, _) => flat.push(other),
            }
        }
        flat.sort();
        flat.dedup();
        match flat.len() {
            1 => flat.pop().unwrap_or(Filter::All(Vec::new())),
            _ if all => Filter::All(flat),
            _ => Filter::Any(flat),
        }
    }

    pub fn negate(self) -> Filter {
        match self {
            Filter::Not(inner) => *inner,
            other => Filter::Not(Box::new(other)),
        }
    }

    /// The equality conditions every match must meet: the members of a top-level `All` (or the
    /// filter itself) that are `Eq` predicates. Live-query indexes key on these.
    pub fn required_equalities(&self) -> impl Iterator<Item = (&Field, &Operand)> {
        let members: &[Filter] = match self {
            Filter::All(members) => members,
            single => std::slice::from_ref(single),
        };
        members.iter().filter_map(|m| match m {
            Filter::Is(Predicate::Eq(field, value)) => Some((field, value)),
            _ => None,
        })
    }
}

impl Filter {
    /// Whether any condition looks at `field`.
    pub fn mentions(&self, field: &Field) -> bool {
        match self {
            Filter::All(members) | Filter::Any(members) => {
                members.iter().any(|m| m.mentions(field))
            }
            Filter::Not(inner) => inner.mentions(field),
            Filter::Is(
                Predicate::Eq(f, _)
                | Predicate::In(f, _)
                | Predicate::Compare(f, _, _)
                | Predicate::Exists(f)
                | Predicate::StartsWith(f, _),
            ) => f == field,
            Filter::Is(Predicate::Contains(path, _)) => {
                matches!(field, Field::Data(p) if p == path)
            }
        }
    }
}

/// The parts of a document a query looks at, borrowed from a stored document or from one side
/// of a change.
#[derive(Debug, Clone, Copy)]
pub struct DocRef<'a> {
    pub id: Uuid,
    pub doc_type: &'a str,
    pub owner: &'a str,
    pub parent: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub acl: &'a Acl,
    pub data: &'a serde_json::Value,
}

impl<'a> From<&'a Document> for DocRef<'a> {
    fn from(doc: &'a Document) -> Self {
        Self {
            id: doc.id,
            doc_type: &doc.doc_type,
            owner: &doc.owner,
            parent: doc.parent,
            created_at: doc.created_at,
            updated_at: doc.updated_at,
            acl: &doc.acl,
            data: &doc.data,
        }
    }
}

/// One sort key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sort {
    pub field: Field,
    pub descending: bool,
}

/// A validated, normalised query. Two requests that mean the same thing compare equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QuerySpec {
    pub doc_type: String,
    pub scope: Scope,
    pub filter: Filter,
    /// One to [`MAX_SORT_KEYS`] keys; the id breaks ties in the direction of the last key.
    pub sort: Vec<Sort>,
    pub limit: u32,
}

/// The wire form of a query (`read`, `readOnce`, `POST /v1/query`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryRequest {
    #[serde(rename = "type")]
    pub doc_type: String,
    #[serde(default, rename = "where")]
    pub filter: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub sort: Option<SortRequest>,
    #[serde(default)]
    pub limit: Option<u32>,
    #[serde(default)]
    pub global: bool,
    /// Documents others shared with the caller (not public, not the caller's own).
    #[serde(default)]
    pub shared: bool,
    /// One-shot queries only: continue after the page that returned this cursor.
    #[serde(default)]
    pub cursor: Option<String>,
    /// One-shot queries only: data paths holding document ids to fetch along.
    #[serde(default)]
    pub expand: Vec<String>,
}

/// `"sort": "-createdAt"` or `"sort": ["-data.score", "createdAt"]`.
#[derive(Debug, Clone)]
pub enum SortRequest {
    One(String),
    Many(Vec<String>),
}

/// By hand rather than `untagged`, whose refusal names the Rust enum instead of what is wanted.
impl<'de> Deserialize<'de> for SortRequest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = SortRequest;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a sort key or a list of sort keys")
            }
            fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<SortRequest, E> {
                Ok(SortRequest::One(key.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut keys: A,
            ) -> Result<SortRequest, A::Error> {
                // The parse refuses more than 4; the body's size bounds the list until then.
                let mut all = Vec::new();
                while let Some(key) = keys.next_element::<String>()? {
                    all.push(key);
                }
                Ok(SortRequest::Many(all))
            }
        }
        deserializer.deserialize_any(Keys)
    }
}

impl QuerySpec {
    /// Validates `request` for `caller`. Cursor and expand are left to [`keyset`] and
    /// [`parse_expand`]: they shape one page, not the query.
    pub fn parse(
        request: &QueryRequest,
        caller: &str,
        limits: QueryLimits,
    ) -> Result<Self, QueryError> {
        parse::parse(request, caller, limits)
    }

    /// Does `doc` belong in this query's result (ignoring the limit)?
    pub fn matches(&self, doc: &Document) -> bool {
        self.matches_ref(&DocRef::from(doc))
    }

    pub fn matches_ref(&self, doc: &DocRef<'_>) -> bool {
        if doc.doc_type != self.doc_type {
            return false;
        }
        let in_scope = match &self.scope {
            Scope::Own(owner) => doc.owner == owner,
            Scope::Global => doc.acl.is_public(),
            Scope::Shared(caller) => {
                doc.owner != caller
                    && !doc.acl.is_public()
                    && (doc.acl.uses_certificates(crate::acl::Operation::Read)
                        || doc.acl.allows(
                            crate::acl::Operation::Read,
                            Some(caller),
                            doc.owner,
                            &crate::acl::NoCredentials,
                        ))
            }
        };
        in_scope && eval::filter(&self.filter, doc)
    }

    /// May `change` alter this query's result? True when the new version matches, or the old
    /// one did. A change does not carry the old version's `updatedAt`, so a query that filters
    /// on it counts every old version as a possible match.
    pub fn concerns(&self, change: &Change) -> bool {
        if change.doc_type != self.doc_type {
            return false;
        }
        change
            .new
            .as_ref()
            .is_some_and(|new| self.matches_ref(&side(change, new)))
            || change.old.as_ref().is_some_and(|old| {
                self.matches_ref(&side(change, old)) || self.filter.mentions(&Field::UpdatedAt)
            })
    }

    /// The order of the result: `Less` means `a` comes first.
    pub fn order(&self, a: &Document, b: &Document) -> Ordering {
        for key in &self.sort {
            let ord = eval::compare_sort_values(&key.field, a, b);
            let ord = if key.descending { ord.reverse() } else { ord };
            if ord.is_ne() {
                return ord;
            }
        }
        let ord = a.id.cmp(&b.id);
        if self.ties_descending() {
            ord.reverse()
        } else {
            ord
        }
    }

    /// The id tie-break runs in the direction of the last sort key.
    pub fn ties_descending(&self) -> bool {
        self.sort.last().is_some_and(|s| s.descending)
    }
}

/// One version of a changed document (its `updatedAt` is the change's).
fn side<'a>(change: &'a Change, image: &'a crate::change::Image) -> DocRef<'a> {
    DocRef {
        id: change.doc_id,
        doc_type: &change.doc_type,
        owner: &change.owner,
        parent: change.parent,
        created_at: change.created_at,
        updated_at: change.updated_at,
        acl: &image.acl,
        data: &image.data,
    }
}

/// Validates `expand`: data paths, at most [`MAX_EXPAND`].
pub fn parse_expand(paths: &[String]) -> Result<Vec<Vec<String>>, QueryError> {
    if paths.len() > MAX_EXPAND {
        return Err(invalid("expand", format!("at most {MAX_EXPAND} paths")));
    }
    paths
        .iter()
        .enumerate()
        .map(|(i, path)| match parse::field(path) {
            Ok(Field::Data(segments)) => Ok(segments),
            _ => Err(invalid(
                format!("expand[{i}]"),
                "expand names a data path (`data.author`) holding a document id or a list of ids",
            )),
        })
        .collect()
}

/// The ids a document refers to at `path`: a UUID string, or a list of them (others ignored).
pub fn referenced_ids(doc: &Document, path: &[String]) -> Vec<Uuid> {
    let parse = |v: &serde_json::Value| v.as_str().and_then(|s| Uuid::try_parse(s).ok());
    match lookup(&doc.data, path) {
        Some(serde_json::Value::Array(items)) => items.iter().filter_map(parse).collect(),
        Some(value) => parse(value).into_iter().collect(),
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests;
