//! The node's feed reader: turns committed writes into an ordered stream of changes for this
//! node. It wakes on three things and depends on none of them arriving:
//!
//! - in-process, when this node's own write has committed ([`FeedWaker`]): it makes a tick;
//! - a doorbell NOTIFY from another node, sent when that node's tick committed: it reads;
//! - a poll timer, which finds writes made straight in SQL: it makes a tick if one is due.
//!
//! A tick rings the doorbell at its own commit (one NOTIFY per tick, never inside a writer's
//! transaction) and brings the first page of changes with it, so a light load's change reaches
//! the node one round trip after its commit. Ticks and reads run on the LISTEN connection
//! itself, so the node's own ring comes back in the tick's reply and wakes nothing. A lost
//! LISTEN connection (notifications sent meanwhile are gone) just triggers a read; a database
//! outage delays reads and loses nothing, because the position is a cursor into the log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::PgListener;
use sqlx::{Acquire, PgPool};
use tokio::sync::{Notify, watch};

use super::{Change, Cursor, DOORBELL_CHANNEL, Feed, FeedError, Filter};

/// How many changes one read fetches.
const PAGE: u32 = 1000;
/// How many changes the read inside a tick fetches: it holds the cluster-wide tick lock, so it
/// is kept to what a light load's batch holds; a fuller batch is read on after the tick.
const TICK_PAGE: u32 = 64;

/// Lets writers wake the node's feed reader after their transaction committed.
#[derive(Debug, Clone, Default)]
pub struct FeedWaker(Arc<Notify>);

impl FeedWaker {
    /// Call after a document write has committed.
    pub fn committed(&self) {
        self.0.notify_one();
    }
}

/// Listener timing; see `[feed]` in config/default.toml.
#[derive(Debug, Clone, Copy)]
pub struct ListenerSettings {
    pub poll_interval: Duration,
    pub min_tick_interval: Duration,
    pub tick_burst: u32,
}

/// What the listener publishes to: ordered pages of changes, and the position reached.
pub trait ChangeSink: Send + 'static {
    /// Called with each page of changes, in feed order; `position` is where the next page
    /// starts. The listener reads no further until this returns (backpressure).
    fn publish(
        &mut self,
        changes: Vec<Change>,
        position: Cursor,
    ) -> impl std::future::Future<Output = ()> + Send;

    /// Why a [`ChangeSink::resync`] could not be made.
    type ResyncError: std::fmt::Display + Send;

    /// The feed lost changes this node had not read yet (it fell behind retention): reading goes
    /// on from `position`; everything built from the feed must reload. An error (what must be
    /// read again could not be) is retried with the same `position`, and no change past it is
    /// published until one succeeds: state carried over the gap (which certificates are held)
    /// would otherwise judge those changes.
    fn resync(
        &mut self,
        position: Cursor,
    ) -> impl std::future::Future<Output = Result<(), Self::ResyncError>> + Send;
}

/// The node's feed reader and what it needs.
#[derive(Debug)]
pub struct FeedListener {
    pub feed: Feed,
    /// A pool for the LISTEN connection, apart from the request pool.
    pub listen_pool: PgPool,
    pub waker: FeedWaker,
    pub settings: ListenerSettings,
    /// Where to start (usually [`Feed::head`]).
    pub position: Cursor,
    /// Receives every position reached, for long-polling readers.
    pub head: watch::Sender<Cursor>,
}

impl FeedListener {
    /// Runs until `stop` resolves.
    pub async fn run(self, mut sink: impl ChangeSink, stop: impl std::future::Future<Output = ()>) {
        let FeedListener {
            feed,
            listen_pool,
            waker,
            settings,
            mut position,
            head,
        } = self;
        tokio::pin!(stop);
        let mut listener: Option<PgListener> = None;
        let mut pacer = TickPacer::new(settings.min_tick_interval, settings.tick_burst);
        let mut poll = tokio::time::interval(settings.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut backoff = Duration::from_millis(50);
        let mut must_tick = true;
        loop {
            // Read (and tick first if asked to) until caught up; on error, back off and retry.
            let result = async {
                // A tick brings the first page with it (one round trip); the rest is read after.
                let mut first_page = None;
                // Ticks and reads run on the LISTEN connection while there is one (see
                // `Feed::tick_and_read_on`), else on the pool.
                let mut conn = match listener.as_mut() {
                    Some(l) => Some(l.acquire().await?),
                    None => None,
                };
                if must_tick {
                    let wait = pacer.wait(Instant::now());
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    let started = Instant::now();
                    let (made, page) = feed
                        .tick_and_read_on(conn.as_deref_mut(), position, TICK_PAGE)
                        .await?;
                    // The tick's round trip alone: with `vibe_feed_lag_seconds` it tells the
                    // database's share of the lag from the wait for this task to run.
                    metrics::histogram!("vibe_feed_tick_seconds")
                        .record(started.elapsed().as_secs_f64());
                    if made.is_some() {
                        pacer.cut(started);
                        metrics::counter!("vibe_feed_ticks_total").increment(1);
                    }
                    first_page = Some(page);
                }
                loop {
                    let page = match first_page.take() {
                        Some(page) => page,
                        None => {
                            feed.read_on(conn.as_deref_mut(), position, &Filter::default(), PAGE)
                                .await?
                        }
                    };
                    let n = page.changes.len();
                    let full = page.full;
                    if let Some(next) = page.next {
                        position = next;
                    }
                    if n > 0 {
                        observe_lag(&page.changes);
                        sink.publish(page.changes, position).await;
                    }
                    head.send_if_modified(|h| {
                        let moved = *h != position;
                        *h = position;
                        moved
                    });
                    if !full {
                        return Ok::<(), FeedError>(());
                    }
                }
            }
            .await;
            match result {
                Ok(()) => {
                    must_tick = false;
                    backoff = Duration::from_millis(50);
                }
                Err(FeedError::CursorExpired) => {
                    tracing::error!(%position, "this node fell behind the feed's retention; resyncing every live query");
                    metrics::counter!("vibe_feed_resyncs_total").increment(1);
                    match feed.head().await {
                        Ok(new_position) => {
                            position = new_position;
                            while let Err(e) = sink.resync(position).await {
                                tracing::warn!(error = %e, ?backoff, "resync failed; retrying");
                                tokio::select! {
                                    () = tokio::time::sleep(backoff) => {}
                                    () = &mut stop => return,
                                }
                                backoff = (backoff * 2).min(Duration::from_secs(2));
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot read the feed head"),
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, ?backoff, "change feed read failed; retrying");
                    // The LISTEN connection may be what failed: the retry runs on the pool, and
                    // a new one is opened after it (that read finds whatever rang meanwhile).
                    listener = None;
                    metrics::counter!("vibe_feed_errors_total").increment(1);
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = &mut stop => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            }

            if listener.is_none() {
                listener = connect_listener(&listen_pool).await;
                // Anything rung while we were not listening is found by this read.
                if listener.is_some() {
                    continue;
                }
            }
            tokio::select! {
                () = waker.0.notified() => must_tick = true,
                _ = poll.tick() => must_tick = true,
                bell = doorbell(&mut listener, feed.node()) => {
                    if !bell {
                        // Connection lost: notifications sent meanwhile are gone; read the log.
                        listener = None;
                    }
                }
                () = &mut stop => return,
            }
        }
    }
}

/// Spaces this node's ticks that cut a batch: over time at most one per `interval`, so under
/// load the writes that commit in between share a tick (each tick is a statement on the
/// cluster-wide tick lock), but up to `burst` back to back when fewer came before. Without the
/// burst a light load paid for its jitter: two writes 3 ms apart at 100 writes/s, the second
/// waited 2 ms for its tick. (A token bucket, kept as GCRA's theoretical arrival time.) A tick
/// that found nothing new — the poll's, or a doorbell for changes another node already cut —
/// counts for nothing.
#[derive(Debug)]
struct TickPacer {
    interval: Duration,
    /// How far ahead of now the schedule may run: `burst - 1` intervals.
    slack: Duration,
    /// When the bucket would be empty again at the sustained rate; None before the first cut.
    due: Option<Instant>,
}

impl TickPacer {
    fn new(interval: Duration, burst: u32) -> Self {
        Self {
            interval,
            slack: interval.saturating_mul(burst.saturating_sub(1)),
            due: None,
        }
    }

    /// How long a tick asked for at `now` waits.
    fn wait(&self, now: Instant) -> Duration {
        self.due.map_or(Duration::ZERO, |due| {
            due.saturating_duration_since(now)
                .saturating_sub(self.slack)
        })
    }

    /// A tick that started at `at` cut a batch.
    fn cut(&mut self, at: Instant) {
        let from = self.due.map_or(at, |due| due.max(at));
        self.due = Some(from + self.interval);
    }
}

/// Resolves when another node's doorbell rings (true) or the LISTEN connection is lost (false);
/// pends forever without a connection. This node's own rings are ignored: it has read already.
async fn doorbell(listener: &mut Option<PgListener>, own: &str) -> bool {
    let Some(l) = listener else {
        return std::future::pending().await;
    };
    loop {
        match l.try_recv().await {
            Ok(Some(first)) => {
                // One wake-up for everything already buffered.
                let mut foreign = first.payload() != own;
                while let Some(next) = l.next_buffered() {
                    foreign |= next.payload() != own;
                }
                if foreign {
                    return true;
                }
            }
            Ok(None) | Err(_) => return false,
        }
    }
}

async fn connect_listener(pool: &PgPool) -> Option<PgListener> {
    let mut listener = match PgListener::connect_with(pool).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot open the doorbell LISTEN connection; polling only");
            return None;
        }
    };
    match listener.listen(DOORBELL_CHANNEL).await {
        Ok(()) => Some(listener),
        Err(e) => {
            tracing::warn!(error = %e, "LISTEN failed; polling only");
            None
        }
    }
}

fn observe_lag(changes: &[Change]) {
    let now = chrono::Utc::now();
    let lag = metrics::histogram!("vibe_feed_lag_seconds");
    for change in changes {
        let micros = (now - change.logged_at).num_microseconds().unwrap_or(0);
        lag.record(micros.max(0) as f64 / 1e6);
    }
    metrics::counter!("vibe_feed_changes_total").increment(changes.len() as u64);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_millis(5);
    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_first_tick_does_not_wait() {
        assert_eq!(TickPacer::new(MIN, 4).wait(Instant::now()), Duration::ZERO);
    }

    #[test]
    fn without_a_burst_ticks_that_cut_batches_are_spaced_by_the_minimum() {
        let at = Instant::now();
        let mut pacer = TickPacer::new(MIN, 1);
        pacer.cut(at);
        assert_eq!(pacer.wait(at + 2 * MS), 3 * MS);
        assert_eq!(pacer.wait(at), MIN);
        assert_eq!(pacer.wait(at + MIN), Duration::ZERO);
        assert_eq!(pacer.wait(at + Duration::from_secs(1)), Duration::ZERO);
    }

    #[test]
    fn a_burst_goes_at_once_then_the_sustained_rate_holds() {
        let at = Instant::now();
        let mut pacer = TickPacer::new(MIN, 3);
        // Three back to back, then the fourth waits for the first's slot to come round.
        for _ in 0..3 {
            assert_eq!(pacer.wait(at), Duration::ZERO);
            pacer.cut(at);
        }
        assert_eq!(pacer.wait(at), MIN);
        assert_eq!(pacer.wait(at + 2 * MS), 3 * MS);
        // Driven as fast as it allows, it settles at one per interval.
        let mut now = at;
        for _ in 0..100 {
            now += pacer.wait(now);
            pacer.cut(now);
        }
        assert_eq!(now - at, 100 * MIN);
    }

    #[test]
    fn a_light_load_below_the_rate_never_waits() {
        let at = Instant::now();
        let mut pacer = TickPacer::new(MIN, 4);
        // 100 writes/s with jitter: pairs 2 ms apart, pairs 10 ms apart (well under 200/s).
        let mut now = at;
        for i in 0..200 {
            assert_eq!(pacer.wait(now), Duration::ZERO, "tick {i}");
            pacer.cut(now);
            now += if i % 2 == 0 { 2 * MS } else { 18 * MS };
        }
    }

    #[test]
    fn an_idle_spell_refills_the_burst_but_saves_no_more() {
        let at = Instant::now();
        let mut pacer = TickPacer::new(MIN, 2);
        pacer.cut(at);
        let later = at + Duration::from_secs(10);
        for _ in 0..2 {
            assert_eq!(pacer.wait(later), Duration::ZERO);
            pacer.cut(later);
        }
        assert_eq!(pacer.wait(later), MIN);
    }
}
