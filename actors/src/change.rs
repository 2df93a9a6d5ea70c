//! Changes: one committed document write, its position in the feed (a cursor), and the
//! snapshot arithmetic that tells whether a database snapshot already saw it.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::acl::{Acl, Operation};
use crate::wire::Document;

/// A position in the feed: everything in batches before `tick`, and batch `tick` up to `seq`.
/// `sub` orders the several events one change can cause in a live query (a document added, another
/// pushed out of a full window): a client that got only the first resumes after it, not after
/// the change. Changes themselves have `sub` 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor {
    pub tick: i64,
    pub seq: i64,
    pub sub: u64,
}

impl Cursor {
    pub fn new(tick: i64, seq: i64) -> Self {
        Self { tick, seq, sub: 0 }
    }

    /// The position after every change of batch `tick`.
    pub fn after_batch(tick: i64) -> Self {
        Self::new(tick + 1, 0)
    }

    /// The `sub`-th event caused by the change at this position.
    pub fn event(self, sub: u64) -> Self {
        Self { sub, ..self }
    }

    /// The first position after every event the change at this position caused itself, and
    /// before the next change: where the events of a certificate change's (or expiry's)
    /// re-evaluation go, so they never share a position with a change's own events.
    pub fn after_events(self) -> Self {
        self.event(AFTER_EVENTS)
    }

    /// The place of the next re-evaluation after the one at this position (two certificate
    /// expiries with no change routed between them): after every event this one can cause, so
    /// a client that resumed from one of its events does not count the next one's as seen.
    pub fn after_reevaluation(self) -> Self {
        self.event(self.sub.saturating_add(AFTER_EVENTS))
    }
}

/// Far above the events one change, or one re-evaluation, causes in a live query (an `add`, a
/// `remove`, a window's refill: at most a window's `limit` plus two), and leaves room for 2^32
/// re-evaluations numbered after one change.
const AFTER_EVENTS: u64 = 1 << 32;

#[cfg(test)]
mod cursor_tests {
    use super::*;

    #[test]
    fn events_after_a_change_come_before_the_next_change() {
        let change = Cursor::new(7, 41);
        let after = change.after_events();
        assert!(after > change.event(10_000));
        assert!(after < Cursor::new(7, 42));
        assert!(Cursor::after_batch(7).after_events() < Cursor::new(8, 1));
        assert_eq!(after.to_string().parse::<Cursor>().ok(), Some(after));
        let next = after.after_reevaluation();
        assert!(next > after.event(after.sub + 10_000));
        assert!(next < Cursor::new(7, 42));
        assert_eq!(next.to_string().parse::<Cursor>().ok(), Some(next));
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.tick, self.seq)?;
        if self.sub > 0 {
            write!(f, ".{}", self.sub)?;
        }
        Ok(())
    }
}

/// A cursor string that is not `<tick>-<seq>[.<sub>]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a cursor looks like `<tick>-<seq>` or `<tick>-<seq>.<n>`, e.g. `42-1007`")]
pub struct BadCursor;

impl FromStr for Cursor {
    type Err = BadCursor;
    fn from_str(s: &str) -> Result<Self, BadCursor> {
        let (tick, rest) = s.split_once('-').ok_or(BadCursor)?;
        let (seq, sub) = match rest.split_once('.') {
            Some((seq, sub)) => (seq, sub.parse::<u64>().map_err(|_| BadCursor)?),
            None => (rest, 0),
        };
        let tick: i64 = tick.parse().map_err(|_| BadCursor)?;
        let seq: i64 = seq.parse().map_err(|_| BadCursor)?;
        if tick < 1 || seq < 0 {
            return Err(BadCursor);
        }
        Ok(Self { tick, seq, sub })
    }
}

/// What happened to a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }
}

/// The ACL and data of a document at one revision.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub acl: Acl,
    pub data: serde_json::Value,
}

/// One committed document write.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub cursor: Cursor,
    /// The writing transaction's id (`xid8`).
    pub xid: u64,
    pub op: Op,
    pub doc_id: Uuid,
    pub doc_type: String,
    pub owner: String,
    /// The document this one was made under.
    pub parent: Option<Uuid>,
    pub rev: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When the write was logged inside the writer's transaction (an insert: the transaction's
    /// start; an update or delete: its trigger): the start of feed latency.
    pub logged_at: DateTime<Utc>,
    /// After the write (insert, update).
    pub new: Option<Image>,
    /// Before the write (update, delete).
    pub old: Option<Image>,
}

impl Change {
    /// The document after the change, if it still exists.
    pub fn document(&self) -> Option<Document> {
        self.new.as_ref().map(|image| Document {
            id: self.doc_id,
            doc_type: self.doc_type.clone(),
            owner: self.owner.clone(),
            parent: self.parent,
            rev: self.rev,
            created_at: self.created_at,
            updated_at: self.updated_at,
            acl: image.acl.clone(),
            data: image.data.clone(),
        })
    }

    /// Does reading the document before or after this change depend on certificates?
    pub fn uses_certificates(&self) -> bool {
        [&self.old, &self.new]
            .into_iter()
            .flatten()
            .any(|i| i.acl.uses_certificates(Operation::Read))
    }

    /// May `caller`, holding `credentials`, read the document before / after this change?
    pub fn readable(
        &self,
        caller: Option<&str>,
        credentials: &dyn crate::acl::Credentials,
    ) -> (bool, bool) {
        let can = |image: &Option<Image>| {
            image.as_ref().is_some_and(|i| {
                i.acl
                    .allows(Operation::Read, caller, &self.owner, credentials)
            })
        };
        (can(&self.old), can(&self.new))
    }
}

/// A PostgreSQL snapshot (`xmin:xmax:xip,...`): which transactions it saw as committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotView {
    pub xmin: u64,
    pub xmax: u64,
    /// In progress when the snapshot was taken (sorted).
    pub xip: Vec<u64>,
}

impl SnapshotView {
    /// Parses `pg_current_snapshot()::text`.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let mut xip = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<Vec<u64>>>()?,
        };
        xip.sort_unstable();
        parts.next().is_none().then_some(Self { xmin, xmax, xip })
    }

    /// Did a reader with this snapshot see the (committed) writes of transaction `xid`?
    pub fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && self.xip.binary_search(&xid).is_err())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_visibility() {
        let s = SnapshotView::parse("100:105:101,103").unwrap();
        assert!(s.sees(99) && s.sees(100) && s.sees(102) && s.sees(104));
        assert!(!s.sees(101) && !s.sees(103) && !s.sees(105) && !s.sees(200));
        assert_eq!(SnapshotView::parse("7:7:").unwrap().xip, Vec::<u64>::new());
        for bad in ["", "1:2", "a:2:", "1:2:x", "1:2:3:4"] {
            assert!(SnapshotView::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn cursor_syntax_and_order() {
        let c: Cursor = "42-1007".parse().unwrap();
        assert_eq!(c, Cursor::new(42, 1007));
        assert_eq!(c.to_string(), "42-1007");
        let e: Cursor = "42-1007.2".parse().unwrap();
        assert_eq!(e, Cursor::new(42, 1007).event(2));
        assert_eq!(e.to_string(), "42-1007.2");
        assert!(c < e && e < Cursor::new(42, 1008));
        for bad in [
            "", "42", "42-", "-1", "a-b", "0-0", "5--1", "1-2-3", "1-2.", "1-2.x", "1-2.-1",
        ] {
            assert!(bad.parse::<Cursor>().is_err(), "{bad}");
        }
        assert!(Cursor::new(3, 900) < Cursor::after_batch(3));
        assert!(Cursor::after_batch(3) < Cursor::new(4, 1));
    }
}
