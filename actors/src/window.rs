//! A live query's result window: the first `limit` matching documents in sort order, kept in
//! memory and updated change by change. It says what each change did to the window (a document
//! entered, changed in place or moved, or left), and when it can no longer tell — the window
//! shrank below the limit while unseen matches may exist — it asks for a refill.
//!
//! A window also ends once its documents hold more than its byte budget ([`encoded_len`]):
//! `limit` counts documents and each may be as large as a request body, so without it one query
//! could keep `limit` × that in memory. It holds the longest prefix that fits (its first document
//! regardless) and keeps the first document past it without sending it, so it knows when room
//! freed by a change lets that one in. Either way the window is what a fresh load at the same
//! feed position would give, whatever order the changes came in.

use uuid::Uuid;

use crate::change::Change;
use std::sync::Arc;

use crate::query::QuerySpec;
use crate::wire::Document;

/// What one change did to the window.
#[derive(Debug, Clone, PartialEq)]
pub enum WindowEvent {
    /// The document entered the window.
    Add(Document),
    /// The document was in the window and still is (possibly at another position); `old` is the
    /// previous version (its ACL decides who could see it before).
    Change { doc: Document, old: Box<Document> },
    /// The document left the window; `old` is the last version the window held.
    Remove(Document),
}

#[derive(Debug, Clone)]
pub struct Window {
    spec: Arc<QuerySpec>,
    /// Sorted by `spec.order`: the `held` documents, then at most one more — the first match
    /// past them, known but not held (past the limit or the budget).
    docs: Vec<Document>,
    /// [`encoded_len`] of each of `docs`.
    sizes: Vec<usize>,
    /// How many of `docs` the window holds: the longest prefix within the budget (at least
    /// one), at most `spec.limit`.
    held: usize,
    /// True when every matching document is in `docs`.
    complete: bool,
    /// Most bytes the held documents may take; the first is held regardless.
    budget: usize,
}

/// The outcome of applying one change.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Applied {
    pub events: Vec<WindowEvent>,
    /// The window cannot be known without reading the database again.
    pub needs_refill: bool,
}

impl Window {
    /// A window over `loaded`: the query's first `limit` documents (and one more, if the
    /// database has it, so we know whether the window is complete), or fewer when the load
    /// stopped at the byte budget (`cut`; its last document is then the one that crossed it).
    pub fn new(spec: Arc<QuerySpec>, budget: usize, mut loaded: Vec<Document>, cut: bool) -> Self {
        loaded.sort_by(|a, b| spec.order(a, b));
        let complete = !cut && loaded.len() <= spec.limit as usize;
        let mut window = Self {
            spec,
            sizes: loaded.iter().map(encoded_len).collect(),
            docs: loaded,
            held: 0,
            complete,
            budget,
        };
        window.held = window.fitting();
        window.forget_past_next();
        window
    }

    /// A fresh load of the same query, with the same budget.
    pub fn reload(&self, loaded: Vec<Document>, cut: bool) -> Self {
        Window::new(self.spec.clone(), self.budget, loaded, cut)
    }

    pub fn spec(&self) -> &Arc<QuerySpec> {
        &self.spec
    }

    /// The documents the window holds, in order.
    pub fn docs(&self) -> &[Document] {
        &self.docs[..self.held]
    }

    /// Most bytes the held documents may take.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// The bytes (as JSON) of the documents the window keeps: those it holds and the one past
    /// them it knows.
    pub fn bytes(&self) -> usize {
        self.sizes.iter().sum()
    }

    /// The longest prefix of `docs` within the limit and the budget (at least one document).
    fn fitting(&self) -> usize {
        let mut bytes = 0usize;
        let mut held = 0;
        for &size in self.sizes.iter().take(self.spec.limit as usize) {
            bytes = bytes.saturating_add(size);
            if held > 0 && bytes > self.budget {
                break;
            }
            held += 1;
        }
        held
    }

    /// Keeps one document past the held ones, no more.
    fn forget_past_next(&mut self) {
        if self.docs.len() > self.held + 1 {
            self.docs.truncate(self.held + 1);
            self.sizes.truncate(self.held + 1);
            self.complete = false;
        }
    }

    /// Applies one change of this query's type.
    pub fn apply(&mut self, change: &Change) -> Applied {
        let held_before = self.held;
        let last = self.docs.len().checked_sub(1);
        let old = self
            .docs
            .iter()
            .position(|d| d.id == change.doc_id)
            .map(|i| {
                self.sizes.remove(i);
                (i, self.docs.remove(i))
            });
        // In an incomplete window every unseen match sorts after the last known document (the
        // changed one's old version, if it was the last).
        let boundary = match &old {
            _ if self.complete => None,
            Some((i, doc)) if Some(*i) == last => Some(doc),
            _ => self.docs.last(),
        };
        let new = change.document().filter(|d| self.spec.matches(d));
        let mut placed = None;
        if let Some(doc) = new {
            let at = self
                .docs
                .partition_point(|d| self.spec.order(d, &doc).is_lt());
            // Past the last known document of an incomplete window, unseen matches may come
            // first: the document's place is unknown, so it is not in the window. Not sorting
            // after the boundary (as when the last document is edited in place) is known.
            let before_boundary = boundary.is_some_and(|b| !self.spec.order(&doc, b).is_gt());
            if at < self.docs.len() || self.complete || before_boundary {
                self.sizes.insert(at, encoded_len(&doc));
                self.docs.insert(at, doc);
                placed = Some(at);
            }
        }
        self.held = self.fitting();

        let was_held = old.filter(|(i, _)| *i < held_before).map(|(_, doc)| doc);
        let is_held = placed.filter(|&at| at < self.held);
        // How many of the other documents were held, and are.
        let others_before = held_before - usize::from(was_held.is_some());
        let others_now = self.held - usize::from(is_held.is_some());
        // The changed document's event first.
        let mut events = Vec::new();
        match (was_held, is_held) {
            (Some(old), Some(at)) => events.push(WindowEvent::Change {
                doc: self.docs[at].clone(),
                old: Box::new(old),
            }),
            (Some(old), None) => events.push(WindowEvent::Remove(old)),
            (None, Some(at)) => events.push(WindowEvent::Add(self.docs[at].clone())),
            (None, None) => {}
        }
        // The other documents kept their order, so only the edge of what is held moved: the
        // last ones held left (a client drops them from its end), or the next ones entered.
        let others = || {
            self.docs
                .iter()
                .enumerate()
                .filter(move |(i, _)| Some(*i) != placed)
                .map(|(_, doc)| doc)
        };
        if others_now < others_before {
            let left: Vec<&Document> = others()
                .skip(others_now)
                .take(others_before - others_now)
                .collect();
            events.extend(
                left.into_iter()
                    .rev()
                    .map(|doc| WindowEvent::Remove(doc.clone())),
            );
        } else {
            events.extend(
                others()
                    .skip(others_before)
                    .take(others_now - others_before)
                    .map(|doc| WindowEvent::Add(doc.clone())),
            );
        }
        self.forget_past_next();
        Applied {
            events,
            // Room for more, and no known document to take it: only the database can tell.
            needs_refill: !self.complete
                && self.docs.len() == self.held
                && self.held < self.spec.limit as usize,
        }
    }

    /// Replaces the window with a fresh load and returns the events that turn the old window
    /// into the new one.
    pub fn refill(&mut self, loaded: Vec<Document>, cut: bool) -> Vec<WindowEvent> {
        let fresh = self.reload(loaded, cut);
        let mut events = Vec::new();
        for old in self.docs() {
            if !fresh.docs().iter().any(|d| d.id == old.id) {
                events.push(WindowEvent::Remove(old.clone()));
            }
        }
        for doc in fresh.docs() {
            match self.docs().iter().find(|d| d.id == doc.id) {
                Some(old) if old.rev == doc.rev && old == doc => {}
                Some(old) => events.push(WindowEvent::Change {
                    doc: doc.clone(),
                    old: Box::new(old.clone()),
                }),
                None => events.push(WindowEvent::Add(doc.clone())),
            }
        }
        *self = fresh;
        events
    }

    /// Whether a document is in the window.
    pub fn contains(&self, id: Uuid) -> bool {
        self.docs().iter().any(|d| d.id == id)
    }
}

/// A document's size as a window counts it: the length of its JSON encoding (what a frame that
/// carries it costs, near enough). The store counts the same when it loads a window.
pub fn encoded_len(doc: &Document) -> usize {
    json_len(doc)
}

/// The length of `value` as compact JSON, counted without building it.
pub fn json_len(value: &impl serde::Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing to a counter cannot fail, and the values counted here (documents, JSON values)
    // always serialize.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Change, Cursor, Image, Op};
    use crate::query::{QueryLimits, QueryRequest};
    use chrono::{DateTime, Duration, Utc};
    use serde_json::json;

    const OWNER: &str = "did:key:zA";

    fn spec(limit: u32) -> Arc<QuerySpec> {
        let request: QueryRequest = serde_json::from_value(
            json!({"type": "posts", "where": {"data.on": true}, "limit": limit}),
        )
        .unwrap();
        QuerySpec::parse(
            &request,
            OWNER,
            QueryLimits {
                default_limit: 10,
                max_limit: 100,
                ..QueryLimits::default()
            },
        )
        .map(Arc::new)
        .unwrap()
    }

    fn at(n: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap() + Duration::seconds(n)
    }

    /// Document `n` (created at second n), matching when `on`.
    fn doc(n: u128, on: bool, rev: i64) -> Document {
        Document {
            id: Uuid::from_u128(n),
            doc_type: "posts".into(),
            owner: OWNER.into(),
            parent: None,
            rev,
            created_at: at(n as i64),
            updated_at: at(n as i64),
            acl: Default::default(),
            data: json!({"on": on}),
        }
    }

    fn change(op: Op, old: Option<&Document>, new: Option<&Document>) -> Change {
        let base = new.or(old).unwrap();
        let image = |d: &Document| Image {
            acl: d.acl.clone(),
            data: d.data.clone(),
        };
        Change {
            cursor: Cursor::new(1, 1),
            xid: 1,
            op,
            doc_id: base.id,
            doc_type: base.doc_type.clone(),
            owner: base.owner.clone(),
            parent: base.parent,
            rev: base.rev,
            created_at: base.created_at,
            updated_at: base.updated_at,
            logged_at: Utc::now(),
            new: new.map(image),
            old: old.map(image),
        }
    }

    fn ids(w: &Window) -> Vec<u128> {
        w.docs().iter().map(|d| d.id.as_u128()).collect()
    }

    #[test]
    fn enters_changes_and_leaves() {
        let mut w = Window::new(
            spec(3),
            usize::MAX,
            vec![doc(1, true, 1), doc(2, true, 1)],
            false,
        );
        assert_eq!(ids(&w), [2, 1], "newest first");
        // A new match enters at its place.
        let a = w.apply(&change(Op::Insert, None, Some(&doc(3, true, 1))));
        assert_eq!(a.events, vec![WindowEvent::Add(doc(3, true, 1))]);
        assert_eq!(ids(&w), [3, 2, 1]);
        // A non-match does nothing.
        assert_eq!(
            w.apply(&change(Op::Insert, None, Some(&doc(9, false, 1)))),
            Applied::default()
        );
        // An update that still matches is a change.
        let a = w.apply(&change(
            Op::Update,
            Some(&doc(2, true, 1)),
            Some(&doc(2, true, 2)),
        ));
        assert_eq!(
            a.events,
            vec![WindowEvent::Change {
                doc: doc(2, true, 2),
                old: Box::new(doc(2, true, 1))
            }]
        );
        // A fourth, newer match pushes the oldest out: the window is now incomplete.
        let a = w.apply(&change(Op::Insert, None, Some(&doc(4, true, 1))));
        assert_eq!(
            a.events,
            vec![
                WindowEvent::Add(doc(4, true, 1)),
                WindowEvent::Remove(doc(1, true, 1))
            ]
        );
        assert!(!a.needs_refill);
        assert_eq!(ids(&w), [4, 3, 2]);
        // An update that stops matching leaves; the pushed-out document, known to be next,
        // comes back without a load.
        let a = w.apply(&change(
            Op::Update,
            Some(&doc(3, true, 1)),
            Some(&doc(3, false, 2)),
        ));
        assert_eq!(
            a.events,
            vec![
                WindowEvent::Remove(doc(3, true, 1)),
                WindowEvent::Add(doc(1, true, 1))
            ]
        );
        assert!(!a.needs_refill);
        assert_eq!(ids(&w), [4, 2, 1]);
        // Another leaves: every match is known (1 was the last), so no load either.
        let a = w.apply(&change(Op::Delete, Some(&doc(2, true, 2)), None));
        assert_eq!(a.events, vec![WindowEvent::Remove(doc(2, true, 2))]);
        assert!(!a.needs_refill);
        assert_eq!(ids(&w), [4, 1]);
    }

    #[test]
    fn an_incomplete_window_does_not_guess_beyond_its_end() {
        // The database had more than the limit: 5 and 4 are held, 3 and older unseen.
        let mut w = Window::new(
            spec(2),
            usize::MAX,
            vec![doc(5, true, 1), doc(4, true, 1), doc(3, true, 1)],
            false,
        );
        assert_eq!(ids(&w), [5, 4]);
        // Document 2 sorts after everything held: unseen 3 comes first, so 2 is not added.
        let a = w.apply(&change(
            Op::Update,
            Some(&doc(2, false, 1)),
            Some(&doc(2, true, 2)),
        ));
        assert_eq!(a, Applied::default());
        // Deleting a held document lets the known next one in; after that, one more leaving
        // needs a load.
        let a = w.apply(&change(Op::Delete, Some(&doc(4, true, 1)), None));
        assert_eq!(
            a.events,
            vec![
                WindowEvent::Remove(doc(4, true, 1)),
                WindowEvent::Add(doc(3, true, 1))
            ]
        );
        assert!(!a.needs_refill);
        let a = w.apply(&change(Op::Delete, Some(&doc(5, true, 1)), None));
        assert_eq!(a.events, vec![WindowEvent::Remove(doc(5, true, 1))]);
        assert!(a.needs_refill);
    }

    #[test]
    fn editing_the_last_document_of_an_incomplete_window_is_a_change() {
        let mut w = Window::new(
            spec(2),
            usize::MAX,
            vec![doc(5, true, 1), doc(4, true, 1), doc(3, true, 1)],
            false,
        );
        let a = w.apply(&change(
            Op::Update,
            Some(&doc(4, true, 1)),
            Some(&doc(4, true, 2)),
        ));
        assert_eq!(
            a.events,
            vec![WindowEvent::Change {
                doc: doc(4, true, 2),
                old: Box::new(doc(4, true, 1))
            }]
        );
        assert!(!a.needs_refill, "its place is known: no database load");
        assert_eq!(ids(&w), [5, 4]);
    }

    #[test]
    fn a_complete_window_takes_matches_anywhere() {
        let mut w = Window::new(spec(5), usize::MAX, vec![doc(5, true, 1)], false);
        let a = w.apply(&change(Op::Insert, None, Some(&doc(1, true, 1))));
        assert_eq!(a.events, vec![WindowEvent::Add(doc(1, true, 1))]);
        let a = w.apply(&change(Op::Delete, Some(&doc(5, true, 1)), None));
        assert_eq!(a.events, vec![WindowEvent::Remove(doc(5, true, 1))]);
        assert!(!a.needs_refill, "nothing unseen: no refill");
        assert_eq!(ids(&w), [1]);
    }

    /// Document `n` with a payload of `pad` bytes.
    fn big(n: u128, pad: usize, rev: i64) -> Document {
        Document {
            data: json!({"on": true, "pad": "x".repeat(pad)}),
            ..doc(n, true, rev)
        }
    }

    /// Newest first: 5, 4, 3, 2, 1, about 1 KB each but 2 (300 bytes smaller), in a budget that
    /// holds two of them; 3 is known past the end.
    fn two_of_five() -> (Window, usize) {
        let one = encoded_len(&big(1, 1000, 1));
        let docs = vec![
            big(5, 1000, 1),
            big(4, 1000, 1),
            big(3, 1000, 1),
            big(2, 300, 1),
            big(1, 1000, 1),
        ];
        let w = Window::new(spec(10), one * 5 / 2, docs, false);
        assert_eq!(ids(&w), [5, 4]);
        (w, one)
    }

    #[test]
    fn a_window_ends_at_its_byte_budget_and_always_holds_its_first_document() {
        let (_, one) = two_of_five();
        // A budget below one document still holds the first.
        let w = Window::new(spec(10), 10, vec![big(1, 1000, 1), big(2, 1000, 1)], false);
        assert_eq!(ids(&w), [2]);
        // A load the store cut at the budget: its last document is the one past the end.
        let mut w = Window::new(
            spec(10),
            one * 3 / 2,
            vec![big(3, 1000, 1), big(2, 1000, 1)],
            true,
        );
        assert_eq!(ids(&w), [3]);
        // Documents older than the one past the end may have unseen ones before them.
        let a = w.apply(&change(Op::Insert, None, Some(&big(1, 10, 1))));
        assert_eq!(a, Applied::default());
    }

    #[test]
    fn growing_past_the_budget_pushes_documents_out_from_the_end() {
        let (mut w, _) = two_of_five();
        // A newer document enters; the last held one no longer fits and leaves.
        let a = w.apply(&change(Op::Insert, None, Some(&big(6, 1000, 1))));
        assert_eq!(
            a.events,
            vec![
                WindowEvent::Add(big(6, 1000, 1)),
                WindowEvent::Remove(big(4, 1000, 1))
            ]
        );
        assert!(!a.needs_refill, "4 is known to be next");
        // An update that grows a held document pushes the last one out too.
        let a = w.apply(&change(
            Op::Update,
            Some(&big(6, 1000, 1)),
            Some(&big(6, 2000, 2)),
        ));
        assert_eq!(
            a.events,
            vec![
                WindowEvent::Change {
                    doc: big(6, 2000, 2),
                    old: Box::new(big(6, 1000, 1))
                },
                WindowEvent::Remove(big(5, 1000, 1))
            ]
        );
        assert_eq!(ids(&w), [6]);
        // Shrinking it back lets the known next one in, without a load.
        let a = w.apply(&change(
            Op::Update,
            Some(&big(6, 2000, 2)),
            Some(&big(6, 1000, 3)),
        ));
        assert_eq!(
            a.events,
            vec![
                WindowEvent::Change {
                    doc: big(6, 1000, 3),
                    old: Box::new(big(6, 2000, 2))
                },
                WindowEvent::Add(big(5, 1000, 1))
            ]
        );
        assert!(
            a.needs_refill,
            "what follows 5 is unknown now, and there is room"
        );
    }

    #[test]
    fn changes_past_the_end_count_when_they_make_room_or_fit() {
        // The next document shrinks: it fits now.
        let (mut w, _) = two_of_five();
        let a = w.apply(&change(
            Op::Update,
            Some(&big(3, 1000, 1)),
            Some(&big(3, 300, 2)),
        ));
        assert_eq!(a.events, vec![WindowEvent::Add(big(3, 300, 2))]);
        assert_eq!(ids(&w), [5, 4, 3]);

        // A small document lands between the end and the next one: it fits.
        let (mut w, _) = two_of_five();
        let between = Document {
            id: Uuid::from_u128(35),
            created_at: at(3) + Duration::milliseconds(500),
            updated_at: at(3) + Duration::milliseconds(500),
            ..big(3, 300, 1)
        };
        let a = w.apply(&change(Op::Insert, None, Some(&between)));
        assert_eq!(a.events, vec![WindowEvent::Add(between)]);
        assert_eq!(ids(&w), [5, 4, 35]);
        assert!(!a.needs_refill, "3 is still known to be next");

        // The next one is deleted: what follows is unknown, and may fit.
        let (mut w, _) = two_of_five();
        let a = w.apply(&change(Op::Delete, Some(&big(3, 1000, 1)), None));
        assert!(a.events.is_empty());
        assert!(a.needs_refill);
        let events = w.refill(vec![big(5, 1000, 1), big(4, 1000, 1), big(2, 300, 1)], true);
        assert_eq!(events, vec![WindowEvent::Add(big(2, 300, 1))]);
        assert_eq!(ids(&w), [5, 4, 2]);

        // Editing a held document in place without freeing room loads nothing.
        let (mut w, _) = two_of_five();
        let a = w.apply(&change(
            Op::Update,
            Some(&big(4, 1000, 1)),
            Some(&big(4, 999, 2)),
        ));
        assert_eq!(a.events.len(), 1);
        assert!(!a.needs_refill, "3 is known and still does not fit");
    }

    #[test]
    fn a_full_window_lets_the_next_document_in_when_one_leaves() {
        // Limit 2 of 3 documents: the third is known past the end.
        let mut w = Window::new(
            spec(2),
            usize::MAX,
            vec![doc(3, true, 1), doc(2, true, 1), doc(1, true, 1)],
            false,
        );
        let a = w.apply(&change(Op::Delete, Some(&doc(3, true, 1)), None));
        assert_eq!(
            a.events,
            vec![
                WindowEvent::Remove(doc(3, true, 1)),
                WindowEvent::Add(doc(1, true, 1))
            ]
        );
        assert_eq!(ids(&w), [2, 1]);
        assert!(!a.needs_refill, "the window is full again");
    }
}
