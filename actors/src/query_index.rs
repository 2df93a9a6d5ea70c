//! The live-query index of one document type: which live queries a change may concern, found
//! without testing every query, so that routing a change costs in proportion to the queries it
//! can match rather than to all live queries.
//!
//! Each query is filed under one *anchor*, an equality every match must meet: a data-path
//! equality of its top-level conjunction if it has one (the most selective in practice), else the
//! caller for own-document queries, else a `parent` equality (the documents made under one), else
//! an `owner` equality, else an `id` equality. Queries with
//! no anchor are candidates for every change. A change's candidates are the queries filed under
//! the values its old and its new version hold at each anchored field — both versions, so a
//! document leaving a query is found as surely as one entering it. Candidates are a superset;
//! [`QuerySpec::concerns`] decides.

use std::collections::HashMap;

use crate::change::{Change, Image};
use crate::query::{Field, Operand, QuerySpec, Scope, canonical_text, lookup};

/// A live query's number within its document type.
pub type QueryId = u64;

/// The index holds ids only; the caller keeps the specs (and gives one back to remove it), so
/// an indexed query costs a few dozen bytes.
#[derive(Debug, Default)]
pub struct QueryIndex {
    /// Anchored field → the anchor value's key → queries.
    anchored: HashMap<Field, HashMap<String, Vec<QueryId>>>,
    unanchored: Vec<QueryId>,
    len: usize,
}

/// The anchor of `spec`, as (field, key).
fn anchor(spec: &QuerySpec) -> Option<(Field, String)> {
    let key = |operand: &Operand| match operand {
        Operand::Json(v) => v.text().to_owned(),
        Operand::Text(s) => s.clone(),
        Operand::Id(id) => id.to_string(),
        Operand::Time(t) => t.to_rfc3339(),
    };
    let equalities: Vec<_> = spec.filter.required_equalities().collect();
    if let Some((field, value)) = equalities.iter().find(|(f, _)| matches!(f, Field::Data(_))) {
        return Some(((*field).clone(), key(value)));
    }
    if let Scope::Own(owner) = &spec.scope {
        return Some((Field::Owner, owner.clone()));
    }
    // Shared and global queries on one parent (a room): filed under it, a change elsewhere never
    // tests them.
    if let Some((field, value)) = equalities.iter().find(|(f, _)| *f == &Field::Parent) {
        return Some(((*field).clone(), key(value)));
    }
    equalities
        .iter()
        .find(|(f, _)| matches!(f, Field::Owner | Field::Id))
        .map(|(field, value)| ((*field).clone(), key(value)))
}

/// The key a version of a changed document holds at an anchored field.
fn key_of(field: &Field, change: &Change, image: &Image) -> Option<String> {
    match field {
        Field::Data(path) => lookup(&image.data, path).map(canonical_text),
        Field::Owner => Some(change.owner.clone()),
        Field::Id => Some(change.doc_id.to_string()),
        Field::Parent => change.parent.map(|parent| parent.to_string()),
        // Never anchors (see `anchor`).
        Field::Type | Field::CreatedAt | Field::UpdatedAt => None,
    }
}

impl QueryIndex {
    /// Files query `id` (not already filed) under its anchor.
    pub fn insert(&mut self, id: QueryId, spec: &QuerySpec) {
        let ids = match anchor(spec) {
            Some((field, key)) => self
                .anchored
                .entry(field)
                .or_default()
                .entry(key)
                .or_default(),
            None => &mut self.unanchored,
        };
        // Most anchors hold one query: no room for more until a second arrives.
        ids.reserve_exact(1);
        ids.push(id);
        self.len += 1;
    }

    /// Removes query `id`, filed with `spec`.
    pub fn remove(&mut self, id: QueryId, spec: &QuerySpec) {
        let removed = match anchor(spec) {
            Some((field, key)) => {
                let Some(values) = self.anchored.get_mut(&field) else {
                    return;
                };
                let Some(ids) = values.get_mut(&key) else {
                    return;
                };
                let before = ids.len();
                ids.retain(|q| *q != id);
                let removed = ids.len() < before;
                if ids.is_empty() {
                    values.remove(&key);
                }
                if values.is_empty() {
                    self.anchored.remove(&field);
                }
                removed
            }
            None => {
                let before = self.unanchored.len();
                self.unanchored.retain(|q| *q != id);
                self.unanchored.len() < before
            }
        };
        if removed {
            self.len -= 1;
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The queries `change` may concern, sorted and without duplicates, into `out` (cleared
    /// first).
    pub fn candidates(&self, change: &Change, out: &mut Vec<QueryId>) {
        out.clear();
        out.extend_from_slice(&self.unanchored);
        for (field, values) in &self.anchored {
            for image in [&change.old, &change.new].into_iter().flatten() {
                if let Some(ids) = key_of(field, change, image).and_then(|k| values.get(&k)) {
                    out.extend_from_slice(ids);
                }
            }
        }
        out.sort_unstable();
        out.dedup();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Cursor, Op};
    use crate::query::{QueryLimits, QueryRequest};
    use serde_json::{Value, json};
    use uuid::Uuid;

    fn spec(v: Value, caller: &str) -> QuerySpec {
        let request: QueryRequest = serde_json::from_value(v).unwrap();
        QuerySpec::parse(&request, caller, QueryLimits::default()).unwrap()
    }

    fn change(owner: &str, old: Option<Value>, new: Option<Value>) -> Change {
        let image = |data: Value| Image {
            acl: serde_json::from_value(json!({"read": {"allow": ["*"]}})).unwrap(),
            data,
        };
        Change {
            cursor: Cursor::new(1, 0),
            xid: 1,
            op: match (&old, &new) {
                (None, _) => Op::Insert,
                (_, None) => Op::Delete,
                _ => Op::Update,
            },
            doc_id: Uuid::now_v7(),
            doc_type: "msgs".into(),
            owner: owner.into(),
            parent: None,
            rev: 1,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            logged_at: chrono::Utc::now(),
            new: new.map(image),
            old: old.map(image),
        }
    }

    #[test]
    fn candidates_come_from_both_versions_and_exclude_the_rest() {
        let mut index = QueryIndex::default();
        let queries = [
            spec(
                json!({"type": "msgs", "where": {"data.room": "a"}}),
                "did:key:zA",
            ),
            spec(
                json!({"type": "msgs", "where": {"data.room": "b"}}),
                "did:key:zA",
            ),
            spec(
                json!({"type": "msgs", "where": {"data.room": 1.0}, "global": true}),
                "did:key:zA",
            ),
            spec(json!({"type": "msgs"}), "did:key:zB"),
            spec(json!({"type": "msgs", "global": true}), "did:key:zA"),
            spec(
                json!({"type": "msgs", "where": {"data.n": {"gt": 1}}, "global": true}),
                "did:key:zA",
            ),
        ];
        for (i, q) in queries.iter().enumerate() {
            index.insert(i as QueryId, q);
        }
        let mut out = Vec::new();
        // Moves from room a to room 1 (written as an integer): both rooms' queries, the
        // unanchored global ones; not room b, not Bob's.
        index.candidates(
            &change(
                "did:key:zA",
                Some(json!({"room": "a"})),
                Some(json!({"room": 1})),
            ),
            &mut out,
        );
        assert_eq!(out, vec![0, 2, 4, 5]);
        index.candidates(&change("did:key:zB", None, Some(json!({}))), &mut out);
        assert_eq!(out, vec![3, 4, 5]);
        index.remove(4, &queries[4]);
        index.remove(0, &queries[0]);
        index.candidates(
            &change("did:key:zA", Some(json!({"room": "a"})), None),
            &mut out,
        );
        assert_eq!(out, vec![5]);
        assert_eq!(index.len(), 4);
    }

    #[test]
    fn parent_equalities_anchor() {
        let rooms = [Uuid::now_v7(), Uuid::now_v7()];
        let queries: Vec<QuerySpec> = rooms
            .iter()
            .map(|room| {
                spec(
                    json!({"type": "msgs", "shared": true, "where": {"parent": room}}),
                    "did:key:zA",
                )
            })
            .collect();
        let mut index = QueryIndex::default();
        for (i, q) in queries.iter().enumerate() {
            index.insert(i as QueryId, q);
        }
        let mut out = Vec::new();
        for (i, room) in rooms.iter().enumerate() {
            let c = Change {
                parent: Some(*room),
                ..change("did:key:zB", None, Some(json!({})))
            };
            index.candidates(&c, &mut out);
            assert_eq!(out, vec![i as QueryId], "only the room's query");
        }
        // A document under no parent concerns neither.
        index.candidates(&change("did:key:zB", None, Some(json!({}))), &mut out);
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn every_concerned_query_is_a_candidate() {
        // Random-ish coverage: each query against each change, the index must never miss one.
        let values = [
            json!("a"),
            json!("b"),
            json!(1),
            json!(null),
            json!([1]),
            json!({"x": 1}),
        ];
        let mut specs = Vec::new();
        for v in &values {
            specs.push(spec(
                json!({"type": "msgs", "where": {"data.room": {"eq": v}}}),
                "did:key:zA",
            ));
            specs.push(spec(json!({"type": "msgs", "global": true, "where": {"data.room": {"eq": v}, "data.k": {"ne": 1}}}), "did:key:zA"));
            specs.push(spec(json!({"type": "msgs", "global": true, "where": {"or": [{"data.room": {"eq": v}}, {"data.k": 1}]}}), "did:key:zA"));
        }
        specs.push(spec(
            json!({"type": "msgs", "global": true, "where": {"owner": "did:key:zB"}}),
            "did:key:zA",
        ));
        let mut index = QueryIndex::default();
        for (i, s) in specs.iter().enumerate() {
            index.insert(i as QueryId, s);
        }
        let sides: Vec<Option<Value>> = values
            .iter()
            .map(|v| Some(json!({"room": v, "k": 1})))
            .chain([None, Some(json!({"k": 1}))])
            .collect();
        let mut out = Vec::new();
        for owner in ["did:key:zA", "did:key:zB"] {
            for old in &sides {
                for new in &sides {
                    if old.is_none() && new.is_none() {
                        continue;
                    }
                    let c = change(owner, old.clone(), new.clone());
                    index.candidates(&c, &mut out);
                    for (i, s) in specs.iter().enumerate() {
                        if s.concerns(&c) {
                            assert!(out.contains(&(i as QueryId)), "{s:?} misses {c:?}");
                        }
                    }
                }
            }
        }
    }
}
