//! Tokens refused although their signature is good: revoked grants (a whole token family: a
//! consent withdrawn, a refresh token replayed, a revoked refresh token) and single access tokens
//! (with every attenuation made of them).
//!
//! The list lives in `token_revocations`; each node keeps it in memory and reads the rows after
//! the last `seq` it saw: at once after its own revocations, and on a short poll for other
//! nodes'. Every token check consults the memory copy only (no database round trip per request).
//! A live connection holds a [`RevocationWatch`] for its token and is woken only by a revocation
//! that names the token's grant or the token itself — not by every revocation on the node (each
//! one would otherwise wake every connection: a revocation a user can cause, say by logging out,
//! would cost the whole node's connections a wake-up and a token check). The watch wakes through
//! a [`Waker`] the connection hands over (its outbox's alarm), so it costs the connection a map
//! entry and nothing it must poll.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, PoisonError, RwLock};
use std::task::Waker;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Mutex;
use uuid::Uuid;

/// Serialises revocation writers across nodes ("vibervk").
const REVOCATION_LOCK: i64 = 0x7669_6265_7276_6b00;

/// How a revocation row names what it revokes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    /// Every token issued from one authorization (`grant:<uuid>`).
    Grant(Uuid),
    /// One access token and its attenuations (`token:<hex revocation id>`).
    Token(String),
}

impl Revoked {
    fn encode(&self) -> String {
        match self {
            Revoked::Grant(id) => format!("grant:{id}"),
            Revoked::Token(id) => format!("token:{id}"),
        }
    }

    fn decode(s: &str) -> Option<Self> {
        if let Some(id) = s.strip_prefix("grant:") {
            return id.parse().ok().map(Revoked::Grant);
        }
        s.strip_prefix("token:")
            .map(|id| Revoked::Token(id.to_owned()))
    }
}

/// What is revoked, each with the time after which no token it concerns verifies anyway (and
/// the entry can go).
#[derive(Debug, Default)]
struct Lists {
    grants: HashMap<Uuid, chrono::DateTime<chrono::Utc>>,
    tokens: HashMap<String, chrono::DateTime<chrono::Utc>>,
}

impl Lists {
    fn forget_expired(&mut self, now: chrono::DateTime<chrono::Utc>) {
        self.grants.retain(|_, expires_at| *expires_at > now);
        self.tokens.retain(|_, expires_at| *expires_at > now);
    }
}

/// What a watch waits on: a grant, or a token by a hash of its revocation id (a 128-character
/// signature in hex; a collision only costs a needless re-check).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum WatchKey {
    Grant(Uuid),
    Token(u64),
}

/// The live connections' watches, by what would revoke their token.
#[derive(Debug, Default)]
struct Watchers {
    next_id: u64,
    by_key: HashMap<WatchKey, HashMap<u64, Waker>>,
}

/// This node's copy of the revocation list.
#[derive(Debug)]
pub struct Revocations {
    lists: RwLock<Lists>,
    /// The highest `seq` read; the mutex also keeps two reads from racing.
    seen: Mutex<i64>,
    watchers: std::sync::Mutex<Watchers>,
    /// Keys the token hashes of [`WatchKey::Token`] (random per process).
    token_hasher: RandomState,
}

impl Default for Revocations {
    fn default() -> Self {
        Self {
            lists: RwLock::default(),
            seen: Mutex::new(0),
            watchers: std::sync::Mutex::default(),
            token_hasher: RandomState::new(),
        }
    }
}

/// A live connection's watch on its token: its waker is woken when a revocation names the
/// token's grant or the token (the holder then checks the token again). Unregisters on drop.
#[derive(Debug)]
pub struct RevocationWatch {
    revocations: Arc<Revocations>,
    id: u64,
    /// The hash of the token's revocation id.
    token: u64,
    grant: Option<Uuid>,
}

impl RevocationWatch {
    fn keys(&self) -> impl Iterator<Item = WatchKey> + use<> {
        std::iter::once(WatchKey::Token(self.token)).chain(self.grant.map(WatchKey::Grant))
    }
}

impl Drop for RevocationWatch {
    fn drop(&mut self) {
        let mut watchers = self.revocations.lock_watchers();
        for key in self.keys() {
            if let Some(watches) = watchers.by_key.get_mut(&key) {
                watches.remove(&self.id);
                if watches.is_empty() {
                    watchers.by_key.remove(&key);
                }
            }
        }
    }
}

impl Revocations {
    /// Is a token of `grant` with authority revocation id `token_id` revoked?
    pub fn is_revoked(&self, grant: Option<Uuid>, token_id: &str) -> bool {
        // A poisoned lock means a panic while inserting into a set: the sets are still sound.
        let lists = self.lists.read().unwrap_or_else(PoisonError::into_inner);
        grant.is_some_and(|g| lists.grants.contains_key(&g)) || lists.tokens.contains_key(token_id)
    }

    /// A watch on the token of `grant` with authority revocation id `token_id` (see
    /// [`Revocations::is_revoked`]) that wakes `waker` when a revocation may concern it. Check
    /// the token once after creating it: a revocation applied in between wakes nobody.
    pub fn watch(
        self: &Arc<Self>,
        grant: Option<Uuid>,
        token_id: &str,
        waker: Waker,
    ) -> RevocationWatch {
        let mut watchers = self.lock_watchers();
        let id = watchers.next_id;
        watchers.next_id += 1;
        let watch = RevocationWatch {
            revocations: self.clone(),
            id,
            token: self.token_hasher.hash_one(token_id),
            grant,
        };
        for key in watch.keys() {
            watchers
                .by_key
                .entry(key)
                .or_default()
                .insert(id, waker.clone());
        }
        drop(watchers);
        watch
    }

    fn lock_watchers(&self) -> std::sync::MutexGuard<'_, Watchers> {
        // Inserts and removals of whole entries: a panic cannot leave the maps half-changed.
        self.watchers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds `revoked` to the lists and notifies the watches it concerns.
    fn apply(&self, revoked: &[(Revoked, chrono::DateTime<chrono::Utc>)]) {
        {
            let mut lists = self.lists.write().unwrap_or_else(PoisonError::into_inner);
            for (name, expires_at) in revoked {
                match name {
                    Revoked::Grant(id) => lists.grants.insert(*id, *expires_at),
                    Revoked::Token(id) => lists.tokens.insert(id.clone(), *expires_at),
                };
            }
        }
        let watchers = self.lock_watchers();
        for (name, _) in revoked {
            let key = match name {
                Revoked::Grant(id) => WatchKey::Grant(*id),
                Revoked::Token(id) => WatchKey::Token(self.token_hasher.hash_one(id)),
            };
            for waker in watchers
                .by_key
                .get(&key)
                .into_iter()
                .flat_map(HashMap::values)
            {
                waker.wake_by_ref();
            }
        }
    }

    /// Records revocations in the database (in `tx`'s transaction), valid until `expires_at`
    /// (after it no token they concern can verify anyway). Call [`Revocations::sync`] after the
    /// commit so this node applies them at once.
    pub async fn record(
        tx: &mut sqlx::PgConnection,
        revoked: &[Revoked],
        expires_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), sqlx::Error> {
        if revoked.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = revoked.iter().map(Revoked::encode).collect();
        // Held to the commit, so rows commit in `seq` order and a reader that has seen `seq` N
        // can never later find a committed row below N.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(REVOCATION_LOCK)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO token_revocations (revoked, expires_at) SELECT unnest($1::text[]), $2",
        )
        .bind(&names)
        .bind(expires_at)
        .execute(tx)
        .await?;
        Ok(())
    }

    /// Reads the rows this node has not seen yet.
    pub async fn sync(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let mut seen = self.seen.lock().await;
        let rows: Vec<(i64, String, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
            "SELECT seq, revoked, expires_at FROM token_revocations \
             WHERE seq > $1 AND expires_at > now() ORDER BY seq",
        )
        .bind(*seen)
        .fetch_all(pool)
        .await?;
        let Some(&(last, _, _)) = rows.last() else {
            return Ok(());
        };
        let revoked: Vec<_> = rows
            .into_iter()
            .filter_map(|(_, name, expires_at)| {
                let decoded = Revoked::decode(&name);
                if decoded.is_none() {
                    tracing::warn!(%name, "unreadable token revocation row");
                }
                decoded.map(|revoked| (revoked, expires_at))
            })
            .collect();
        self.apply(&revoked);
        *seen = last;
        Ok(())
    }

    /// Applies a revocation to this copy only, without the database (unit tests of the token
    /// checks).
    #[cfg(test)]
    pub(crate) fn apply_locally(&self, revoked: Revoked) {
        self.apply(&[(revoked, chrono::DateTime::<chrono::Utc>::MAX_UTC)]);
    }

    /// Drops the entries past their expiry: the tokens they concern no longer verify.
    fn forget_expired(&self, now: chrono::DateTime<chrono::Utc>) {
        self.lists
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .forget_expired(now);
    }

    /// Polls for other nodes' revocations and prunes expired rows until `stop` resolves.
    pub async fn run(
        self: std::sync::Arc<Self>,
        pool: PgPool,
        interval: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut turns: u64 = 0;
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = ticker.tick() => {}
            }
            // A node that cannot read the list keeps accepting tokens revoked elsewhere (failing
            // closed would turn a database hiccup into an outage): the metrics let an operator
            // alert on `time() - vibe_revocations_synced_timestamp_seconds`.
            match self.sync(&pool).await {
                Ok(()) => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default();
                    metrics::gauge!("vibe_revocations_synced_timestamp_seconds")
                        .set(now.as_secs_f64());
                }
                Err(e) => {
                    metrics::counter!("vibe_revocations_sync_failures_total").increment(1);
                    tracing::warn!(error = %e, "reading token revocations failed; retrying");
                }
            }
            turns += 1;
            // Entries past their expiry concern tokens that no longer verify: dropped from
            // memory and from the table, so neither grows with every revocation ever made.
            if turns.is_multiple_of(600) {
                self.forget_expired(chrono::Utc::now());
                if let Err(e) =
                    sqlx::query("DELETE FROM token_revocations WHERE expires_at < now()")
                        .execute(&pool)
                        .await
                {
                    tracing::warn!(error = %e, "pruning token revocations failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let g = Revoked::Grant(Uuid::now_v7());
        assert_eq!(Revoked::decode(&g.encode()), Some(g));
        let t = Revoked::Token("ab12".into());
        assert_eq!(Revoked::decode(&t.encode()), Some(t));
        assert_eq!(Revoked::decode("grant:not-a-uuid"), None);
        assert_eq!(Revoked::decode("other:x"), None);
    }

    #[test]
    fn expired_entries_are_forgotten_and_live_ones_kept() {
        let now = chrono::Utc::now();
        let (old, live) = (Uuid::now_v7(), Uuid::now_v7());
        let revocations = Revocations::default();
        {
            let mut lists = revocations.lists.write().unwrap();
            lists.grants.insert(old, now - chrono::Duration::seconds(1));
            lists.grants.insert(live, now + chrono::Duration::hours(1));
            lists
                .tokens
                .insert("t-old".into(), now - chrono::Duration::seconds(1));
        }
        revocations.forget_expired(now);
        assert!(!revocations.is_revoked(Some(old), "t-old"));
        assert!(revocations.is_revoked(Some(live), "other"));
        let lists = revocations.lists.read().unwrap();
        assert_eq!((lists.grants.len(), lists.tokens.len()), (1, 0));
    }

    /// A waker that records that it was woken.
    #[derive(Default)]
    struct Flag(std::sync::atomic::AtomicBool);

    impl std::task::Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// A watch (held for its registration) with its flag.
    struct Watched {
        _watch: RevocationWatch,
        flag: Arc<Flag>,
    }

    fn watched(revocations: &Arc<Revocations>, grant: Option<Uuid>, token: &str) -> Watched {
        let flag = Arc::new(Flag::default());
        Watched {
            _watch: revocations.watch(grant, token, Waker::from(flag.clone())),
            flag,
        }
    }

    /// Whether the watch was woken since it was last asked.
    fn notified(watch: &Watched) -> bool {
        watch
            .flag
            .0
            .swap(false, std::sync::atomic::Ordering::SeqCst)
    }

    #[test]
    fn a_revocation_wakes_only_the_watches_it_concerns() {
        let revocations = Arc::new(Revocations::default());
        let (grant, other_grant) = (Uuid::now_v7(), Uuid::now_v7());
        let of_grant = watched(&revocations, Some(grant), "t-1");
        let of_other_grant = watched(&revocations, Some(other_grant), "t-2");
        let of_token = watched(&revocations, None, "t-3");
        let of_same_token = watched(&revocations, None, "t-3");

        revocations.apply_locally(Revoked::Grant(grant));
        assert_eq!(
            [&of_grant, &of_other_grant, &of_token, &of_same_token].map(notified),
            [true, false, false, false]
        );
        revocations.apply_locally(Revoked::Token("t-3".into()));
        assert_eq!(
            [&of_grant, &of_other_grant, &of_token, &of_same_token].map(notified),
            [false, false, true, true]
        );
        // A token's own revocation id reaches a watch that also has a grant.
        revocations.apply_locally(Revoked::Token("t-2".into()));
        assert_eq!([&of_grant, &of_other_grant].map(notified), [false, true]);
    }

    #[test]
    fn dropped_watches_leave_nothing_behind() {
        let revocations = Arc::new(Revocations::default());
        let grant = Uuid::now_v7();
        let watches: Vec<_> = (0..3)
            .map(|i| watched(&revocations, Some(grant), &format!("t-{i}")))
            .collect();
        assert_eq!(revocations.lock_watchers().by_key.len(), 4);
        drop(watches);
        assert!(revocations.lock_watchers().by_key.is_empty());
        // Revoking with nobody watching notifies nothing and still revokes.
        revocations.apply_locally(Revoked::Grant(grant));
        assert!(revocations.is_revoked(Some(grant), "t-0"));
    }
}
