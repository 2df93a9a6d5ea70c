//! The query compiler: a [`QuerySpec`] to one parameterised SQL statement with the semantics of
//! the in-memory evaluator (`vibe_actors::query`), which `tests/query_agreement.rs` checks.
//!
//! Invariant: every value travels as a bound parameter. The only non-constant text is a data
//! path, whose segments [`is_path_segment`] restricts to letters, digits, `_`, `-` and `$` —
//! never a quote — and which is written in as a literal so that expression indexes on the path
//! can serve the query (the planner matches index expressions on constants only).
//!
//! Index use: the owner / type / time conditions and sorts are served by the core BTREE indexes;
//! scalar equality, `in` and `contains` on data paths become `data @> …` (the GIN index); range
//! comparisons and sorts on `data #> '{path}'` use expression indexes where they exist.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::Row;
use uuid::Uuid;

use vibe_actors::query::keyset::{KeyValue, Keyset};
use vibe_actors::query::shape::IndexKind;
use vibe_actors::query::{
    CanonicalValue, Field, Filter, Operand, Predicate, QuerySpec, Scope, is_path_segment,
};

use super::{StoreError, document};
use crate::wire::Document;

/// One statement and its parameters, in order (`$1` is `binds[0]`).
#[derive(Debug)]
pub(super) struct Compiled {
    pub sql: String,
    pub binds: Vec<Bind>,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Bind {
    Text(String),
    Texts(Vec<String>),
    Json(Value),
    Id(Uuid),
    Ids(Vec<Uuid>),
    Time(DateTime<Utc>),
    Times(Vec<DateTime<Utc>>),
    SmallInt(i16),
    BigInt(i64),
}

struct Builder {
    binds: Vec<Bind>,
}

impl Builder {
    /// Adds a parameter and returns its placeholder.
    fn param(&mut self, bind: Bind) -> String {
        self.binds.push(bind);
        format!("${}", self.binds.len())
    }
}

/// `'{"a","b"}'`: a path literal. Segments are quoted so that a key spelled `null` stays a key.
fn path_literal(path: &[String]) -> String {
    debug_assert!(path.iter().all(|s| is_path_segment(s)));
    let quoted: Vec<String> = path
        .iter()
        // The parser admits only path segments; this keeps the invariant if that ever changes.
        .map(|s| {
            if is_path_segment(s) {
                format!("\"{s}\"")
            } else {
                "\"\"".to_owned()
            }
        })
        .collect();
    format!("'{{{}}}'", quoted.join(","))
}

/// The jsonb value at a data path (NULL when missing).
fn json_at(path: &[String]) -> String {
    format!("(data #> {})", path_literal(path))
}

/// The text of the value at a data path (a string's content).
fn text_at(path: &[String]) -> String {
    format!("(data #>> {})", path_literal(path))
}

fn column(field: &Field) -> &'static str {
    match field {
        Field::Id => "id",
        Field::Owner => "owner_did",
        Field::Type => "type",
        Field::CreatedAt => "created_at",
        Field::UpdatedAt => "updated_at",
        Field::Parent => "parent",
        // Data paths never reach here: callers match them first.
        Field::Data(_) => "data",
    }
}

/// The column as compared and sorted: text in code-point order, whatever the database's
/// collation, as the in-memory evaluator compares strings.
fn ordered_column(field: &Field) -> String {
    match field {
        Field::Owner | Field::Type => format!("{} COLLATE \"C\"", column(field)),
        other => column(other).to_owned(),
    }
}

fn operand_bind(operand: &Operand) -> Bind {
    match operand {
        Operand::Json(v) => Bind::Json(v.value().clone()),
        Operand::Text(s) => Bind::Text(s.clone()),
        Operand::Id(id) => Bind::Id(*id),
        Operand::Time(t) => Bind::Time(*t),
    }
}

/// `{"a": {"b": value}}` for path `a.b`.
fn nested(path: &[String], value: Value) -> Value {
    path.iter().rev().fold(value, |inner, segment| {
        let mut map = serde_json::Map::new();
        map.insert(segment.clone(), inner);
        Value::Object(map)
    })
}

/// Sets `value` at `path` in a nested object. False when another condition already put a value
/// on the way (`data.a = 1` and `data.a.b = 2` cannot both hold).
fn insert_path(root: &mut serde_json::Map<String, Value>, path: &[String], value: Value) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut node = root;
    for segment in parents {
        let entry = node
            .entry(segment.clone())
            .or_insert_with(|| Value::Object(Default::default()));
        let Value::Object(map) = entry else {
            return false;
        };
        node = map;
    }
    if node.contains_key(last) {
        return false;
    }
    node.insert(last.clone(), value);
    true
}

impl Builder {
    fn filter(&mut self, filter: &Filter) -> String {
        match filter {
            Filter::All(members) if members.is_empty() => "true".to_owned(),
            Filter::All(members) => {
                let parts: Vec<String> = members.iter().map(|m| self.filter(m)).collect();
                format!("({})", parts.join(" AND "))
            }
            Filter::Any(members) => {
                let parts: Vec<String> = members.iter().map(|m| self.filter(m)).collect();
                format!("({})", parts.join(" OR "))
            }
            // A condition on a missing field is NULL in SQL and false in memory; `IS NOT TRUE`
            // negates it to true, like the evaluator (plain NOT would keep it NULL).
            Filter::Not(inner) => format!("(({}) IS NOT TRUE)", self.filter(inner)),
            Filter::Is(predicate) => self.predicate(predicate),
        }
    }

    /// The top-level conjunction: scalar equalities on data paths merge into one containment,
    /// one GIN probe for all of them.
    fn top_filter(&mut self, filter: &Filter) -> String {
        let members: &[Filter] = match filter {
            Filter::All(members) => members,
            single => std::slice::from_ref(single),
        };
        let mut containment = serde_json::Map::new();
        let mut contradiction = false;
        let mut parts = Vec::new();
        for member in members {
            match member {
                Filter::Is(Predicate::Eq(Field::Data(path), Operand::Json(v)))
                    if !v.is_container() =>
                {
                    contradiction |= !insert_path(&mut containment, path, v.value().clone());
                }
                other => parts.push(self.filter(other)),
            }
        }
        if contradiction {
            return "false".to_owned();
        }
        if !containment.is_empty() {
            let p = self.param(Bind::Json(Value::Object(containment)));
            parts.insert(0, format!("data @> {p}"));
        }
        if parts.is_empty() {
            "true".to_owned()
        } else {
            parts.join(" AND ")
        }
    }

    fn data_eq(&mut self, path: &[String], value: &CanonicalValue) -> String {
        let p = self.param(Bind::Json(nested(path, value.value().clone())));
        if value.is_container() {
            // Containment alone would also accept a larger container; it narrows through the
            // GIN index, the equality decides.
            let v = self.param(Bind::Json(value.value().clone()));
            format!("(data @> {p} AND {} = {v})", json_at(path))
        } else {
            // A scalar is contained exactly when it is equal (jsonb compares numbers by value).
            format!("data @> {p}")
        }
    }

    fn predicate(&mut self, predicate: &Predicate) -> String {
        match predicate {
            Predicate::Eq(Field::Data(path), Operand::Json(v)) => self.data_eq(path, v),
            Predicate::Eq(field, operand) => {
                let p = self.param(operand_bind(operand));
                format!("{} = {p}", column(field))
            }
            Predicate::In(Field::Data(path), operands) => {
                let parts: Vec<String> = operands
                    .iter()
                    .filter_map(|o| match o {
                        Operand::Json(v) => Some(self.data_eq(path, v)),
                        _ => None,
                    })
                    .collect();
                if parts.is_empty() {
                    "false".to_owned()
                } else {
                    format!("({})", parts.join(" OR "))
                }
            }
            Predicate::In(field, operands) => {
                let bind = match field {
                    Field::Id | Field::Parent => Bind::Ids(
                        operands
                            .iter()
                            .filter_map(|o| match o {
                                Operand::Id(id) => Some(*id),
                                _ => None,
                            })
                            .collect(),
                    ),
                    Field::CreatedAt | Field::UpdatedAt => Bind::Times(
                        operands
                            .iter()
                            .filter_map(|o| match o {
                                Operand::Time(t) => Some(*t),
                                _ => None,
                            })
                            .collect(),
                    ),
                    _ => Bind::Texts(
                        operands
                            .iter()
                            .filter_map(|o| match o {
                                Operand::Text(s) => Some(s.clone()),
                                _ => None,
                            })
                            .collect(),
                    ),
                };
                let p = self.param(bind);
                format!("{} = ANY({p})", column(field))
            }
            Predicate::Compare(Field::Data(path), comparison, Operand::Json(v)) => {
                let op = comparison.sql();
                let x = json_at(path);
                match v.value() {
                    Value::String(s) => {
                        let p = self.param(Bind::Text(s.clone()));
                        format!(
                            "(jsonb_typeof({x}) = 'string' AND {} COLLATE \"C\" {op} {p})",
                            text_at(path)
                        )
                    }
                    number => {
                        let p = self.param(Bind::Json(number.clone()));
                        format!("(jsonb_typeof({x}) = 'number' AND {x} {op} {p})")
                    }
                }
            }
            Predicate::Compare(field, comparison, operand) => {
                let p = self.param(operand_bind(operand));
                format!("{} {} {p}", ordered_column(field), comparison.sql())
            }
            Predicate::Exists(Field::Data(path)) => format!("({} IS NOT NULL)", json_at(path)),
            Predicate::Exists(field) => format!("({} IS NOT NULL)", column(field)),
            Predicate::Contains(path, v) => {
                if v.is_container() {
                    // Below the top level, containment of a container is the same test.
                    let p = self.param(Bind::Json(nested(path, v.value().clone())));
                    format!("data @> {p}")
                } else {
                    // At the field itself, an array contains the scalars among its elements.
                    let scalar = self.param(Bind::Json(nested(path, v.value().clone())));
                    let element = self.param(Bind::Json(nested(
                        path,
                        Value::Array(vec![v.value().clone()]),
                    )));
                    format!("(data @> {scalar} OR data @> {element})")
                }
            }
            Predicate::StartsWith(Field::Data(path), prefix) => {
                let p = self.param(Bind::Text(prefix.clone()));
                format!(
                    "(jsonb_typeof({}) = 'string' AND starts_with({}, {p}))",
                    json_at(path),
                    text_at(path)
                )
            }
            Predicate::StartsWith(field, prefix) => {
                let p = self.param(Bind::Text(prefix.clone()));
                format!("starts_with({}, {p})", column(field))
            }
        }
    }
}

/// One column of a query's order.
struct OrderColumn {
    expression: String,
    descending: bool,
    /// How a keyset value binds against it (`::numeric` for the number column).
    cast: &'static str,
}

/// The SQL expressions a sort key orders by, each with the cast its keyset value needs. A data
/// path orders by kind, then number, then string — each expression non-null, so keyset
/// comparisons need no NULL cases.
fn sort_expressions(field: &Field) -> Vec<(String, &'static str)> {
    match field {
        Field::Data(path) => {
            let x = json_at(path);
            vec![
                (
                    format!(
                        "(CASE jsonb_typeof({x}) WHEN 'null' THEN 1 WHEN 'boolean' THEN 2 \
                     WHEN 'number' THEN 3 WHEN 'string' THEN 4 WHEN 'array' THEN 5 \
                     WHEN 'object' THEN 5 ELSE 0 END)"
                    ),
                    "",
                ),
                (
                    format!(
                        "(CASE jsonb_typeof({x}) WHEN 'number' THEN {x}::numeric \
                     WHEN 'boolean' THEN CASE WHEN {x}::boolean THEN 1 ELSE 0 END ELSE 0 END)"
                    ),
                    "::numeric",
                ),
                (
                    format!(
                        "((CASE WHEN jsonb_typeof({x}) = 'string' THEN {} ELSE '' END) COLLATE \"C\")",
                        text_at(path)
                    ),
                    "",
                ),
            ]
        }
        other => vec![(ordered_column(other), "")],
    }
}

/// Compiles `spec`: its documents (public ones the caller is not denied, for a global query
/// with a `caller`), after `after` in its order, at most `limit` rows.
pub(super) fn compile(
    spec: &QuerySpec,
    caller: Option<&str>,
    after: Option<&Keyset>,
    limit: i64,
) -> Compiled {
    let mut b = Builder { binds: Vec::new() };
    let doc_type = b.param(Bind::Text(spec.doc_type.clone()));
    let mut sql = format!(
        "SELECT {} FROM documents WHERE type = {doc_type}",
        super::DOC_COLUMNS
    );
    match &spec.scope {
        Scope::Own(owner) => {
            let p = b.param(Bind::Text(owner.clone()));
            let _ = write!(sql, " AND owner_did = {p}");
        }
        Scope::Global => {
            // The public documents the caller is not denied: by "*", by DID, or by holding the
            // certificates of a deny predicate (evaluated only where the rule has predicates).
            // Without a caller (a live query's window, shared by its subscribers) every public
            // document, as `QuerySpec::matches` has it: each subscriber's denies are applied
            // per subscriber, a deny of everyone ("*") included, so a window loaded afresh is
            // the window the changes built.
            sql.push_str(" AND read_public");
            if let Some(caller) = caller {
                let p = b.param(Bind::Text(caller.to_owned()));
                let _ = write!(
                    sql,
                    " AND (owner_did = {p} OR (NOT read_deny_public \
                     AND NOT ({p} = ANY(read_deny_dids)) \
                     AND NOT (read_predicates \
                     AND vibe_acl_preds_hold(acl, 'read', 'deny', {p}))))"
                );
            }
        }
        Scope::Shared(caller) => {
            // Others' documents allowed to the caller by DID or certificates, not public, and
            // not denied (the same rule as `Acl::allows`, over the summary columns).
            let p = b.param(Bind::Text(caller.clone()));
            let _ = write!(
                sql,
                " AND owner_did <> {p} AND NOT read_public \
                 AND (read_allow_dids @> ARRAY[{p}]::text[] \
                 OR (read_predicates AND vibe_acl_preds_hold(acl, 'read', 'allow', {p}))) \
                 AND NOT read_deny_public AND NOT ({p} = ANY(read_deny_dids)) \
                 AND NOT (read_predicates AND vibe_acl_preds_hold(acl, 'read', 'deny', {p}))"
            );
        }
    }
    let condition = b.top_filter(&spec.filter);
    if condition != "true" {
        let _ = write!(sql, " AND {condition}");
    }

    let mut order: Vec<OrderColumn> = Vec::new();
    for key in &spec.sort {
        for (expression, cast) in sort_expressions(&key.field) {
            order.push(OrderColumn {
                expression,
                descending: key.descending,
                cast,
            });
        }
    }
    order.push(OrderColumn {
        expression: "id".to_owned(),
        descending: spec.ties_descending(),
        cast: "",
    });

    if let Some(after) = after {
        let mut values: Vec<Bind> = Vec::new();
        for value in &after.values {
            match value {
                KeyValue::Data { rank, number, text } => {
                    values.push(Bind::SmallInt(*rank));
                    values.push(Bind::Text(number.clone()));
                    values.push(Bind::Text(text.clone()));
                }
                KeyValue::Text(s) => values.push(Bind::Text(s.clone())),
                KeyValue::Id(id) => values.push(Bind::Id(*id)),
                KeyValue::Time(t) => values.push(Bind::Time(*t)),
            }
        }
        values.push(Bind::Id(after.id));
        if values.len() == order.len() {
            let _ = write!(sql, " AND {}", b.after(&order, values));
        } else {
            // Keyset::decode checked the shape against this spec; a mismatch selects nothing.
            sql.push_str(" AND false");
        }
    }

    let columns: Vec<String> = order
        .iter()
        .map(|c| {
            let direction = if c.descending { "DESC" } else { "ASC" };
            format!("{} {direction}", c.expression)
        })
        .collect();
    let limit = b.param(Bind::BigInt(limit));
    let _ = write!(sql, " ORDER BY {} LIMIT {limit}", columns.join(", "));
    Compiled {
        sql,
        binds: b.binds,
    }
}

impl Builder {
    /// Rows strictly after `values` in `order`. One direction throughout becomes a row
    /// comparison (which a matching index serves as a range); mixed directions expand to
    /// `c1 > v1 OR (c1 = v1 AND (…))`.
    fn after(&mut self, order: &[OrderColumn], values: Vec<Bind>) -> String {
        let placeholders: Vec<String> = order
            .iter()
            .zip(values)
            .map(|(column, value)| format!("{}{}", self.param(value), column.cast))
            .collect();
        let descending = order.first().is_some_and(|c| c.descending);
        if order.iter().all(|c| c.descending == descending) {
            let columns: Vec<&str> = order.iter().map(|c| c.expression.as_str()).collect();
            let op = if descending { "<" } else { ">" };
            return format!(
                "({}) {op} ({})",
                columns.join(", "),
                placeholders.join(", ")
            );
        }
        let mut condition = String::new();
        for (i, (column, p)) in order.iter().zip(&placeholders).enumerate().rev() {
            let op = if column.descending { "<" } else { ">" };
            let expression = &column.expression;
            condition = if i == order.len() - 1 {
                format!("{expression} {op} {p}")
            } else {
                format!("({expression} {op} {p} OR ({expression} = {p} AND {condition}))")
            };
        }
        condition
    }
}

/// The expression an index must hold to serve range conditions on `path` of `kind`: exactly
/// what [`compile`] writes, or the planner would not match it.
pub fn index_expression(path: &[String], kind: IndexKind) -> String {
    match kind {
        IndexKind::Json => json_at(path),
        IndexKind::Text => format!("({} COLLATE \"C\")", text_at(path)),
    }
}

/// `EXPLAIN (FORMAT JSON)` of a compiled query; with `analyze`, executed, with buffers and
/// without timings.
pub(super) async fn explain(
    conn: &mut sqlx::PgConnection,
    compiled: &Compiled,
    analyze: bool,
) -> Result<serde_json::Value, StoreError> {
    let options = if analyze {
        "ANALYZE, BUFFERS, TIMING OFF, SUMMARY OFF, FORMAT JSON"
    } else {
        "FORMAT JSON"
    };
    let sql = format!("EXPLAIN ({options}) {}", compiled.sql);
    let row = bound(sql, &compiled.binds).fetch_one(conn).await?;
    Ok(row.try_get(0)?)
}

/// The query with its parameters bound. The text is assembled from this module's constants and
/// validated paths only; values are the binds (see the module invariant).
fn bound(
    sql: String,
    binds: &[Bind],
) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for bind in binds {
        query = match bind {
            Bind::Text(v) => query.bind(v.clone()),
            Bind::Texts(v) => query.bind(v.clone()),
            Bind::Json(v) => query.bind(v.clone()),
            Bind::Id(v) => query.bind(*v),
            Bind::Ids(v) => query.bind(v.clone()),
            Bind::Time(v) => query.bind(*v),
            Bind::Times(v) => query.bind(v.clone()),
            Bind::SmallInt(v) => query.bind(*v),
            Bind::BigInt(v) => query.bind(*v),
        };
    }
    query
}

/// The compiled query's documents for a live query's window: they stop at the first one past
/// the second whose documents hold more than `budget` bytes as the window counts them
/// ([`vibe_actors::window::encoded_len`]), so the window gets what it holds and the document
/// after it; and whether they stopped there. Rows past it are read and dropped by sqlx.
pub(super) async fn run_window(
    conn: &mut sqlx::PgConnection,
    compiled: &Compiled,
    budget: usize,
) -> Result<(Vec<Document>, bool), StoreError> {
    use futures_util::TryStreamExt as _;
    let query = bound(compiled.sql.clone(), &compiled.binds);
    let mut rows = query.fetch(conn);
    let mut docs = Vec::new();
    let mut bytes = 0usize;
    while let Some(row) = rows.try_next().await? {
        let doc = document(&row)?;
        bytes = bytes.saturating_add(vibe_actors::window::encoded_len(&doc));
        docs.push(doc);
        if bytes > budget && docs.len() >= 2 {
            return Ok((docs, true));
        }
    }
    Ok((docs, false))
}

/// The compiled query's documents, up to `budget` bytes of rows, and whether it was cut there.
pub(super) async fn run(
    conn: &mut sqlx::PgConnection,
    compiled: &Compiled,
    budget: usize,
) -> Result<(Vec<Document>, bool), StoreError> {
    let query = bound(compiled.sql.clone(), &compiled.binds);
    let (rows, cut) = super::fetch_within(query, conn, budget).await?;
    let docs = rows.iter().map(document).collect::<Result<_, _>>()?;
    Ok((docs, cut))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use vibe_actors::query::{QueryLimits, QueryRequest};

    fn compiled(query: Value) -> Compiled {
        let request: QueryRequest = serde_json::from_value(query).unwrap();
        let spec = QuerySpec::parse(&request, "did:key:zA", QueryLimits::default()).unwrap();
        compile(&spec, None, None, 10)
    }

    #[test]
    fn values_are_bound_and_paths_quoted() {
        let c = compiled(json!({
            "type": "posts",
            "where": {"data.null": "x'; DROP TABLE documents; --", "data.n": {"gt": 1}},
        }));
        assert!(!c.sql.contains("DROP"), "{}", c.sql);
        assert!(c.sql.contains(r#"'{"n"}'"#), "{}", c.sql);
        assert!(
            c.binds
                .contains(&Bind::Json(json!({"null": "x'; DROP TABLE documents; --"}))),
            "{:?}",
            c.binds
        );
    }

    #[test]
    fn scalar_equalities_merge_into_one_containment() {
        let c = compiled(json!({"type": "posts", "where": {"data.a": 1, "data.b.c": "x"}}));
        assert_eq!(c.sql.matches("data @>").count(), 1, "{}", c.sql);
        assert!(
            c.binds
                .contains(&Bind::Json(json!({"a": 1, "b": {"c": "x"}})))
        );
        let contradiction =
            compiled(json!({"type": "posts", "where": {"data.a": 1, "data.a.b": 2}}));
        assert!(
            contradiction.sql.contains("AND false"),
            "{}",
            contradiction.sql
        );
    }

    #[test]
    fn one_direction_keysets_are_row_comparisons() {
        let request: QueryRequest =
            serde_json::from_value(json!({"type": "posts", "sort": "-createdAt"})).unwrap();
        let spec = QuerySpec::parse(&request, "did:key:zA", QueryLimits::default()).unwrap();
        let after = Keyset {
            values: vec![KeyValue::Time(Utc::now())],
            id: Uuid::nil(),
        };
        let c = compile(&spec, None, Some(&after), 10);
        assert!(c.sql.contains("(created_at, id) < ($3, $4)"), "{}", c.sql);
    }
}
