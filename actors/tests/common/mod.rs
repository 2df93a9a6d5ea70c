//! Documents and changes for the actor tests, built in memory.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)] // each test binary uses a part; a failed unwrap fails the test

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use uuid::Uuid;
use vibe_actors::change::{Change, Cursor, Image, Op};
use vibe_actors::wire::Document;

pub fn at(n: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_700_000_000 + n, 0).unwrap()
}

/// Document `n` of type `posts` owned by `owner`, created `n` seconds after a fixed time.
pub fn doc_by(owner: &str, n: u128, acl: Value) -> Document {
    Document {
        id: Uuid::from_u128(n),
        doc_type: "posts".into(),
        owner: owner.into(),
        parent: None,
        rev: 1,
        created_at: at(n as i64),
        updated_at: at(n as i64),
        acl: serde_json::from_value(acl).unwrap(),
        data: json!({"n": n}),
    }
}

/// `d` inserted by transaction `xid` at 2-`seq`.
pub fn insert(d: &Document, xid: u64, seq: i64) -> Change {
    Change {
        cursor: Cursor::new(2, seq),
        xid,
        op: Op::Insert,
        doc_id: d.id,
        doc_type: d.doc_type.clone(),
        owner: d.owner.clone(),
        parent: d.parent,
        rev: d.rev,
        created_at: d.created_at,
        updated_at: d.updated_at,
        logged_at: Utc::now(),
        new: Some(Image {
            acl: d.acl.clone(),
            data: d.data.clone(),
        }),
        old: None,
    }
}

/// `d` deleted by transaction `xid` at 2-`seq`.
pub fn delete(d: &Document, xid: u64, seq: i64) -> Change {
    Change {
        op: Op::Delete,
        new: None,
        old: Some(Image {
            acl: d.acl.clone(),
            data: d.data.clone(),
        }),
        ..insert(d, xid, seq)
    }
}
