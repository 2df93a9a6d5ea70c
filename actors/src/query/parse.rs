//! From the wire form of a query to a normalised [`QuerySpec`], with an error that names the
//! offending part for everything that is not a valid query.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{
    CanonicalValue, Comparison, Field, Filter, MAX_PATH_DEPTH, MAX_SORT_KEYS, Operand, Predicate,
    QueryError, QueryRequest, QuerySpec, Scope, Sort, SortRequest, invalid, is_path_segment,
};

/// Limits applied while parsing (configurable: `[query]` in the server's config).
#[derive(Debug, Clone, Copy)]
pub struct QueryLimits {
    pub default_limit: u32,
    pub max_limit: u32,
    /// Nesting of `and` / `or` / `not`; the top-level `where` is depth 1.
    pub max_depth: usize,
    /// Conditions in one query, counting each value of an `in` / `nin` list and each condition
    /// object inside `and` / `or` / `not`.
    pub max_clauses: usize,
    /// Bytes (as JSON) all the operands of one query hold together.
    pub max_operand_bytes: usize,
}

impl Default for QueryLimits {
    /// The defaults of `config/default.toml`.
    fn default() -> Self {
        Self {
            default_limit: 100,
            max_limit: 1000,
            max_depth: 6,
            max_clauses: 64,
            max_operand_bytes: 16 * 1024,
        }
    }
}

const OPERATORS: [&str; 11] = [
    "eq",
    "ne",
    "gt",
    "gte",
    "lt",
    "lte",
    "in",
    "nin",
    "exists",
    "contains",
    "startsWith",
];

pub(super) fn parse(
    request: &QueryRequest,
    caller: &str,
    limits: QueryLimits,
) -> Result<QuerySpec, QueryError> {
    if !crate::doc_type::is_valid(&request.doc_type) {
        return Err(invalid(
            "type",
            "a type name matches ^[a-z][a-z0-9_.-]{0,63}$",
        ));
    }
    if request
        .filter
        .iter()
        .any(|(k, v)| k.contains('\0') || super::holds_nul(v))
    {
        return Err(invalid("where", "strings may not contain \\u0000"));
    }
    let mut parser = Parser {
        limits,
        clauses: 0,
        operand_bytes: 0,
    };
    let filter = parser.object(&request.filter, "where", 1)?;
    let sort = sort(request.sort.as_ref())?;
    let limit = request.limit.unwrap_or(limits.default_limit);
    if limit == 0 || limit > limits.max_limit {
        return Err(invalid(
            "limit",
            format!("limit is 1 to {}", limits.max_limit),
        ));
    }
    let scope = match (request.global, request.shared) {
        (true, true) => return Err(invalid("shared", "a query is global or shared, not both")),
        (true, false) => Scope::Global,
        (false, true) => Scope::Shared(caller.to_owned()),
        (false, false) => Scope::Own(caller.to_owned()),
    };
    Ok(QuerySpec {
        doc_type: request.doc_type.clone(),
        scope,
        filter,
        sort,
        limit,
    })
}

/// A field name as written in `where`, `sort` and `expand`.
pub(super) fn field(name: &str) -> Result<Field, String> {
    Ok(match name {
        "id" => Field::Id,
        "owner" => Field::Owner,
        "type" => Field::Type,
        "createdAt" => Field::CreatedAt,
        "updatedAt" => Field::UpdatedAt,
        "parent" => Field::Parent,
        other => {
            let Some(rest) = other.strip_prefix("data.") else {
                return Err(
                    "a field is `id`, `owner`, `type`, `createdAt`, `updatedAt`, `parent` or a \
                     path under `data.` such as `data.author.name`"
                        .into(),
                );
            };
            // One past the limit is enough to refuse: a long key is not split whole.
            let segments: Vec<String> = rest
                .split('.')
                .take(MAX_PATH_DEPTH + 1)
                .map(str::to_owned)
                .collect();
            if segments.len() > MAX_PATH_DEPTH {
                return Err(format!("a path has at most {MAX_PATH_DEPTH} segments"));
            }
            if let Some(bad) = segments.iter().find(|s| !is_path_segment(s)) {
                return Err(format!(
                    "path segment {bad:?} is not a key name: letters, digits, `_`, `-` and `$`, \
                     starting with a letter, `_` or `$` (array positions cannot be addressed)"
                ));
            }
            Field::Data(segments)
        }
    })
}

struct Parser {
    limits: QueryLimits,
    clauses: usize,
    operand_bytes: usize,
}

/// Most objects or lists a `contains` operand holds inside its lists: each is looked for among
/// all the elements of a stored list, one by one.
const MAX_CONTAINS_NESTED: usize = 16;

impl Parser {
    /// A `where` object: the conjunction of its entries.
    fn object(
        &mut self,
        map: &serde_json::Map<String, serde_json::Value>,
        part: &str,
        depth: usize,
    ) -> Result<Filter, QueryError> {
        if depth > self.limits.max_depth {
            return Err(invalid(
                part,
                format!(
                    "conditions nest at most {} deep (and / or / not)",
                    self.limits.max_depth
                ),
            ));
        }
        // A condition object inside `and` / `or` / `not` counts, so the limit bounds the whole
        // tree (empty objects and lists of them included), not only its leaves.
        if depth > 1 {
            self.count(part, 1)?;
        }
        let mut members = Vec::with_capacity(map.len());
        for (key, value) in map {
            let here = format!("{part}.{key}");
            match key.as_str() {
                "and" | "or" => {
                    let Some(items) = value.as_array() else {
                        return Err(invalid(here, format!("`{key}` takes a list of conditions")));
                    };
                    if items.is_empty() && key == "or" {
                        return Err(invalid(here, "`or` needs at least one condition"));
                    }
                    let mut inner = Vec::with_capacity(items.len());
                    for (i, item) in items.iter().enumerate() {
                        let here = format!("{here}[{i}]");
                        let Some(object) = item.as_object() else {
                            return Err(invalid(here, "a condition is a JSON object"));
                        };
                        inner.push(self.object(object, &here, depth + 1)?);
                    }
                    members.push(if key == "and" {
                        Filter::all(inner)
                    } else {
                        Filter::any(inner)
                    });
                }
                "not" => {
                    let Some(object) = value.as_object() else {
                        return Err(invalid(here, "`not` takes one condition object"));
                    };
                    members.push(self.object(object, &here, depth + 1)?.negate());
                }
                name => {
                    let field = field(name).map_err(|message| invalid(&here, message))?;
                    members.push(self.condition(&field, value, &here)?);
                }
            }
        }
        Ok(Filter::all(members))
    }

    /// `field: value` (equality) or `field: {op: operand, ...}` (all of them).
    fn condition(
        &mut self,
        field: &Field,
        value: &serde_json::Value,
        part: &str,
    ) -> Result<Filter, QueryError> {
        if let Some(object) = value.as_object() {
            let operators = object
                .keys()
                .filter(|k| OPERATORS.contains(&k.as_str()))
                .count();
            if operators > 0 && operators == object.len() {
                let mut members = Vec::with_capacity(object.len());
                for (op, operand) in object {
                    members.push(self.operator(field, op, operand, &format!("{part}.{op}"))?);
                }
                return Ok(Filter::all(members));
            }
            if operators > 0 {
                return Err(invalid(
                    part,
                    "mixes operators with other keys; to compare with such an object write \
                     {\"eq\": {...}}",
                ));
            }
        }
        self.operator(field, "eq", value, part)
    }

    fn operator(
        &mut self,
        field: &Field,
        op: &str,
        operand: &serde_json::Value,
        part: &str,
    ) -> Result<Filter, QueryError> {
        self.count(part, 1)?;
        self.operand_bytes = self
            .operand_bytes
            .saturating_add(crate::window::json_len(operand));
        if self.operand_bytes > self.limits.max_operand_bytes {
            return Err(invalid(
                part,
                format!(
                    "the operands of a query hold at most {} bytes of JSON together",
                    self.limits.max_operand_bytes
                ),
            ));
        }
        let data_path = || match field {
            Field::Data(path) => Ok(path.clone()),
            other => Err(invalid(
                part,
                format!("`{op}` applies to data paths, not `{}`", other.name()),
            )),
        };
        Ok(match op {
            "eq" | "ne" => {
                let eq = Filter::Is(Predicate::Eq(
                    field.clone(),
                    operand_for(field, operand, part)?,
                ));
                if op == "ne" { eq.negate() } else { eq }
            }
            "in" | "nin" => {
                let items = match operand.as_array() {
                    Some(items) if !items.is_empty() => items,
                    _ => return Err(invalid(part, format!("`{op}` takes a non-empty list"))),
                };
                self.count(part, items.len() - 1)?;
                let mut values = items
                    .iter()
                    .map(|item| operand_for(field, item, part))
                    .collect::<Result<Vec<_>, _>>()?;
                values.sort();
                values.dedup();
                let one_of = if values.len() == 1 {
                    Predicate::Eq(field.clone(), values.remove(0))
                } else {
                    Predicate::In(field.clone(), values)
                };
                let one_of = Filter::Is(one_of);
                if op == "nin" { one_of.negate() } else { one_of }
            }
            "gt" | "gte" | "lt" | "lte" => {
                let comparison = match op {
                    "gt" => Comparison::Gt,
                    "gte" => Comparison::Gte,
                    "lt" => Comparison::Lt,
                    _ => Comparison::Lte,
                };
                let value = operand_for(field, operand, part)?;
                if let Operand::Json(json) = &value
                    && !(json.value().is_number() || json.value().is_string())
                {
                    return Err(invalid(
                        part,
                        format!("`{op}` compares with a number or a string"),
                    ));
                }
                Filter::Is(Predicate::Compare(field.clone(), comparison, value))
            }
            "exists" => {
                if !matches!(field, Field::Data(_) | Field::Parent) {
                    return Err(invalid(
                        part,
                        format!(
                            "`exists` applies to data paths and `parent`, not `{}` (every \
                             document has one)",
                            field.name()
                        ),
                    ));
                }
                let Some(present) = operand.as_bool() else {
                    return Err(invalid(part, "`exists` takes true or false"));
                };
                let exists = Filter::Is(Predicate::Exists(field.clone()));
                if present { exists } else { exists.negate() }
            }
            "contains" => {
                let path = data_path()?;
                if nested_in_lists(operand) > MAX_CONTAINS_NESTED {
                    return Err(invalid(
                        part,
                        format!(
                            "a `contains` operand holds at most {MAX_CONTAINS_NESTED} objects or \
                             lists inside its lists"
                        ),
                    ));
                }
                Filter::Is(Predicate::Contains(path, CanonicalValue::new(operand)))
            }
            "startsWith" => {
                if matches!(
                    field,
                    Field::Id | Field::CreatedAt | Field::UpdatedAt | Field::Parent
                ) {
                    return Err(invalid(
                        part,
                        format!("`startsWith` applies to strings, not `{}`", field.name()),
                    ));
                }
                let Some(prefix) = operand.as_str() else {
                    return Err(invalid(part, "`startsWith` takes a string"));
                };
                Filter::Is(Predicate::StartsWith(field.clone(), prefix.to_owned()))
            }
            other => {
                return Err(invalid(
                    part,
                    format!(
                        "unknown operator `{other}`; operators are {}",
                        OPERATORS.join(" ")
                    ),
                ));
            }
        })
    }

    fn count(&mut self, part: &str, n: usize) -> Result<(), QueryError> {
        self.clauses += n;
        if self.clauses > self.limits.max_clauses {
            return Err(invalid(
                part,
                format!(
                    "a query has at most {} conditions (each `in` value counts)",
                    self.limits.max_clauses
                ),
            ));
        }
        Ok(())
    }
}

/// How many objects and lists `value` holds as elements of its lists, at any depth.
fn nested_in_lists(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Array(items) => items
            .iter()
            .map(|item| usize::from(item.is_array() || item.is_object()) + nested_in_lists(item))
            .sum(),
        serde_json::Value::Object(map) => map.values().map(nested_in_lists).sum(),
        _ => 0,
    }
}

/// The operand typed for `field`.
fn operand_for(
    field: &Field,
    value: &serde_json::Value,
    part: &str,
) -> Result<Operand, QueryError> {
    let text = || {
        value.as_str().ok_or_else(|| {
            invalid(
                part,
                format!("`{}` is compared with a string", field.name()),
            )
        })
    };
    Ok(match field {
        Field::Id | Field::Parent => {
            let id = text()
                .ok()
                .and_then(|s| Uuid::try_parse(s).ok())
                .ok_or_else(|| {
                    invalid(
                        part,
                        format!("`{}` is compared with a UUID string", field.name()),
                    )
                })?;
            Operand::Id(id)
        }
        Field::Owner | Field::Type => Operand::Text(text()?.to_owned()),
        Field::CreatedAt | Field::UpdatedAt => {
            Operand::Time(timestamp(value).ok_or_else(|| {
                invalid(
                    part,
                    format!(
                        "`{}` is compared with an RFC 3339 timestamp between years 1 and 9999 \
                     (e.g. \"2026-11-26T10:00:00Z\")",
                        field.name()
                    ),
                )
            })?)
        }
        Field::Data(_) => Operand::Json(CanonicalValue::new(value)),
    })
}

/// An RFC 3339 timestamp cut to microseconds, the database's precision, so that both evaluators
/// compare with the same instant.
fn timestamp(value: &serde_json::Value) -> Option<DateTime<Utc>> {
    let parsed = DateTime::parse_from_rfc3339(value.as_str()?).ok()?.to_utc();
    if !super::storable_time(&parsed) {
        return None;
    }
    DateTime::from_timestamp_micros(parsed.timestamp_micros())
}

fn sort(request: Option<&SortRequest>) -> Result<Vec<Sort>, QueryError> {
    let (keys, listed): (Vec<&str>, bool) = match request {
        None => (vec!["-createdAt"], false),
        Some(SortRequest::One(key)) => (vec![key.as_str()], false),
        Some(SortRequest::Many(keys)) => (keys.iter().map(String::as_str).collect(), true),
    };
    if keys.is_empty() || keys.len() > MAX_SORT_KEYS {
        return Err(invalid(
            "sort",
            format!("sort has 1 to {MAX_SORT_KEYS} keys"),
        ));
    }
    let mut sort: Vec<Sort> = Vec::with_capacity(keys.len());
    for (i, key) in keys.into_iter().enumerate() {
        let part = if listed {
            format!("sort[{i}]")
        } else {
            "sort".to_owned()
        };
        let (descending, name) = match key.strip_prefix('-') {
            Some(name) => (true, name),
            None => (false, key),
        };
        let field = field(name).map_err(|message| {
            invalid(&part, format!("{message}; a leading `-` sorts descending"))
        })?;
        if field == Field::Parent {
            return Err(invalid(part, "`parent` is not a sort key"));
        }
        if sort.iter().any(|s| s.field == field) {
            return Err(invalid(part, format!("sorts twice by `{name}`")));
        }
        sort.push(Sort { field, descending });
    }
    Ok(sort)
}
