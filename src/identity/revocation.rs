//! Tokens refused although their signature is good: revoked grants (a whole token family: a
//! consent withdrawn, a refresh token replayed, a revoked refresh token) and single access tokens
//! (with every attenuation made of them).
//!
//! The list lives in `token_revocations`; each node keeps it in memory and reads the rows after
//! the last `seq` it saw: at once after its own revocations, and on a short poll for other
//! nodes'. Every token check consults the memory copy only (no database round trip per request).
//! Live connections watch [`Revocations::changed`] and re-check their token when it moves.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{Mutex, watch};
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

/// This node's copy of the revocation list.
#[derive(Debug)]
pub struct Revocations {
    lists: RwLock<Lists>,
    /// The highest `seq` read; the mutex also keeps two reads from racing.
    seen: Mutex<i64>,
    /// Bumped whenever the lists grow.
    generation: watch::Sender<u64>,
}

impl Default for Revocations {
    fn default() -> Self {
        Self {
            lists: RwLock::default(),
            seen: Mutex::new(0),
            generation: watch::Sender::new(0),
        }
    }
}

impl Revocations {
    /// Is a token of `grant` with authority revocation id `token_id` revoked?
    pub fn is_revoked(&self, grant: Option<Uuid>, token_id: &str) -> bool {
        // A poisoned lock means a panic while inserting into a set: the sets are still sound.
        let lists = self
            .lists
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        grant.is_some_and(|g| lists.grants.contains_key(&g)) || lists.tokens.contains_key(token_id)
    }

    /// Moves (to a new generation) whenever something is revoked on any node.
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
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
        {
            let mut lists = self
                .lists
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (_, name, expires_at) in &rows {
                match Revoked::decode(name) {
                    Some(Revoked::Grant(id)) => {
                        lists.grants.insert(id, *expires_at);
                    }
                    Some(Revoked::Token(id)) => {
                        lists.tokens.insert(id, *expires_at);
                    }
                    None => tracing::warn!(%name, "unreadable token revocation row"),
                }
            }
        }
        *seen = last;
        self.generation.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Applies a revocation to this copy only, without the database (unit tests of the token
    /// checks).
    #[cfg(test)]
    pub(crate) fn apply_locally(&self, revoked: Revoked) {
        let mut lists = self
            .lists
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let forever = chrono::DateTime::<chrono::Utc>::MAX_UTC;
        match revoked {
            Revoked::Grant(id) => lists.grants.insert(id, forever),
            Revoked::Token(id) => lists.tokens.insert(id, forever),
        };
    }

    /// Drops the entries past their expiry: the tokens they concern no longer verify.
    fn forget_expired(&self, now: chrono::DateTime<chrono::Utc>) {
        self.lists
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
            if let Err(e) = self.sync(&pool).await {
                tracing::warn!(error = %e, "reading token revocations failed; retrying");
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
}
