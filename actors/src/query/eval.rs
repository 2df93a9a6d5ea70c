//! The in-memory evaluator: a filter against one document, and sort-key comparison. It mirrors
//! the SQL the server compiles (PostgreSQL jsonb semantics), which property tests check.

use std::cmp::Ordering;
use std::collections::HashSet;

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

/// Numbers by value, exactly, as PostgreSQL's numeric compares them: integers as integers,
/// an integer against a double by the double's exact value (comparing that pair as doubles
/// instead made the order cyclic beyond 2^53 — 2^53 + 1 above 2^53 as integers, both equal to
/// the double 2^53 — and a sort may panic on a cyclic order). The evaluators still differ where
/// a JSON number has more digits than a double holds: here it is read as the nearest double.
fn compare_numbers(a: &serde_json::Number, b: &serde_json::Number) -> Ordering {
    match (exact_integer(a), exact_integer(b)) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(x), None) => integer_against_double(x, b.as_f64().unwrap_or(0.0)),
        (None, Some(y)) => integer_against_double(y, a.as_f64().unwrap_or(0.0)).reverse(),
        (None, None) => {
            let (x, y) = (a.as_f64().unwrap_or(0.0), b.as_f64().unwrap_or(0.0));
            x.partial_cmp(&y).unwrap_or(Ordering::Equal)
        }
    }
}

fn exact_integer(n: &serde_json::Number) -> Option<i128> {
    n.as_i64()
        .map(i128::from)
        .or_else(|| n.as_u64().map(i128::from))
}

/// `i` against the exact value of the (finite) double `f`.
fn integer_against_double(i: i128, f: f64) -> Ordering {
    // 2^127: every double below it in magnitude has its whole part in an i128.
    const BOUND: f64 = 1.701_411_834_604_692_3e38;
    if f >= BOUND {
        return Ordering::Less;
    }
    if f < -BOUND {
        return Ordering::Greater;
    }
    // A whole double converts exactly; then the fraction decides a tie.
    match i.cmp(&(f.trunc() as i128)) {
        Ordering::Equal => 0.0_f64.partial_cmp(&f.fract()).unwrap_or(Ordering::Equal),
        unequal => unequal,
    }
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
        (Value::Array(f), Value::Array(e)) => {
            let (scalars, nested): (Vec<&Value>, Vec<&Value>) =
                e.iter().partition(|ev| is_scalar(ev));
            // Many scalars are looked up by their canonical text (equal for values jsonb holds
            // equal, as `json_eq` compares them), not each by a scan of the stored list:
            // elements × stored elements could be billions. The parser bounds `nested`.
            let scalars_held = if scalars.len() > 8 {
                let held: HashSet<String> = f
                    .iter()
                    .filter(|fv| is_scalar(fv))
                    .map(super::canonical_text)
                    .collect();
                scalars
                    .iter()
                    .all(|ev| held.contains(&super::canonical_text(ev)))
            } else {
                scalars
                    .iter()
                    .all(|ev| f.iter().any(|fv| is_scalar(fv) && json_eq(fv, ev)))
            };
            scalars_held && nested.iter().all(|ev| f.iter().any(|fv| contains(fv, ev)))
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn number(v: serde_json::Value) -> serde_json::Number {
        match v {
            Value::Number(n) => n,
            other => panic!("not a number: {other}"),
        }
    }

    #[test]
    fn numbers_compare_exactly_and_in_a_total_order() {
        // 2^53 + 1 as an integer, 2^53 as a double, 2^53 as an integer: comparing the mixed
        // pairs as doubles made these a cycle.
        let above = number(json!(9_007_199_254_740_993_u64));
        let double = number(json!(9_007_199_254_740_992.0));
        let integer = number(json!(9_007_199_254_740_992_u64));
        assert_eq!(compare_numbers(&double, &integer), Ordering::Equal);
        assert_eq!(compare_numbers(&above, &double), Ordering::Greater);
        assert_eq!(compare_numbers(&above, &integer), Ordering::Greater);
        assert_eq!(compare_numbers(&integer, &above), Ordering::Less);
        // Fractions, signs and the ends of the range.
        assert_eq!(
            compare_numbers(&number(json!(2)), &number(json!(2.5))),
            Ordering::Less
        );
        assert_eq!(
            compare_numbers(&number(json!(-2)), &number(json!(-2.5))),
            Ordering::Greater
        );
        assert_eq!(
            compare_numbers(&number(json!(-3)), &number(json!(-2.5))),
            Ordering::Less
        );
        assert_eq!(
            compare_numbers(&number(json!(i64::MIN)), &number(json!(-1e300))),
            Ordering::Greater
        );
        assert_eq!(
            compare_numbers(&number(json!(u64::MAX)), &number(json!(1e300))),
            Ordering::Less
        );
        assert_eq!(
            compare_numbers(&number(json!(1.5)), &number(json!(1.25))),
            Ordering::Greater
        );
    }
}
