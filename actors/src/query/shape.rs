//! A query's shape — its structure with every value replaced by the value's kind — for index
//! governance: shapes are counted and timed without recording what anyone queried for, and the
//! data paths a shape compares by range name the expression indexes that could serve it.

use serde_json::{Value, json};

use super::{Field, Filter, Operand, Predicate, QuerySpec, Scope};

/// The kind of a value, the only thing a shape keeps of it.
fn kind(operand: &Operand) -> &'static str {
    match operand {
        Operand::Json(v) => match v.value() {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        },
        Operand::Text(_) => "string",
        Operand::Id(_) => "id",
        Operand::Time(_) => "time",
    }
}

fn filter_shape(filter: &Filter) -> Value {
    match filter {
        Filter::All(members) => {
            json!({"and": members.iter().map(filter_shape).collect::<Vec<_>>()})
        }
        Filter::Any(members) => json!({"or": members.iter().map(filter_shape).collect::<Vec<_>>()}),
        Filter::Not(inner) => json!({"not": filter_shape(inner)}),
        Filter::Is(predicate) => {
            let (field, op, kind) = match predicate {
                Predicate::Eq(f, v) => (f.name(), "eq", kind(v)),
                Predicate::In(f, vs) => (f.name(), "in", vs.first().map_or("null", kind)),
                Predicate::Compare(f, c, v) => (f.name(), c.name(), kind(v)),
                Predicate::Exists(f) => (f.name(), "exists", "boolean"),
                Predicate::Contains(path, v) => (
                    Field::Data(path.clone()).name(),
                    "contains",
                    kind(&Operand::Json(v.clone())),
                ),
                Predicate::StartsWith(f, _) => (f.name(), "startsWith", "string"),
            };
            json!({"field": field, "op": op, "kind": kind})
        }
    }
}

impl QuerySpec {
    /// The shape: type, scope (own or global, not whose), filter structure with value kinds,
    /// sort. Equal for queries that differ only in values (and limit).
    pub fn shape(&self) -> Value {
        let sort: Vec<String> = self
            .sort
            .iter()
            .map(|s| format!("{}{}", if s.descending { "-" } else { "" }, s.field.name()))
            .collect();
        json!({
            "type": self.doc_type,
            "scope": match self.scope {
                Scope::Own(_) => "own",
                Scope::Global => "global",
                Scope::Shared(_) => "shared",
            },
            "where": filter_shape(&self.filter),
            "sort": sort,
        })
    }
}

/// Which expression over a data path an index holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IndexKind {
    /// `(data #> '{path}')`: numbers (jsonb orders them by value).
    Json,
    /// `((data #>> '{path}') COLLATE "C")`: strings in code-point order.
    Text,
}

impl IndexKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IndexKind::Json => "number",
            IndexKind::Text => "string",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "number" => Some(IndexKind::Json),
            "string" => Some(IndexKind::Text),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::{QueryLimits, QueryRequest};

    fn spec(v: Value, caller: &str) -> QuerySpec {
        let request: QueryRequest = serde_json::from_value(v).unwrap();
        QuerySpec::parse(&request, caller, QueryLimits::default()).unwrap()
    }

    #[test]
    fn shapes_keep_structure_and_kinds_not_values() {
        let a = spec(
            json!({"type": "items", "where": {"data.score": {"gte": 990}, "data.tag": "secret"}, "limit": 5}),
            "did:key:zA",
        );
        let b = spec(
            json!({"type": "items", "where": {"data.score": {"gte": 1.5}, "data.tag": "other"}}),
            "did:key:zB",
        );
        assert_eq!(a.shape(), b.shape());
        assert!(!a.shape().to_string().contains("secret"));
        assert!(!a.shape().to_string().contains("did:key"));
        let c = spec(
            json!({"type": "items", "where": {"data.score": {"gte": "990"}}}),
            "did:key:zA",
        );
        assert_ne!(a.shape(), c.shape(), "the kind is part of the shape");
    }
}
