//! Keyset cursors for one-shot queries: the sort-key values of a page's last document, so the
//! next page starts strictly after it, whatever was written in between (no offsets, no skipped
//! or repeated documents). Opaque to clients: base64url of a JSON array whose first item is the
//! query's [signature](Keyset::signature), so a cursor is taken only by the query it came from.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::eval::{DataSortValue, data_sort_value};
use super::{Field, QueryError, QuerySpec, Scope, invalid};
use crate::wire::Document;

/// Longest cursor accepted (four sort keys with 64-byte strings fit many times over).
const MAX_CURSOR_LEN: usize = 4096;

/// One sort key's value, as the SQL compiler binds it.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyValue {
    /// A data path: kind rank (0 missing … 5 container), the number as decimal text (booleans
    /// 0 / 1, other kinds 0), the string (other kinds empty). Mirrors the SQL sort expressions.
    Data {
        rank: i16,
        number: String,
        text: String,
    },
    Text(String),
    Id(Uuid),
    Time(DateTime<Utc>),
}

/// The position after a document: its sort-key values, then its id.
#[derive(Debug, Clone, PartialEq)]
pub struct Keyset {
    pub values: Vec<KeyValue>,
    pub id: Uuid,
}

impl Keyset {
    /// The position just after `doc` in `spec`'s order.
    pub fn after(spec: &QuerySpec, doc: &Document) -> Self {
        let values = spec
            .sort
            .iter()
            .map(|key| match &key.field {
                Field::Data(path) => {
                    let value = data_sort_value(doc, path);
                    let (number, text) = match value {
                        DataSortValue::Bool(b) => (u8::from(b).to_string(), String::new()),
                        DataSortValue::Number(n) => (n.to_string(), String::new()),
                        DataSortValue::Text(s) => ("0".to_owned(), s.to_owned()),
                        _ => ("0".to_owned(), String::new()),
                    };
                    KeyValue::Data {
                        rank: i16::from(value.rank()),
                        number,
                        text,
                    }
                }
                Field::Id => KeyValue::Id(doc.id),
                Field::Owner => KeyValue::Text(doc.owner.clone()),
                Field::Type => KeyValue::Text(doc.doc_type.clone()),
                Field::CreatedAt => KeyValue::Time(doc.created_at),
                Field::UpdatedAt => KeyValue::Time(doc.updated_at),
                // Not a sort key (refused by the parser), so never part of a keyset.
                Field::Parent => KeyValue::Id(doc.parent.unwrap_or_default()),
            })
            .collect();
        Self { values, id: doc.id }
    }

    /// What a cursor of `spec` carries to be told from another query's: a digest of the type,
    /// the scope and the sort keys with their directions. Two sorts of one shape (`-data.a`
    /// and `data.b`) hold values of the same kinds, so the values alone cannot tell them apart.
    /// The filter and the limit are left out: a position in one order over one set of documents
    /// stays meaningful when a client narrows the filter or changes the page size between pages.
    pub fn signature(spec: &QuerySpec) -> String {
        let mut text = format!("{}\n", spec.doc_type);
        match &spec.scope {
            Scope::Own(did) => text.push_str(&format!("own {did}\n")),
            Scope::Global => text.push_str("global\n"),
            Scope::Shared(did) => text.push_str(&format!("shared {did}\n")),
        }
        for key in &spec.sort {
            let direction = if key.descending { '-' } else { '+' };
            text.push_str(&format!("{direction}{}\n", key.field.name()));
        }
        let digest = Sha256::digest(text.as_bytes());
        // 96 bits: a cursor of another query passing for this one by chance is out of reach.
        URL_SAFE_NO_PAD.encode(&digest[..12])
    }

    /// The cursor text of this position in `spec`'s order.
    pub fn encode(&self, spec: &QuerySpec) -> String {
        let mut items: Vec<Value> = vec![json!(Self::signature(spec))];
        items.extend(self.values.iter().map(|v| match v {
            KeyValue::Data { rank, number, text } => json!([rank, number, text]),
            KeyValue::Text(s) => json!(s),
            KeyValue::Id(id) => json!(id),
            KeyValue::Time(t) => json!(t.timestamp_micros()),
        }));
        items.push(json!(self.id));
        URL_SAFE_NO_PAD.encode(Value::Array(items).to_string())
    }

    /// Reads a cursor made by [`Keyset::encode`] for a query sorted like `spec`.
    pub fn decode(spec: &QuerySpec, cursor: &str) -> Result<Self, QueryError> {
        let bad = || {
            invalid(
                "cursor",
                "not a cursor of this query; pass `next` as returned",
            )
        };
        if cursor.len() > MAX_CURSOR_LEN {
            return Err(bad());
        }
        let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
        let Ok(Value::Array(mut items)) = serde_json::from_slice::<Value>(&bytes) else {
            return Err(bad());
        };
        if items.iter().any(super::holds_nul) {
            return Err(bad());
        }
        // A cursor of the previous version (no signature) is still taken, so a client paging
        // through nodes of both during a rolling upgrade goes on; it is checked as it was then.
        let legacy = items.len() == spec.sort.len() + 1;
        if !legacy
            && (items.len() != spec.sort.len() + 2
                || items.remove(0).as_str() != Some(Self::signature(spec).as_str()))
        {
            return Err(bad());
        }
        let id = items
            .pop()
            .and_then(|v| v.as_str().and_then(|s| Uuid::try_parse(s).ok()))
            .ok_or_else(bad)?;
        let values = spec
            .sort
            .iter()
            .zip(items)
            .map(|(key, item)| {
                Some(match &key.field {
                    Field::Data(_) => {
                        let [rank, number, text] =
                            <[Value; 3]>::try_from(item.as_array()?.clone()).ok()?;
                        let rank = i16::try_from(rank.as_u64()?).ok().filter(|r| *r <= 5)?;
                        let number = number.as_str().filter(|n| numeric_text(n))?;
                        KeyValue::Data {
                            rank,
                            number: number.to_owned(),
                            text: text.as_str()?.to_owned(),
                        }
                    }
                    Field::Id => KeyValue::Id(Uuid::try_parse(item.as_str()?).ok()?),
                    // Not a sort key: a cursor naming it is not one this server issued.
                    Field::Parent => return None,
                    Field::Owner | Field::Type => KeyValue::Text(item.as_str()?.to_owned()),
                    Field::CreatedAt | Field::UpdatedAt => KeyValue::Time(
                        DateTime::from_timestamp_micros(item.as_i64()?)
                            .filter(super::storable_time)?,
                    ),
                })
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(bad)?;
        Ok(Self { values, id })
    }
}

/// Whether `number` is decimal text the database takes as `numeric`: what a JSON number prints
/// as (an exponent within a double's range, a few dozen characters). A finite double alone is
/// not enough: `0e-100000` parses as 0 but overflows `numeric` and would fail the statement.
fn numeric_text(number: &str) -> bool {
    const MAX_CHARS: usize = 64;
    const MAX_EXPONENT: i32 = 400;
    if number.len() > MAX_CHARS || !number.parse::<f64>().is_ok_and(f64::is_finite) {
        return false;
    }
    match number.split_once(['e', 'E']) {
        Some((_, exponent)) => exponent
            .parse::<i32>()
            .is_ok_and(|e| e.abs() <= MAX_EXPONENT),
        None => true,
    }
}
