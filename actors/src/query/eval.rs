//! The in-memory evaluator: a filter against one document, and sort-key comparison. It mirrors
//! the SQL the server compiles (PostgreSQL jsonb semantics), which property tests check.

use std::cmp::Ordering;

use serde_json::Value;

use super::{DocRef, Field, Filter, Operand, Predicate};
use crate::wire::Document;

pub(super) fn filter(filter: &Filter, doc: &DocRef<'_>) -> bool {
    match filter {
        Filter::All(members) => members.iter().all(|m| self::filter(m, doc)),
        Filter::Any(members) => members.iter().any(|m| self::filter(m, doc)),
        Filter::Not(inner) => !self::filter(inner, doc),
        Filter::Is(predicate) => holds(predicate, doc),
    }
}

/// The value at a data path, walking objects only (jsonb `#>` with non-numeric keys).
pub fn lookup<'a>(data: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(data, |v, segment| match v {
        Value::Object(map) => map.get(segment),
        _ => None,
    })
}

/// A core field's value, typed like its operands.
enum Core<'a> {
    Text(&'a str),
    Id(uuid::Uuid),
    Time(chrono::DateTime<chrono::Utc>),
}

fn core<'a>(field: &Field, doc: &DocRef<'a>) -> Option<Core<'a>> {
    Some(match field {
        Field::Id => Core::Id(doc.id),
        Field::Owner => Core::Text(doc.owner),
        Field::Type => Core::Text(doc.doc_type),
        Field::CreatedAt => Core::Time(doc.created_at),
        Field::UpdatedAt => Core::Time(doc.updated_at),
        Field::Parent => Core::Id(doc.parent?),
        Field::Data(_) => return None,
    })
}

/// Field against operand, when they are of one kind.
fn compare(field: &Field, operand: &Operand, doc: &DocRef<'_>) -> Option<Ordering> {
    match (field, operand) {
        (Field::Data(path), Operand::Json(expected)) => {
            let found = lookup(doc.data, path)?;
            match (found, expected.value()) {
                (Value::Number(a), Value::Number(b)) => Some(compare_numbers(a, b)),
                (Value::String(a), Value::String(b)) => Some(a.as_str().cmp(b.as_str())),
                _ => None,
            }
        }
        _ => match (core(field, doc)?, operand) {
            (Core::Text(a), Operand::Text(b)) => Some(a.cmp(b.as_str())),
            (Core::Id(a), Operand::Id(b)) => Some(a.cmp(b)),
            (Core::Time(a), Operand::Time(b)) => Some(a.cmp(b)),
            _ => None,
        },
    }
}

fn equals(field: &Field, operand: &Operand, doc: &DocRef<'_>) -> bool {
    match (field, operand) {
        (Field::Data(path), Operand::Json(expected)) => {
            lookup(doc.data, path).is_some_and(|found| json_eq(found, expected.value()))
        }
        _ => compare(field, operand, doc).is_some_and(Ordering::is_eq),
    }
}

fn holds(predicate: &Predicate, doc: &DocRef<'_>) -> bool {
    match predicate {
        Predicate::Eq(field, operand) => equals(field, operand, doc),
        Predicate::In(field, operands) => operands.iter().any(|o| equals(field, o, doc)),
        Predicate::Compare(field, comparison, operand) => {
            compare(field, operand, doc).is_some_and(|ord| comparison.holds(ord))
        }
        Predicate::Exists(Field::Data(path)) => lookup(doc.data, path).is_some(),
        Predicate::Exists(field) => core(field, doc).is_some(),
        Predicate::Contains(path, expected) => {
            lookup(doc.data, path).is_some_and(|found| contains_top(found, expected.value()))
        }
        Predicate::StartsWith(field, prefix) => match field {
            Field::Data(path) => {
                matches!(lookup(doc.data, path), Some(Value::String(s)) if s.starts_with(prefix.as_str()))
            }
            _ => matches!(core(field, doc), Some(Core::Text(s)) if s.starts_with(prefix.as_str())),
        },
    }
}

/// Numbers by value, as PostgreSQL's numeric: integers exactly, otherwise as doubles (which is
/// where the two evaluators may differ: beyond 2^53, or past 15 significant digits).
fn compare_numbers(a: &serde_json::Number, b: &serde_json::Number) -> Ordering {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        return x.cmp(&y);
    }
    if let (Some(x), Some(y)) = (a.as_u64(), b.as_u64()) {
        return x.cmp(&y);
    }
    let (x, y) = (a.as_f64().unwrap_or(0.0), b.as_f64().unwrap_or(0.0));
    x.partial_cmp(&y).unwrap_or(Ordering::Equal)
}

/// jsonb equality: numbers by value, arrays element by element, objects key by key.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => compare_numbers(x, y).is_eq(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_eq(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

fn is_scalar(v: &Value) -> bool {
    !(v.is_array() || v.is_object())
}

/// `found @> expected` at the top level, where PostgreSQL lets an array contain a scalar.
fn contains_top(found: &Value, expected: &Value) -> bool {
    match (found, expected) {
        (Value::Array(items), e) if is_scalar(e) => {
            items.iter().any(|i| is_scalar(i) && json_eq(i, e))
        }
        (f, e) if is_scalar(f) && is_scalar(e) => json_eq(f, e),
        (f, e) => contains(f, e),
    }
}

/// jsonb containment below the top level: containers of the same kind, recursively; scalars
/// equal.
fn contains(found: &Value, expected: &Value) -> bool {
    match (found, expected) {
        (Value::Object(f), Value::Object(e)) => e.iter().all(|(k, ev)| {
            f.get(k).is_some_and(|fv| {
                if is_scalar(ev) {
                    is_scalar(fv) && json_eq(fv, ev)
                } else {
                    contains(fv, ev)
                }
            })
        }),
        (Value::Array(f), Value::Array(e)) => e.iter().all(|ev| {
            if is_scalar(ev) {
                f.iter().any(|fv| is_scalar(fv) && json_eq(fv, ev))
            } else {
                f.iter().any(|fv| contains(fv, ev))
            }
        }),
        _ => false,
    }
}

/// A data value's place in sort order: kind first (missing, null, boolean, number, string, then
/// arrays and objects as one kind), then value.
#[derive(Debug, Clone, Copy)]
pub(crate) enum DataSortValue<'a> {
    Missing,
    Null,
    Bool(bool),
    Number(&'a serde_json::Number),
    Text(&'a str),
    Container,
}

impl DataSortValue<'_> {
    pub(crate) fn rank(self) -> u8 {
        match self {
            DataSortValue::Missing => 0,
            DataSortValue::Null => 1,
            DataSortValue::Bool(_) => 2,
            DataSortValue::Number(_) => 3,
            DataSortValue::Text(_) => 4,
            DataSortValue::Container => 5,
        }
    }

    fn cmp(self, other: Self) -> Ordering {
        match (self, other) {
            (DataSortValue::Bool(a), DataSortValue::Bool(b)) => a.cmp(&b),
            (DataSortValue::Number(a), DataSortValue::Number(b)) => compare_numbers(a, b),
            (DataSortValue::Text(a), DataSortValue::Text(b)) => a.cmp(b),
            (a, b) => a.rank().cmp(&b.rank()),
        }
    }
}

pub(crate) fn data_sort_value<'a>(doc: &'a Document, path: &[String]) -> DataSortValue<'a> {
    match lookup(&doc.data, path) {
        None => DataSortValue::Missing,
        Some(Value::Null) => DataSortValue::Null,
        Some(Value::Bool(b)) => DataSortValue::Bool(*b),
        Some(Value::Number(n)) => DataSortValue::Number(n),
        Some(Value::String(s)) => DataSortValue::Text(s),
        Some(_) => DataSortValue::Container,
    }
}

pub(super) fn compare_sort_values(field: &Field, a: &Document, b: &Document) -> Ordering {
    match field {
        Field::Data(path) => data_sort_value(a, path).cmp(data_sort_value(b, path)),
        Field::Id => a.id.cmp(&b.id),
        Field::Owner => a.owner.cmp(&b.owner),
        Field::Type => a.doc_type.cmp(&b.doc_type),
        Field::CreatedAt => a.created_at.cmp(&b.created_at),
        Field::UpdatedAt => a.updated_at.cmp(&b.updated_at),
        // Not a sort key (the parser refuses it); any consistent order does.
        Field::Parent => a.parent.cmp(&b.parent),
    }
}
