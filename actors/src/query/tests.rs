//! Parsing, normalisation and in-memory evaluation; agreement with SQL is tested against
//! PostgreSQL in the server's `tests/query_agreement.rs`.

use super::*;
use serde_json::json;

const LIMITS: QueryLimits = QueryLimits {
    default_limit: 100,
    max_limit: 1000,
    max_depth: 4,
    max_clauses: 16,
    max_operand_bytes: 1024,
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
        parent: None,
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
            json!({"type": "posts", "where": {"data.a.0": 1}}),
            "where.data.a.0",
        ),
        (
            json!({"type": "posts", "where": {"data.a b": 1}}),
            "where.data.a b",
        ),
        (
            json!({"type": "posts", "where": {"data.n": {"gt": true}}}),
            "where.data.n.gt",
        ),
        (
            json!({"type": "posts", "where": {"data.n": {"gt": 1, "x": 2}}}),
            "where.data.n",
        ),
        (
            json!({"type": "posts", "where": {"data.n": {"in": []}}}),
            "where.data.n.in",
        ),
        (
            json!({"type": "posts", "where": {"owner": {"exists": true}}}),
            "where.owner.exists",
        ),
        (
            json!({"type": "posts", "where": {"createdAt": {"gt": "yesterday"}}}),
            "where.createdAt.gt",
        ),
        (
            json!({"type": "posts", "where": {"or": [{"data.a": 1}, {"not": {"data.b": {"startsWith": 3}}}]}}),
            "where.or[1].not.data.b.startsWith",
        ),
        (json!({"type": "posts", "where": {"or": []}}), "where.or"),
        (
            json!({"type": "posts", "where": {"and": [{"and": [{"and": [{"and": [{"data.a": 1}]}]}]}]}}),
            "where.and[0].and[0].and[0].and[0]",
        ),
        (
            json!({"type": "posts", "where": {"data.a": {"in": (0..17).collect::<Vec<_>>()}}}),
            "where.data.a.in",
        ),
        // Condition objects count too: seventeen empty ones are seventeen conditions.
        (
            json!({"type": "posts", "where": {"or": vec![json!({}); 17]}}),
            "where.or[16]",
        ),
        (
            json!({"type": "posts", "where": {"data.a": {"eq": "x".repeat(1100)}}}),
            "where.data.a.eq",
        ),
        (
            json!({"type": "posts", "where": {"data.a": {"in": ["x".repeat(600), "y".repeat(600)]}}}),
            "where.data.a.in",
        ),
        (
            json!({"type": "posts", "where": {"data.a": {"contains": (0..17).map(|i| json!([i])).collect::<Vec<_>>()}}}),
            "where.data.a.contains",
        ),
        (
            json!({"type": "posts", "where": {format!("data{}", ".a".repeat(1000)): 1}}),
            &*format!("where.data{}", ".a".repeat(1000)),
        ),
        (
            json!({"type": "posts", "sort": ["createdAt", "-createdAt"]}),
            "sort[1]",
        ),
        (
            json!({"type": "posts", "sort": ["createdAt", "data.0"]}),
            "sort[1]",
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
        // PostgreSQL's text cannot hold U+0000: refused here, not by the database.
        (
            json!({"type": "posts", "where": {"owner": "\u{0}"}}),
            "where",
        ),
        (
            json!({"type": "posts", "where": {"or": [{"data.a": {"startsWith": "a\u{0}"}}]}}),
            "where",
        ),
        (
            json!({"type": "posts", "where": {"data.a": {"contains": {"k\u{0}": 1}}}}),
            "where",
        ),
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

#[test]
fn boolean_combinations_normalise() {
    let a = spec(
        json!({"type": "posts", "where": {"or": [{"data.a": 1}, {"data.b": {"ne": 2}}], "data.c": {"nin": [3]}}}),
        "did:key:zA",
    )
    .unwrap();
    let b = spec(
        json!({"type": "posts", "where": {"and": [{"data.c": {"ne": 3}}, {"or": [{"not": {"data.b": 2}}, {"data.a": {"in": [1, 1.0]}}]}]}}),
        "did:key:zA",
    )
    .unwrap();
    assert_eq!(a.filter, b.filter);
    let double_negation = spec(
        json!({"type": "posts", "where": {"not": {"not": {"data.a": 1}}}}),
        "did:key:zA",
    )
    .unwrap();
    assert_eq!(
        double_negation.filter,
        spec(
            json!({"type": "posts", "where": {"data.a": 1}}),
            "did:key:zA"
        )
        .unwrap()
        .filter
    );
}

/// A `contains` of many scalars (looked up by canonical text, not scanned one by one) holds
/// exactly when each is in the stored list, numbers compared by value however written.
#[test]
fn contains_of_many_scalars_compares_values_as_jsonb_does() {
    let stored =
        json!({"a": [12.0, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1e0, "x", true, null, [1], {"k": 1}]});
    let d = doc("did:key:zA", stored, false);
    let all: Vec<serde_json::Value> = (1..=12)
        .map(|n| json!(n))
        .chain([json!("x"), json!(true), json!(null)])
        .collect();
    let matches = |operand: serde_json::Value| {
        spec(
            json!({"type": "posts", "where": {"data.a": {"contains": operand}}}),
            "did:key:zA",
        )
        .unwrap()
        .matches(&d)
    };
    assert!(matches(json!(all)));
    let mut with_nested = all.clone();
    with_nested.extend([json!([1]), json!({"k": 1})]);
    assert!(matches(json!(with_nested)));
    for missing in [
        json!(13),
        json!("y"),
        json!(false),
        json!(1.5),
        json!([2]),
        json!({"k": 2}),
    ] {
        let mut operand = all.clone();
        operand.push(missing.clone());
        assert!(!matches(json!(operand)), "{missing}");
    }
}

#[test]
fn operators_follow_the_documented_semantics() {
    let d = doc(
        "did:key:zA",
        json!({
            "n": 5, "f": 2.5, "s": "apple", "t": true, "z": null,
            "tags": ["a", "b", 3], "o": {"x": 1, "y": [1, 2]}, "nested": [[1]]
        }),
        false,
    );
    let cases = [
        (json!({"data.n": {"gt": 4}}), true),
        (json!({"data.n": {"gte": 5.0}}), true),
        (json!({"data.n": {"lt": 5}}), false),
        (json!({"data.n": {"gt": "4"}}), false),
        (json!({"data.s": {"gt": "4"}}), true),
        (json!({"data.s": {"lt": "apples"}}), true),
        (json!({"data.s": {"lt": "Apple"}}), false),
        (json!({"data.missing": {"lt": 10}}), false),
        (json!({"data.missing": {"ne": 10}}), true),
        (json!({"data.missing": {"nin": [1, 2]}}), true),
        (json!({"data.z": null}), true),
        (json!({"data.z": {"exists": true}}), true),
        (json!({"data.missing": {"exists": false}}), true),
        (json!({"data.n.deeper": {"exists": true}}), false),
        (json!({"data.f": {"in": [1, 2.5]}}), true),
        (json!({"data.tags": ["a", "b", 3]}), true),
        (json!({"data.tags": ["b", "a", 3]}), false),
        (json!({"data.tags": "a"}), false),
        (json!({"data.tags": {"contains": "a"}}), true),
        (json!({"data.tags": {"contains": 3.0}}), true),
        (json!({"data.tags": {"contains": ["b", "a"]}}), true),
        (json!({"data.tags": {"contains": ["c"]}}), false),
        (json!({"data.s": {"contains": "apple"}}), true),
        (json!({"data.s": {"contains": ["apple"]}}), false),
        (json!({"data.o": {"contains": {"y": [2]}}}), true),
        (json!({"data.o": {"contains": {"y": 2}}}), false),
        (json!({"data.nested": {"contains": [1]}}), false),
        (json!({"data.nested": {"contains": [[1]]}}), true),
        (json!({"data.o": {"eq": {"y": [1, 2], "x": 1.0}}}), true),
        (json!({"data.s": {"startsWith": "app"}}), true),
        (json!({"data.n": {"startsWith": "5"}}), false),
        (json!({"owner": {"startsWith": "did:key:"}}), true),
        (json!({"type": {"in": ["posts", "notes"]}}), true),
        (json!({"or": [{"data.n": 1}, {"data.t": true}]}), true),
        (
            json!({"not": {"or": [{"data.n": 1}, {"data.t": true}]}}),
            false,
        ),
        (json!({"createdAt": {"lte": "9999-01-01T00:00:00Z"}}), true),
    ];
    for (filter, expected) in cases {
        let q = spec(json!({"type": "posts", "where": filter}), "did:key:zA").unwrap();
        assert_eq!(q.matches(&d), expected, "{filter}");
    }
}

#[test]
fn data_paths_sort_by_kind_then_value() {
    let q = spec(json!({"type": "posts", "sort": ["data.v"]}), "did:key:zA").unwrap();
    let values = [
        None,
        Some(json!(null)),
        Some(json!(false)),
        Some(json!(true)),
        Some(json!(-1.5)),
        Some(json!(2)),
        Some(json!("B")),
        Some(json!("a")),
        Some(json!([1])),
    ];
    let mut docs: Vec<Document> = values
        .iter()
        .map(|v| match v {
            Some(v) => doc("did:key:zA", json!({"v": v}), false),
            None => doc("did:key:zA", json!({}), false),
        })
        .collect();
    let expected: Vec<Uuid> = docs.iter().map(|d| d.id).collect();
    docs.reverse();
    docs.sort_by(|a, b| q.order(a, b));
    assert_eq!(docs.iter().map(|d| d.id).collect::<Vec<_>>(), expected);
}

#[test]
fn keysets_round_trip_and_reject_foreign_cursors() {
    let q = spec(
        json!({"type": "posts", "sort": ["-data.score", "owner", "createdAt"]}),
        "did:key:zA",
    )
    .unwrap();
    let mut d = doc("did:key:zA", json!({"score": 2.5}), false);
    // Stored documents carry the database's microsecond precision.
    d.created_at =
        chrono::DateTime::from_timestamp_micros(d.created_at.timestamp_micros()).unwrap();
    let keyset = keyset::Keyset::after(&q, &d);
    assert_eq!(
        keyset::Keyset::decode(&q, &keyset.encode(&q)).unwrap(),
        keyset
    );
    let other = spec(json!({"type": "posts"}), "did:key:zA").unwrap();
    assert_eq!(
        keyset::Keyset::decode(&other, &keyset.encode(&q))
            .unwrap_err()
            .part,
        "cursor"
    );
    // Sorts of the same shape (each key the same kind of value) over other fields, in another
    // direction, or over another type or scope: the values would decode, the signature does not.
    for (query, did) in [
        (
            json!({"type": "posts", "sort": ["-data.rank", "owner", "createdAt"]}),
            "did:key:zA",
        ),
        (
            json!({"type": "posts", "sort": ["data.score", "owner", "createdAt"]}),
            "did:key:zA",
        ),
        (
            json!({"type": "posts", "sort": ["-data.score", "type", "updatedAt"]}),
            "did:key:zA",
        ),
        (
            json!({"type": "notes", "sort": ["-data.score", "owner", "createdAt"]}),
            "did:key:zA",
        ),
        (
            json!({"type": "posts", "sort": ["-data.score", "owner", "createdAt"]}),
            "did:key:zB",
        ),
        (
            json!({"type": "posts", "sort": ["-data.score", "owner", "createdAt"], "global": true}),
            "did:key:zA",
        ),
    ] {
        let same_shape = spec(query.clone(), did).unwrap();
        assert_eq!(same_shape.sort.len(), q.sort.len());
        assert_eq!(
            keyset::Keyset::decode(&same_shape, &keyset.encode(&q))
                .unwrap_err()
                .part,
            "cursor",
            "{query} {did}"
        );
    }
    // Another filter or page size over the same order and set takes the position.
    let narrowed = spec(
        json!({"type": "posts", "sort": ["-data.score", "owner", "createdAt"],
               "where": {"data.score": {"gt": 1}}, "limit": 3}),
        "did:key:zA",
    )
    .unwrap();
    assert_eq!(
        keyset::Keyset::decode(&narrowed, &keyset.encode(&q)).unwrap(),
        keyset
    );
    // A cursor of the previous version (no signature) is still taken, as it was then.
    let legacy = {
        use base64::Engine;
        let codec = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut items: Vec<serde_json::Value> =
            serde_json::from_slice(&codec.decode(keyset.encode(&q)).unwrap()).unwrap();
        items.remove(0);
        codec.encode(serde_json::Value::Array(items).to_string())
    };
    assert_eq!(keyset::Keyset::decode(&q, &legacy).unwrap(), keyset);
    assert!(keyset::Keyset::decode(&q, "not base64!").is_err());
    // The same cursor with one value changed.
    let tampered = |index: usize, value: serde_json::Value| {
        use base64::Engine;
        let codec = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut items: Vec<serde_json::Value> =
            serde_json::from_slice(&codec.decode(keyset.encode(&q)).unwrap()).unwrap();
        items[index] = value;
        keyset::Keyset::decode(
            &q,
            &codec.encode(serde_json::Value::Array(items).to_string()),
        )
    };
    // Values the database would refuse as bound parameters are the cursor's fault (400), not a
    // failed statement (500): U+0000 in text, a time outside years 1-9999, a number that is a
    // finite double but overflows `numeric`.
    for (index, value) in [
        (2, json!("did:key:zA\u{0}")),
        (3, json!(-300_000_000_000_000_000_i64)),
        (1, json!([3, "0e-100000", ""])),
        (1, json!([3, "1e-1001", ""])),
        (1, json!([3, "1".repeat(65), ""])),
    ] {
        assert_eq!(
            tampered(index, value.clone()).unwrap_err().part,
            "cursor",
            "{value}"
        );
    }
    // What JSON numbers print as is taken.
    for number in ["1e300", "-2.5", "5e-324", "18446744073709551615"] {
        assert!(tampered(1, json!([3, number, ""])).is_ok(), "{number}");
    }
}

#[test]
fn required_equalities_are_the_top_level_eqs() {
    let q = spec(
        json!({"type": "posts", "where": {"data.room": "r1", "data.n": {"gt": 1}, "or": [{"data.a": 1}, {"data.b": 2}]}}),
        "did:key:zA",
    )
    .unwrap();
    let eqs: Vec<_> = q.filter.required_equalities().collect();
    assert_eq!(eqs.len(), 1);
    assert_eq!(eqs[0].0, &Field::Data(vec!["room".into()]));
}

#[test]
fn parent_is_missing_for_documents_made_under_none() {
    let room = Uuid::now_v7();
    let under = Document {
        parent: Some(room),
        ..doc("did:key:zA", json!({}), false)
    };
    let loose = doc("did:key:zA", json!({}), false);
    let matches = |filter: serde_json::Value| {
        let q = spec(json!({"type": "posts", "where": filter}), "did:key:zA").unwrap();
        (q.matches(&under), q.matches(&loose))
    };
    assert_eq!(matches(json!({"parent": room})), (true, false));
    assert_eq!(matches(json!({"parent": {"ne": room}})), (false, true));
    assert_eq!(
        matches(json!({"parent": {"in": [room, Uuid::now_v7()]}})),
        (true, false)
    );
    assert_eq!(matches(json!({"parent": {"nin": [room]}})), (false, true));
    assert_eq!(matches(json!({"parent": {"gte": room}})), (true, false));
    assert_eq!(
        matches(json!({"not": {"parent": {"lt": room}}})),
        (true, true)
    );
    assert_eq!(matches(json!({"parent": {"exists": true}})), (true, false));
    assert_eq!(matches(json!({"parent": {"exists": false}})), (false, true));
    assert_eq!(
        matches(json!({"not": {"parent": {"exists": false}}})),
        (true, false)
    );
    for bad in [
        json!({"type": "posts", "where": {"parent": 7}}),
        json!({"type": "posts", "where": {"parent": {"exists": 1}}}),
        json!({"type": "posts", "where": {"parent": {"startsWith": "0"}}}),
        json!({"type": "posts", "sort": "-parent"}),
    ] {
        assert!(spec(bad.clone(), "did:key:zA").is_err(), "{bad}");
    }
}

#[test]
fn whole_numbers_have_one_canonical_text_however_written() {
    for (a, b) in [
        (json!(1.0), json!(1)),
        (json!(9e15), json!(9_000_000_000_000_000_u64)),
        (
            json!(9_007_199_254_740_992.0),
            json!(9_007_199_254_740_992_u64),
        ),
        (json!(1e20), json!(100_000_000_000_000_000_000.0)),
        (json!(-4e15), json!(-4_000_000_000_000_000_i64)),
    ] {
        assert_eq!(canonical_text(&a), canonical_text(&b), "{a} and {b}");
    }
    assert_ne!(canonical_text(&json!(1.5)), canonical_text(&json!(1)));
    assert_ne!(
        canonical_text(&json!(9_007_199_254_740_993_u64)),
        canonical_text(&json!(9_007_199_254_740_992.0))
    );
}
