//! Grouped statements: requests of one kind that arrive while earlier ones are at the database
//! share one statement. Creates share one INSERT and one commit ([`super::creates`]); reads by id
//! share one `SELECT … WHERE id = ANY(…)` ([`super::reads`]).
//!
//! At most [`Batching::slots`] statements of a kind run at once. A request that finds one of
//! those slots free runs its own statement in its own task, so a lone request is never delayed
//! nor handed between tasks; requests that arrive while every slot is busy queue, and the slot
//! that frees up next runs up to [`Batching::max_rows`] of them as one statement (in a task of its
//! own, so the request that held the slot answers at once). Under concurrency this turns N round
//! trips into one — which is where a one-row statement's time goes here (waking the database
//! backend twice, and for a write the commit's WAL flush), not in the row itself.
//!
//! Each slot keeps its database connection between statements instead of giving it back to the
//! pool: sqlx's pool sends every connection it takes back a `Sync` and waits for the answer, one
//! more round trip per statement (measured: 8 tasks reading through the pool 24k rows/s, on
//! connections of their own 37k; docs/benchmarks.md). So a kind of statement holds at most
//! [`Batching::slots`] of the pool's connections, set up by [`slot_connection`].
//!
//! Invariants: a queued request's statement starts after the request was queued, so it sees
//! every write committed before the request arrived (a grouped read is as fresh as a lone one).
//! Every request gets an answer; the queue is bounded and a request beyond it is refused with
//! [`StoreError::Unavailable`]. A connection is kept only after a statement that ran to its end
//! and did not fail on the connection itself; one dropped halfway, or after an I/O or protocol
//! error, is closed.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::pool::PoolConnection;
use sqlx::postgres::Postgres;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::StoreError;

/// How requests of one kind are grouped; see `[database]` in config/default.toml.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Most requests one statement carries (1: every request is its own statement).
    pub max_rows: usize,
    /// Statements of this kind in flight at once (each holds a pooled connection meanwhile).
    pub slots: usize,
}

impl Default for Batching {
    fn default() -> Self {
        Self {
            max_rows: 64,
            slots: 4,
        }
    }
}

/// How long a slot keeps one connection before closing it for a new one (sqlx's default
/// `max_lifetime`: a backend that lives for days keeps what its caches grew to).
const MAX_KEPT: Duration = Duration::from_secs(30 * 60);

/// A kind of statement that can carry one request or many.
pub(super) trait Grouped: Send + Sync + 'static {
    type Input: Send + 'static;
    type Output: Send + 'static;
    /// What a statement runs on (a pooled database connection).
    type Connection: Send + 'static;
    /// What the requests are, for refusals ("document creates").
    const WHAT: &'static str;
    /// Histogram of requests per statement.
    const ROWS_METRIC: &'static str;
    /// Gauge of requests waiting for a slot.
    const WAITING_METRIC: &'static str;

    /// An id no two requests of one statement may share (None: any requests may share one).
    fn exclusive_id(input: &Self::Input) -> Option<Uuid>;

    /// A new connection, for a slot that has none yet.
    fn connect(&self) -> impl Future<Output = Result<Self::Connection, StoreError>> + Send;

    /// One request, alone in its statement.
    fn one(
        &self,
        connection: &mut Self::Connection,
        input: Self::Input,
    ) -> impl Future<Output = Result<Self::Output, StoreError>> + Send;

    /// Several requests (two or more), each answered through its [`Reply`]. Returns whether the
    /// connection is still fit for the next statement (see [`connection_survives`]).
    fn many(
        &self,
        connection: &mut Self::Connection,
        batch: Vec<Pending<Self>>,
    ) -> impl Future<Output = bool> + Send;
}

/// A connection for a slot of a database statement kind: from the pool, with generic plans, and
/// closed instead of given back to the pool when the slot lets it go (the pool's other users
/// would get the setting too).
///
/// Generic plans: the grouped statements bind arrays, whose length PostgreSQL's planner assumes
/// to be 10. Planning a group of fewer with the real length always looks cheaper, so a prepared
/// `id = ANY($1)` was planned afresh on every run: 29% of the database backend's time in a read
/// run at 8 clients (`perf`, docs/benchmarks.md). The generic plan is the same index scan.
pub(super) async fn slot_connection(pool: &PgPool) -> Result<PoolConnection<Postgres>, StoreError> {
    let mut connection = pool.acquire().await?;
    connection.close_on_drop();
    sqlx::query("SET plan_cache_mode = force_generic_plan")
        .execute(&mut *connection)
        .await?;
    Ok(connection)
}

/// Whether a connection on which a statement failed with `error` may run the next one: yes after
/// an error the database reported (the connection is then back at its prompt), no after an I/O,
/// pool or protocol failure.
pub(super) fn connection_survives(error: &StoreError) -> bool {
    match error {
        StoreError::Unavailable(_) => false,
        StoreError::Database(e) => matches!(e, sqlx::Error::Database(_)),
        _ => true,
    }
}

/// A queued request and where its answer goes.
pub(super) struct Pending<G: Grouped + ?Sized> {
    pub(super) input: G::Input,
    pub(super) reply: Reply<G>,
}

/// Where a queued request's answer goes.
pub(super) struct Reply<G: Grouped + ?Sized>(oneshot::Sender<Result<G::Output, StoreError>>);

impl<G: Grouped + ?Sized> Reply<G> {
    /// Answers the request; a caller that gave up meanwhile is not an error.
    pub(super) fn send(self, result: Result<G::Output, StoreError>) {
        let _ = self.0.send(result);
    }
}

/// The requests of one kind: the slots and the queue behind them.
pub(super) struct Batcher<G: Grouped>(Arc<Shared<G>>);

impl<G: Grouped> Clone for Batcher<G> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<G: Grouped> std::fmt::Debug for Batcher<G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("what", &G::WHAT)
            .field("max_rows", &self.0.max_rows)
            .field("slots", &self.0.slots)
            .finish_non_exhaustive()
    }
}

struct Shared<G: Grouped> {
    statement: G,
    max_rows: usize,
    slots: usize,
    /// Beyond this many queued requests a request is refused (503) rather than queued.
    max_queued: usize,
    state: Mutex<State<G>>,
}

struct State<G: Grouped> {
    /// Slots in use: statements running or about to run.
    busy: usize,
    queue: VecDeque<Pending<G>>,
    /// Connections of the slots not in use (at most `slots`, as each slot takes one).
    kept: Vec<Kept<G::Connection>>,
    /// Set by [`Batcher::close`]: no connection is kept from then on.
    closed: bool,
}

/// A slot's connection and when it was opened.
struct Kept<C> {
    connection: C,
    since: Instant,
}

impl<G: Grouped> Batcher<G> {
    pub(super) fn new(statement: G, batching: Batching) -> Self {
        let max_rows = batching.max_rows.max(1);
        let slots = batching.slots.max(1);
        Self(Arc::new(Shared {
            statement,
            max_rows,
            slots,
            max_queued: max_rows * slots * 16,
            state: Mutex::new(State {
                busy: 0,
                queue: VecDeque::new(),
                kept: Vec::new(),
                closed: false,
            }),
        }))
    }

    /// Closes the kept connections and keeps none from now on, so that closing the pool (which
    /// waits for every connection) can finish.
    pub(super) fn close(&self) {
        let kept = {
            let mut state = self.0.lock();
            state.closed = true;
            std::mem::take(&mut state.kept)
        };
        drop(kept);
    }

    /// Runs `input` alone if a slot is free, else with the requests queued beside it.
    pub(super) async fn run(&self, input: G::Input) -> Result<G::Output, StoreError> {
        let shared = &self.0;
        let admitted = {
            let mut state = shared.lock();
            if state.busy < shared.slots && state.queue.is_empty() {
                state.busy += 1;
                Admitted::Slot(input)
            } else if state.queue.len() >= shared.max_queued {
                return Err(StoreError::Unavailable(sqlx::Error::Protocol(format!(
                    "{} {} are already waiting for the database",
                    state.queue.len(),
                    G::WHAT
                ))));
            } else {
                let (reply, answer) = oneshot::channel();
                state.queue.push_back(Pending {
                    input,
                    reply: Reply(reply),
                });
                metrics::gauge!(G::WAITING_METRIC).increment(1.0);
                Admitted::Queued(answer)
            }
        };
        match admitted {
            Admitted::Slot(input) => {
                // Released when this future ends, also when it is dropped mid-statement.
                let slot = Slot(self.0.clone());
                metrics::histogram!(G::ROWS_METRIC).record(1.0);
                let result = shared.one(input).await;
                drop(slot);
                result
            }
            // The sender is dropped unanswered only if the runtime drops the running task.
            Admitted::Queued(answer) => answer
                .await
                .map_err(|_| StoreError::Unavailable(sqlx::Error::PoolClosed))?,
        }
    }
}

impl<G: Grouped> Shared<G> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<G>> {
        // The state is consistent between statements (no code inside can panic halfway).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The queued requests a freed slot runs next (None: the slot is given back). Exclusive ids
    /// are distinct within a batch: a request whose id is already in it stays first in the queue.
    fn next_batch(&self) -> Option<Vec<Pending<G>>> {
        let mut state = self.lock();
        if state.queue.is_empty() {
            state.busy -= 1;
            return None;
        }
        let mut batch: Vec<Pending<G>> = Vec::new();
        let mut ids = HashSet::new();
        while batch.len() < self.max_rows {
            let Some(pending) = state.queue.pop_front() else {
                break;
            };
            if let Some(id) = G::exclusive_id(&pending.input)
                && !ids.insert(id)
            {
                state.queue.push_front(pending);
                break;
            }
            batch.push(pending);
        }
        metrics::gauge!(G::WAITING_METRIC).decrement(batch.len() as f64);
        Some(batch)
    }

    /// The connection of a free slot: a kept one, or a new one from the pool.
    async fn connection(&self) -> Result<Kept<G::Connection>, StoreError> {
        if let Some(kept) = self.lock().kept.pop() {
            return Ok(kept);
        }
        Ok(Kept {
            connection: self.statement.connect().await?,
            since: Instant::now(),
        })
    }

    /// Keeps a connection for the next statement, unless it is due to be replaced or the
    /// batcher is closed (then it is closed as it drops, outside the lock).
    fn keep(&self, kept: Kept<G::Connection>) {
        if kept.since.elapsed() >= MAX_KEPT {
            return;
        }
        let mut state = self.lock();
        if !state.closed {
            state.kept.push(kept);
        }
    }

    /// One request in its own statement. If this future is dropped halfway, so is the connection.
    async fn one(&self, input: G::Input) -> Result<G::Output, StoreError> {
        let mut kept = self.connection().await?;
        let result = self.statement.one(&mut kept.connection, input).await;
        if result.as_ref().err().is_none_or(connection_survives) {
            self.keep(kept);
        }
        result
    }

    /// Two or more requests in one statement.
    async fn many(&self, batch: Vec<Pending<G>>) {
        let mut kept = match self.connection().await {
            Ok(kept) => kept,
            Err(e) => {
                let failure = shared_failure(&e);
                for pending in batch {
                    pending.reply.send(Err(failure()));
                }
                return;
            }
        };
        if self.statement.many(&mut kept.connection, batch).await {
            self.keep(kept);
        }
    }

    /// Runs queued batches while there are any, then gives the slot back.
    async fn drain(self: Arc<Self>, mut batch: Vec<Pending<G>>) {
        loop {
            metrics::histogram!(G::ROWS_METRIC).record(batch.len() as f64);
            if batch.len() == 1 {
                for pending in batch {
                    let result = self.one(pending.input).await;
                    pending.reply.send(result);
                }
            } else {
                self.many(batch).await;
            }
            match self.next_batch() {
                Some(next) => batch = next,
                None => return,
            }
        }
    }
}

/// How a request got in: with a slot of its own, or into the queue.
enum Admitted<I, O> {
    Slot(I),
    Queued(oneshot::Receiver<Result<O, StoreError>>),
}

/// A slot held by a request running its own statement.
struct Slot<G: Grouped>(Arc<Shared<G>>);

impl<G: Grouped> Drop for Slot<G> {
    fn drop(&mut self) {
        let Some(batch) = self.0.next_batch() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(self.0.clone().drain(batch));
            }
            // No runtime (it is being torn down): the queued requests' senders drop with the
            // batch, and their callers get `Unavailable`.
            Err(_) => drop(batch),
        }
    }
}

/// The error each request of a failed shared statement gets (a database error is not `Clone`):
/// a connection failure stays `Unavailable` (the statement may or may not have run, as for a
/// lone request), anything else a database error with the same message.
pub(super) fn shared_failure(error: &StoreError) -> impl Fn() -> StoreError + use<> {
    let unavailable = matches!(error, StoreError::Unavailable(_));
    let cause = match error {
        StoreError::Unavailable(e) | StoreError::Database(e) => e.to_string(),
        other => other.to_string(),
    };
    move || {
        let error = sqlx::Error::Protocol(cause.clone());
        if unavailable {
            StoreError::Unavailable(error)
        } else {
            StoreError::Database(error)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // in tests a failed unwrap is a failed test

    use super::*;

    /// A statement that records what it ran; a lone request waits until the gate opens.
    struct Recorder {
        gate: tokio::sync::watch::Receiver<bool>,
        ran: Mutex<Vec<Vec<u128>>>,
    }

    impl Grouped for Recorder {
        type Input = Uuid;
        type Output = Uuid;
        type Connection = ();
        const WHAT: &'static str = "test requests";
        const ROWS_METRIC: &'static str = "test_batch_rows";
        const WAITING_METRIC: &'static str = "test_waiting";

        fn exclusive_id(input: &Uuid) -> Option<Uuid> {
            Some(*input)
        }

        async fn connect(&self) -> Result<(), StoreError> {
            Ok(())
        }

        async fn one(&self, (): &mut (), input: Uuid) -> Result<Uuid, StoreError> {
            let _ = self.gate.clone().wait_for(|open| *open).await;
            self.ran.lock().unwrap().push(vec![input.as_u128()]);
            Ok(input)
        }

        async fn many(&self, (): &mut (), batch: Vec<Pending<Self>>) -> bool {
            let inputs = batch.iter().map(|p| p.input.as_u128()).collect();
            self.ran.lock().unwrap().push(inputs);
            for pending in batch {
                let input = pending.input;
                pending.reply.send(Ok(input));
            }
            true
        }
    }

    fn batcher(max_rows: usize) -> (Batcher<Recorder>, tokio::sync::watch::Sender<bool>) {
        let (open, gate) = tokio::sync::watch::channel(false);
        let recorder = Recorder {
            gate,
            ran: Mutex::default(),
        };
        let batching = Batching { max_rows, slots: 1 };
        (Batcher::new(recorder, batching), open)
    }

    /// Lets spawned tasks run (one thread: they run when this one yields) until `n` are queued.
    async fn until_queued(batcher: &Batcher<Recorder>, n: usize) {
        while batcher.0.lock().queue.len() < n {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn queued_requests_go_in_batches_with_distinct_ids_and_every_one_is_answered() {
        let (batcher, open) = batcher(3);
        let id = |n: u128| Uuid::from_u128(n);
        let held = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.run(id(1)).await }
        });
        while batcher.0.lock().busy == 0 {
            tokio::task::yield_now().await;
        }
        let queued: Vec<u128> = vec![10, 11, 10, 12, 13];
        let tasks: Vec<_> = queued
            .iter()
            .map(|n| {
                let batcher = batcher.clone();
                let input = id(*n);
                tokio::spawn(async move { batcher.run(input).await })
            })
            .collect();
        until_queued(&batcher, queued.len()).await;
        open.send(true).unwrap();
        assert_eq!(held.await.unwrap().unwrap(), id(1));
        for (n, task) in queued.iter().zip(tasks) {
            assert_eq!(task.await.unwrap().unwrap(), id(*n));
        }
        // The second 10 cannot join the first; the next batch stops at max_rows.
        let ran = batcher.0.statement.ran.lock().unwrap().clone();
        assert_eq!(ran, vec![vec![1], vec![10, 11], vec![10, 12, 13]]);
        assert_eq!(batcher.0.lock().busy, 0, "the slot was given back");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_queue_refuses_instead_of_growing() {
        let (batcher, open) = batcher(1);
        let max_queued = batcher.0.max_queued;
        let mut tasks = Vec::new();
        for n in 0..=max_queued {
            let batcher = batcher.clone();
            let input = Uuid::from_u128(n as u128);
            tasks.push(tokio::spawn(async move { batcher.run(input).await }));
        }
        until_queued(&batcher, max_queued).await;
        let refused = batcher.run(Uuid::from_u128(u128::MAX)).await;
        assert!(
            matches!(refused, Err(StoreError::Unavailable(_))),
            "{refused:?}"
        );
        open.send(true).unwrap();
        for task in tasks {
            assert!(task.await.unwrap().is_ok());
        }
    }
}
