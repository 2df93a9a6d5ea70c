//! Starting and stopping a node: database (configured or embedded), migrations, keys, HTTP.

use std::net::SocketAddr;
use std::sync::Arc;

use ractor::{Actor, ActorRef};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use vibe_actors::call::actor::{Calls, CallsMsg, RoomAccess};
use vibe_actors::change::Cursor;
use vibe_actors::live_query::BoxFuture;
use vibe_actors::realtime::{InFlight, Realtime, RealtimeConfig, RealtimeMsg};

use crate::app::{App, AppParts};
use crate::auth::{AuthError, TokenAuthority};
use crate::config::Config;
use crate::embedded_db::{EmbeddedDbError, EmbeddedPostgres};
use crate::feed::listener::{ChangeSink, FeedListener, ListenerSettings};
use crate::feed::{Feed, FeedError};
use crate::store::{Batching, QueryPool, Store, StoreError};
use crate::ws::connection::CALL_TYPE;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    EmbeddedDb(#[from] EmbeddedDbError),
    #[error("invalid database_url: {0}")]
    DatabaseUrl(sqlx::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Keys(#[from] AuthError),
    #[error(transparent)]
    Feed(#[from] FeedError),
    #[error(transparent)]
    Secrets(#[from] crate::identity::secrets::SecretsError),
    #[error("cannot load the ID token signing keys: {0}")]
    Signing(#[from] crate::identity::signing::SigningError),
    #[error("cannot set up accounts: {0}")]
    Accounts(#[from] crate::identity::accounts::AccountError),
    #[error("cannot read the token revocation list: {0}")]
    Revocations(sqlx::Error),
    #[error("cannot start the realtime actors: {0}")]
    Actors(String),
    #[error("cannot prepare data_dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "this node's {file} is not the one this database's cluster was started with: copy \
         keys/root.key and keys/secrets.key from a node of the cluster into {data_dir}/keys \
         (with other keys its tokens would not verify on the others, nor its sealed secrets \
         open there). To replace the cluster's keys on purpose, stop every node, give each the \
         new keys and run `DELETE FROM cluster_keys` in the database: what the old secrets key \
         sealed (accounts' keys, ID-token signing keys) no longer opens"
    )]
    KeysDiffer {
        file: &'static str,
        data_dir: String,
    },
    #[error(
        "cannot compare this node's keys with the cluster's: {0} (with \
         database.migrate_on_start = false, run `vibe migrate` first)"
    )]
    ClusterKeys(sqlx::Error),
}

/// The database a node uses: the configured URL, or the embedded cluster it owns.
#[derive(Debug)]
pub struct Database {
    pub store: Store,
    pub embedded: Option<EmbeddedPostgres>,
}

impl Database {
    /// Connects to `database_url`, or starts the embedded PostgreSQL when it is empty. A
    /// `guest` (a one-off command) may use an embedded cluster another process owns.
    pub async fn open(config: &Config, guest: bool) -> Result<Self, ServerError> {
        let (options, embedded) = if config.database_url.is_empty() {
            let db = EmbeddedPostgres::start(&config.data_dir, guest).await?;
            (db.connect_options(), Some(db))
        } else {
            let options: PgConnectOptions = config
                .database_url
                .parse()
                .map_err(ServerError::DatabaseUrl)?;
            (options, None)
        };
        let store = Store::connect(
            options.application_name("vibe"),
            config.database.max_connections,
            config.database.acquire_timeout,
            Batching {
                max_rows: config.database.create_batch_rows,
                slots: config
                    .database
                    .create_writers
                    .here(config.database.max_connections),
            },
            Batching {
                max_rows: config.database.read_batch_rows,
                slots: config
                    .database
                    .readers
                    .here(config.database.max_connections),
            },
            QueryPool {
                connections: config.query.connections,
                statement_timeout: config.query.statement_timeout,
            },
        )
        .await;
        match store {
            Ok(store) => Ok(Self { store, embedded }),
            Err(e) => {
                if let Some(db) = embedded {
                    let _ = db.stop().await;
                }
                Err(e.into())
            }
        }
    }

    /// Closes the pool, then stops the embedded cluster if there is one.
    pub async fn close(self) -> Result<(), ServerError> {
        self.store.close().await;
        if let Some(db) = self.embedded {
            db.stop().await?;
        }
        Ok(())
    }
}

/// A node serving HTTP. Dropping it without [`RunningServer::shutdown`] leaves the embedded
/// database running until the next start adopts it.
#[derive(Debug)]
pub struct RunningServer {
    local_addr: SocketAddr,
    app: Arc<App>,
    stop: Option<oneshot::Sender<()>>,
    serving: JoinHandle<()>,
    /// Tells what holds a client waiting (WebSockets, long-polls) that the node is stopping:
    /// sent first, so they answer at once instead of running out the grace period.
    draining: watch::Sender<bool>,
    /// Tells background tasks (the feed reader, pruning, governance) to stop: sent once no
    /// request is left that may need them.
    shutting_down: watch::Sender<bool>,
    background: Vec<JoinHandle<()>>,
    realtime: JoinHandle<()>,
    calls: JoinHandle<()>,
    embedded: Option<EmbeddedPostgres>,
}

impl RunningServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Stops the node in order: see [`RunningServer::shutdown_unless`], never hurried.
    pub async fn shutdown(self) -> Result<(), ServerError> {
        self.shutdown_unless(std::future::pending())
            .await
            .map(|_| ())
    }

    /// Stops the node in order — waiting clients told first, in-flight requests and WebSockets
    /// given `http.shutdown_grace`, then background work, the pool and the embedded database —
    /// unless `hurry` resolves first (an operator's second Ctrl-C): then what is still running
    /// is aborted and the embedded database stopped at once, so no exit path leaves it running.
    pub async fn shutdown_unless(
        mut self,
        hurry: impl std::future::Future<Output = ()>,
    ) -> Result<Shutdown, ServerError> {
        let orderly = async {
            // WebSockets close with 1001 and long-polls answer with what they have while the
            // listener stops and in-flight requests finish: nothing waits for the grace period
            // to run out, and the client of a long-poll gets its cursor rather than a reset.
            let _ = self.draining.send(true);
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            let _ = (&mut self.serving).await;
            // WebSockets answer the signal with a 1001 close; give them the grace period.
            let grace = self.app.config.http.shutdown_grace;
            if tokio::time::timeout(grace, self.app.sockets_closed())
                .await
                .is_err()
            {
                tracing::warn!(?grace, "WebSockets still open after the grace period");
            }
            let _ = self.shutting_down.send(true);
            // Awaited in place, not drained: a hurry meanwhile must still find them to abort.
            for task in &mut self.background {
                let _ = task.await;
            }
            self.app.realtime.stop(None);
            let _ = (&mut self.realtime).await;
            self.app.calls.stop(None);
            let _ = (&mut self.calls).await;
            self.app.store.close().await;
        };
        let hurried = tokio::select! {
            () = orderly => false,
            () = hurry => true,
        };
        if hurried {
            tracing::warn!("stopping now: in-flight requests and background work are cut off");
            self.serving.abort();
            for task in self.background.drain(..) {
                task.abort();
            }
            self.app.realtime.stop(None);
            self.app.calls.stop(None);
        }
        if let Some(db) = self.embedded.take() {
            db.stop().await?;
        }
        Ok(if hurried {
            Shutdown::CutShort
        } else {
            Shutdown::Orderly
        })
    }
}

/// How a node stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Everything in flight finished (or its grace period ran out).
    Orderly,
    /// Cut short: what still ran was aborted.
    CutShort,
}

/// Starts a node from `config`: data dir, database, migrations, keys, then the listener.
pub async fn start(config: Config) -> Result<RunningServer, ServerError> {
    prepare_data_dir(&config)?;
    let db = Database::open(&config, false).await?;
    match start_with(config, db.store.clone()).await {
        Ok(mut server) => {
            server.embedded = db.embedded;
            Ok(server)
        }
        Err(e) => {
            let _ = db.close().await;
            Err(e)
        }
    }
}

async fn start_with(config: Config, store: Store) -> Result<RunningServer, ServerError> {
    if config.database.migrate_on_start {
        store.migrate().await?;
    }
    let tokens = TokenAuthority::load_or_create(&config.data_dir)?;
    let secrets = Arc::new(crate::identity::secrets::SecretBox::load_or_create(
        &config.data_dir,
    )?);
    check_cluster_keys(&config, &store, &tokens, &secrets).await?;
    // Bind before starting anything that would have to be stopped again if binding fails.
    let tcp = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
    let local_addr = tcp.local_addr().map_err(|source| ServerError::Bind {
        addr: config.listen,
        source,
    })?;
    let identity = open_identity(&config, &store, local_addr, secrets).await?;
    tokens
        .revocations()
        .sync(store.pool())
        .await
        .map_err(ServerError::Revocations)?;
    let feed = Feed::new(store.pool().clone()).with_page_bytes(config.http.max_page_bytes);
    if feed.recover_from_xid_reset().await? {
        tracing::error!(
            "the database's transaction ids went backwards since the change feed's last tick \
             (restored into a new cluster?): the feed's history was dropped; clients resume \
             from a fresh snapshot"
        );
    }
    let position = feed.head().await?;
    let (head_tx, feed_head) = watch::channel(position);
    let (shutting_down, shutdown) = watch::channel(false);
    let (draining, draining_signal) = watch::channel(false);
    let realtime_config = RealtimeConfig {
        source: Arc::new(crate::feed::LiveSnapshots {
            store: store.clone(),
            feed: feed.clone(),
        }),
        replay: vibe_actors::live_query::ReplayLimit {
            events: config.ws.replay_buffer,
            bytes: config.ws.replay_buffer_bytes,
        },
        window_bytes: config.query.max_window_bytes,
        linger: config.ws.linger,
        max_live_queries: config.query.max_live_queries,
        live_queries: Arc::default(),
        max_live_bytes: config.query.max_live_bytes,
        live_bytes: Arc::default(),
    };
    let book = store.certificate_book().await?;
    let (realtime, realtime_task) = Actor::spawn(None, Realtime, (realtime_config, position, book))
        .await
        .map_err(|e| ServerError::Actors(e.to_string()))?;
    let room_access: Arc<dyn RoomAccess> = Arc::new(StoreRoomAccess {
        store: store.clone(),
    });
    let (calls, calls_task) =
        Actor::spawn(None, Calls, (config.calls.to_actor_config(), room_access))
            .await
            .map_err(|e| ServerError::Actors(e.to_string()))?;
    // The LISTEN connection lives in its own pool, apart from request traffic, and under its
    // own name in `pg_stat_activity`.
    let listen_pool = PgPoolOptions::new().max_connections(1).connect_lazy_with(
        (*store.pool().connect_options())
            .clone()
            .application_name("vibe-feed"),
    );
    let listener = FeedListener {
        feed: feed.clone(),
        listen_pool,
        waker: store.waker().clone(),
        settings: ListenerSettings {
            poll_interval: config.feed.poll_interval,
            min_tick_interval: config.feed.min_tick_interval,
            tick_burst: config.feed.tick_burst,
        },
        position,
        head: head_tx,
    };
    let background = vec![
        tokio::spawn(listener.run(
            RealtimeSink {
                realtime: realtime.clone(),
                store: store.clone(),
                calls: calls.clone(),
                in_flight: Arc::new(tokio::sync::Semaphore::new(config.feed.max_pages_in_flight)),
            },
            stopped(shutdown.clone()),
        )),
        tokio::spawn(prune(
            feed.clone(),
            config.feed.retention,
            config.feed.prune_interval,
            stopped(shutdown.clone()),
        )),
    ];
    let governance = Arc::new(crate::governance::Governance::new(
        store.clone(),
        config.indexes.clone(),
    ));
    let mut background = background;
    background.push(tokio::spawn(
        governance.clone().run(stopped(shutdown.clone())),
    ));
    background.push(tokio::spawn(tokens.revocations().clone().run(
        store.pool().clone(),
        config.identity.revocation_poll_interval,
        stopped(shutdown.clone()),
    )));
    let keys_stop = stopped(shutdown.clone());
    let keys_reload = config.identity.signing_key_reload_interval;
    let grace = config.http.shutdown_grace;
    let app = Arc::new(App::new(
        config,
        AppParts {
            store,
            feed,
            tokens,
            identity,
            metrics: crate::telemetry::metrics(),
            governance,
            realtime,
            calls,
            feed_head,
            draining: draining_signal,
        },
    ));
    background.push(tokio::spawn({
        let app = app.clone();
        async move { app.identity.signing.run(keys_reload, keys_stop).await }
    }));
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = tokio::spawn(crate::http::serve(
        tcp,
        app.clone(),
        async move {
            let _ = stopped.await;
        },
        grace,
    ));
    tracing::info!(addr = %local_addr, "vibe listening on http://{local_addr}");
    Ok(RunningServer {
        local_addr,
        app,
        stop: Some(stop),
        serving,
        draining,
        shutting_down,
        background,
        realtime: realtime_task,
        calls: calls_task,
        embedded: None,
    })
}

/// Every node of a cluster must hold the same token root key and secrets key. The first node to
/// start on a database records their fingerprints; a node with other keys is refused here, before
/// it serves anything, instead of splitting the cluster (its tokens refused by the others, the
/// secrets it seals unreadable there, theirs unreadable here).
async fn check_cluster_keys(
    config: &Config,
    store: &Store,
    tokens: &TokenAuthority,
    secrets: &crate::identity::secrets::SecretBox,
) -> Result<(), ServerError> {
    use sha2::Digest as _;
    let root = hex::encode(sha2::Sha256::digest(tokens.public_key().to_bytes()));
    // Both recorded in one transaction: a first node that dies between them leaves neither.
    let mut tx = store
        .pool()
        .begin()
        .await
        .map_err(ServerError::ClusterKeys)?;
    for (name, file, fingerprint) in [
        ("root", "keys/root.key", root.as_str()),
        ("secrets", "keys/secrets.key", secrets.fingerprint()),
    ] {
        // The recorded fingerprint: this one if none was (the update only makes RETURNING
        // answer for a row that exists).
        let recorded: String = sqlx::query_scalar(
            "INSERT INTO cluster_keys (name, fingerprint) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING fingerprint",
        )
        .bind(name)
        .bind(fingerprint)
        .fetch_one(&mut *tx)
        .await
        .map_err(ServerError::ClusterKeys)?;
        if recorded != fingerprint {
            return Err(ServerError::KeysDiffer {
                file,
                data_dir: config.data_dir.display().to_string(),
            });
        }
    }
    tx.commit().await.map_err(ServerError::ClusterKeys)
}

/// Accounts, the provider's state and its signing keys (created on first start).
async fn open_identity(
    config: &Config,
    store: &Store,
    local_addr: SocketAddr,
    secrets: Arc<crate::identity::secrets::SecretBox>,
) -> Result<crate::identity::Identity, ServerError> {
    use crate::identity::{Accounts, Identity, OAuthStore, SigningKeys, accounts, oauth};
    let id = &config.identity;
    let issuer = if id.issuer.is_empty() {
        if local_addr.ip().is_unspecified() {
            // No client reaches 0.0.0.0: discovery would send every relying party nowhere.
            tracing::warn!(
                %local_addr,
                "identity.issuer is empty and the listener is on every address: OpenID discovery \
                 names http://{local_addr}; set identity.issuer to the URL clients reach"
            );
        }
        format!("http://{local_addr}")
    } else {
        id.issuer.clone()
    };
    // A rate of zero would refuse everything: it means one.
    let at_least_one = |n: u32| std::num::NonZeroU32::new(n).unwrap_or(std::num::NonZeroU32::MIN);
    let accounts = Accounts::new(
        store.pool().clone(),
        secrets.clone(),
        accounts::HashCost {
            memory_kib: id.argon2_memory_kib,
            iterations: id.argon2_iterations,
        },
        accounts::LoginRates {
            per_handle: at_least_one(id.login_attempts_per_minute),
            per_address: at_least_one(id.login_attempts_per_minute_per_address),
        },
    )?;
    let oauth = OAuthStore::new(
        store.pool().clone(),
        oauth::Lifetimes {
            code: id.code_ttl,
            interaction: id.interaction_ttl,
            session: id.session_ttl,
            refresh_token: id.refresh_token_ttl,
            refresh_token_absolute: id.refresh_token_absolute_ttl,
            access_token: id.access_token_ttl,
        },
    );
    let signing = SigningKeys::load(
        store.pool().clone(),
        secrets.clone(),
        id.signing_key_overlap,
    )
    .await?;
    Ok(Identity {
        issuer,
        accounts,
        oauth,
        signing,
        secrets,
        registrations: governor::RateLimiter::keyed(governor::Quota::per_hour(at_least_one(
            id.registrations_per_hour_per_address,
        ))),
    })
}

/// Delivers the feed reader's pages to the realtime tree, holding back when too many pages are
/// still being handled by live queries.
struct RealtimeSink {
    realtime: ActorRef<RealtimeMsg>,
    /// Reads the certificate book again on a resync.
    store: Store,
    /// Told of changes to `call` documents: members who lost access leave the room.
    calls: ActorRef<CallsMsg>,
    in_flight: Arc<tokio::sync::Semaphore>,
}

/// A call member's access, asked again when its room's document changes: a read of the document
/// under the member's identity (the same check `call.join` makes).
#[derive(Debug)]
struct StoreRoomAccess {
    store: Store,
}

impl RoomAccess for StoreRoomAccess {
    fn may_join(&self, did: String, room: String) -> BoxFuture<bool> {
        let store = self.store.clone();
        Box::pin(async move {
            let Ok(id) = room.parse() else {
                return false;
            };
            match store.get(&did, CALL_TYPE, id).await {
                Ok(_) => true,
                Err(StoreError::NotFound | StoreError::Forbidden) => false,
                Err(e) => {
                    // A database outage is not a withdrawal: keep the member.
                    tracing::warn!(error = %e, %room, "cannot re-check a call member's access");
                    true
                }
            }
        })
    }
}

impl ChangeSink for RealtimeSink {
    type ResyncError = StoreError;

    async fn resync(&mut self, position: Cursor) -> Result<(), StoreError> {
        // Read after the new position was: certificate changes past it come again from the
        // feed, and applying one twice leaves the book as once. Without it (the read failed)
        // the book would miss the issues and revocations in the skipped range for good: the
        // listener retries, and publishes nothing past `position` until this succeeds.
        let book = self.store.certificate_book().await?;
        let _ = self.realtime.cast(RealtimeMsg::Resync { position, book });
        Ok(())
    }

    async fn publish(&mut self, changes: Vec<vibe_actors::change::Change>, position: Cursor) {
        for change in changes.iter().filter(|c| c.doc_type == CALL_TYPE) {
            let _ = self.calls.cast(CallsMsg::DocumentChanged {
                room: change.doc_id.to_string(),
                deleted: change.op == vibe_actors::change::Op::Delete,
            });
        }
        // The semaphore is never closed, so acquiring only waits.
        let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
            return;
        };
        let in_flight = InFlight::new(permit);
        if let Err(e) = ractor::call!(
            self.realtime,
            RealtimeMsg::Changes,
            changes,
            position,
            in_flight
        ) {
            tracing::error!(error = %e, "realtime tree unreachable; changes not delivered live");
        }
    }
}

/// Resolves when `signal` turns true (or its sender is gone).
async fn stopped(mut signal: watch::Receiver<bool>) {
    let _ = signal.wait_for(|stop| *stop).await;
}

/// Deletes changes past retention now and then, and reports the oldest open writer
/// transaction (it widens every batch's scan; see ARCHITECTURE.md).
async fn prune(
    feed: Feed,
    retention: std::time::Duration,
    every: std::time::Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut prune_timer = tokio::time::interval(every);
    let mut report_timer = tokio::time::interval(std::time::Duration::from_secs(10));
    let mut xmin = crate::feed::XminWatch::default();
    loop {
        tokio::select! {
            _ = prune_timer.tick() => match feed.prune(retention).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(deleted = n, "pruned the change log"),
                Err(e) => tracing::warn!(error = %e, "pruning the change log failed"),
            },
            _ = report_timer.tick() => match feed.oldest_xact_age(&mut xmin).await {
                Ok(age) => {
                    metrics::gauge!("vibe_feed_oldest_xact_age_seconds").set(age);
                    if age > 60.0 {
                        tracing::warn!(age_seconds = age, "a long-running writer transaction is widening every change-feed read");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot read transaction ages"),
            },
            () = &mut stop => return,
        }
    }
}

/// Creates the data dir with mode 0711: other users may pass through (the embedded PostgreSQL
/// runs as `postgres` and needs to reach its folder) but not list it; `keys/` inside is 0700.
pub fn prepare_data_dir(config: &Config) -> Result<(), ServerError> {
    use std::os::unix::fs::DirBuilderExt;
    let path = &config.data_dir;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(path)
        .map_err(|source| ServerError::DataDir {
            path: path.display().to_string(),
            source,
        })
}
