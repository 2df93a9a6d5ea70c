//! A live query's result window: the first `limit` matching documents in sort order, kept in
//! memory and updated change by change. It says what each change did to the window (a document
//! entered, changed in place or moved, or left), and when it can no longer tell — the window
//! shrank below the limit while unseen matches may exist — it asks for a refill.
//!
//! A window also ends once its documents hold more than its byte budget, as a REST page does:
//! `limit` counts documents and each may be as large as a request body, so without it one query
//! could keep `limit` × that in memory. The first document is always held, so a window is never
//! empty while something matches. A window ended by bytes asks for a refill only after it lost a
//! document or one shrank (before that, nothing more could fit).

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
    /// Sorted by `spec.order`; at most `spec.limit` documents.
    docs: Vec<Document>,
    /// True when every matching document is in `docs` (the last load found fewer than the
    /// limit, and nothing has been pushed out since).
    complete: bool,
    /// Most bytes (see [`encoded_len`]) the documents may hold; the first is held regardless.
    budget: usize,
    /// What `docs` hold now.
    bytes: usize,
    /// The window ended early for bytes, and no document has left or shrunk since.
    full: bool,
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
    /// stopped at the byte budget (`cut`), holding at most `budget` bytes.
    pub fn new(spec: Arc<QuerySpec>, budget: usize, mut loaded: Vec<Document>, cut: bool) -> Self {
        loaded.sort_by(|a, b| spec.order(a, b));
        let complete = !cut && loaded.len() <= spec.limit as usize;
        loaded.truncate(spec.limit as usize);
        let mut window = Self {
            spec,
            bytes: loaded.iter().map(encoded_len).sum(),
            docs: loaded,
            complete,
            budget,
            full: cut,
        };
        window.trim(&mut Vec::new());
        window
    }

    /// A fresh load of the same query, with the same budget.
    pub fn reload(&self, loaded: Vec<Document>, cut: bool) -> Self {
        Window::new(self.spec.clone(), self.budget, loaded, cut)
    }

    pub fn spec(&self) -> &Arc<QuerySpec> {
        &self.spec
    }

    pub fn docs(&self) -> &[Document] {
        &self.docs
    }

    /// Most bytes the documents may hold.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Drops documents from the end while the window holds more than its budget (keeping the
    /// first), adding a `Remove` for each to `events`.
    fn trim(&mut self, events: &mut Vec<WindowEvent>) {
        while self.bytes > self.budget && self.docs.len() > 1 {
            let Some(last) = self.docs.pop() else { break };
            self.bytes = self.bytes.saturating_sub(encoded_len(&last));
            self.complete = false;
            self.full = true;
            events.push(WindowEvent::Remove(last));
        }
    }

    /// Applies one change of this query's type.
    pub fn apply(&mut self, change: &Change) -> Applied {
        let mut applied = Applied::default();
        let bytes_before = self.bytes;
        // In an incomplete window every unseen match sorts after the last held document.
        let boundary = if self.complete {
            None
        } else {
            self.docs.last().cloned()
        };
        let old = self
            .docs
            .iter()
            .position(|d| d.id == change.doc_id)
            .map(|i| self.docs.remove(i));
        if let Some(old) = &old {
            self.bytes = self.bytes.saturating_sub(encoded_len(old));
        }
        let new = change.document().filter(|d| self.spec.matches(d));
        let mut placed = false;
        if let Some(doc) = new {
            let at = self
                .docs
                .partition_point(|d| self.spec.order(d, &doc).is_lt());
            // Past the last held document of an incomplete window, unseen matches may come
            // first: the document's place is unknown, so it is not in the window. Not sorting
            // after the boundary (as when the last document is edited in place) is known.
            let before_boundary = boundary
                .as_ref()
                .is_some_and(|b| !self.spec.order(&doc, b).is_gt());
            if at < self.docs.len() || self.complete || before_boundary {
                self.bytes = self.bytes.saturating_add(encoded_len(&doc));
                self.docs.insert(at, doc.clone());
                placed = true;
                match &old {
                    Some(old) => applied.events.push(WindowEvent::Change {
                        doc,
                        old: Box::new(old.clone()),
                    }),
                    None => applied.events.push(WindowEvent::Add(doc)),
                }
                if self.docs.len() > self.spec.limit as usize
                    && let Some(pushed) = self.docs.pop()
                {
                    self.bytes = self.bytes.saturating_sub(encoded_len(&pushed));
                    self.complete = false;
                    applied.events.push(WindowEvent::Remove(pushed));
                }
            }
        }
        if !placed && let Some(old) = old {
            applied.events.push(WindowEvent::Remove(old));
        }
        // Room freed: a window that had ended for bytes may take more now.
        if self.bytes < bytes_before {
            self.full = false;
        }
        self.trim(&mut applied.events);
        applied.needs_refill =
            !self.complete && !self.full && self.docs.len() < self.spec.limit as usize;
        applied
    }

    /// Replaces the window with a fresh load and returns the events that turn the old window
    /// into the new one.
    pub fn refill(&mut self, loaded: Vec<Document>, cut: bool) -> Vec<WindowEvent> {
        let fresh = self.reload(loaded, cut);
        let mut events = Vec::new();
        for old in &self.docs {
            if !fresh.docs.iter().any(|d| d.id == old.id) {
                events.push(WindowEvent::Remove(old.clone()));
            }
        }
        for doc in &fresh.docs {
            match self.docs.iter().find(|d| d.id == doc.id) {
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
        self.docs.iter().any(|d| d.id == id)
    }
}

/// A document's size as the window counts it: its JSON encoding's length (what a frame that
/// carries it costs, near enough).
fn encoded_len(doc: &Document) -> usize {
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
    // Writing to a counter cannot fail, and a document (plain JSON values) always serializes.
    let _ = serde_json::to_writer(&mut count, doc);
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
        // An update that stops matching leaves, and the incomplete window needs a refill.
        let a = w.apply(&change(
            Op::Update,
            Some(&doc(3, true, 1)),
            Some(&doc(3, false, 2)),
        ));
        assert_eq!(a.events, vec![WindowEvent::Remove(doc(3, true, 1))]);
        assert!(a.needs_refill);
        // The refill brings the pushed-out document back.
        let events = w.refill(
            vec![doc(4, true, 1), doc(2, true, 2), doc(1, true, 1)],
            false,
        );
        assert_eq!(events, vec![WindowEvent::Add(doc(1, true, 1))]);
        assert_eq!(ids(&w), [4, 2, 1]);
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
        // Deleting a held document leaves and asks for a refill.
        let a = w.apply(&change(Op::Delete, Some(&doc(4, true, 1)), None));
        assert_eq!(a.events, vec![WindowEvent::Remove(doc(4, true, 1))]);
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

    #[test]
    fn a_window_ends_at_its_byte_budget_and_always_holds_its_first_document() {
        let one = encoded_len(&big(1, 1000, 1));
        // Room for two and a half documents: the third does not fit.
        let budget = one * 5 / 2;
        let w = Window::new(
            spec(10),
            budget,
            (1..=5).map(|n| big(n, 1000, 1)).collect(),
            false,
        );
        assert_eq!(ids(&w), [5, 4]);
        // A budget below one document still holds the first.
        let w = Window::new(spec(10), 10, vec![big(1, 1000, 1), big(2, 1000, 1)], false);
        assert_eq!(ids(&w), [2]);
        // A load the store cut short for bytes is not complete, whatever it holds.
        let mut w = Window::new(spec(10), usize::MAX, vec![big(1, 1000, 1)], true);
        let a = w.apply(&change(Op::Insert, None, Some(&big(0, 10, 1))));
        assert_eq!(a, Applied::default(), "unseen documents may sort first");
    }

    #[test]
    fn growing_past_the_budget_pushes_documents_out_and_shrinking_asks_for_a_refill() {
        let one = encoded_len(&big(1, 1000, 1));
        let budget = one * 5 / 2;
        let mut w = Window::new(
            spec(10),
            budget,
            vec![big(3, 1000, 1), big(2, 1000, 1)],
            false,
        );
        assert_eq!(ids(&w), [3, 2]);
        // A newer document enters; the oldest no longer fits and leaves.
        let a = w.apply(&change(Op::Insert, None, Some(&big(4, 1000, 1))));
        assert_eq!(
            a.events,
            vec![
                WindowEvent::Add(big(4, 1000, 1)),
                WindowEvent::Remove(big(2, 1000, 1))
            ]
        );
        assert!(!a.needs_refill, "full for bytes: nothing more could fit");
        // An update that grows a held document pushes the last one out too.
        let a = w.apply(&change(
            Op::Update,
            Some(&big(4, 1000, 1)),
            Some(&big(4, 2000, 2)),
        ));
        assert_eq!(
            a.events,
            vec![
                WindowEvent::Change {
                    doc: big(4, 2000, 2),
                    old: Box::new(big(4, 1000, 1))
                },
                WindowEvent::Remove(big(3, 1000, 1))
            ]
        );
        assert_eq!(ids(&w), [4]);
        assert!(!a.needs_refill);
        // Editing it in place without shrinking it frees nothing: still no refill.
        let a = w.apply(&change(
            Op::Update,
            Some(&big(4, 2000, 2)),
            Some(&big(4, 2000, 3)),
        ));
        assert!(!a.needs_refill);
        // Shrinking it frees room: the window cannot know what fits now without a load.
        let a = w.apply(&change(
            Op::Update,
            Some(&big(4, 2000, 3)),
            Some(&big(4, 10, 4)),
        ));
        assert!(a.needs_refill);
        let events = w.refill(vec![big(4, 10, 4), big(3, 1000, 1), big(2, 1000, 1)], false);
        assert_eq!(
            events,
            vec![
                WindowEvent::Add(big(3, 1000, 1)),
                WindowEvent::Add(big(2, 1000, 1))
            ]
        );
    }
}
