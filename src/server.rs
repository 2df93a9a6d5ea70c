//! Starting and stopping a node: database (configured or embedded), migrations, keys, HTTP.

use std::net::SocketAddr;
use std::sync::Arc;

use sqlx::postgres::PgConnectOptions;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::app::App;
use crate::auth::{AuthError, TokenAuthority};
use crate::config::Config;
use crate::embedded_db::{EmbeddedDbError, EmbeddedPostgres};
use crate::store::{Store, StoreError};

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
}

/// The database a node uses: the configured URL, or the embedded cluster it owns.
#[derive(Debug)]
pub struct Database {
    pub store: Store,
    pub embedded: Option<EmbeddedPostgres>,
}

impl Database {
    /// Connects to `database_url`, or starts the embedded PostgreSQL when it is empty.
    pub async fn open(config: &Config) -> Result<Self, ServerError> {
        let (options, embedded) = if config.database_url.is_empty() {
            let db = EmbeddedPostgres::start(&config.data_dir).await?;
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
        self.store.pool().close().await;
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
    embedded: Option<EmbeddedPostgres>,
}

impl RunningServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Resolves when the accept loop has ended (after [`RunningServer::shutdown`] began).
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.serving).await;
        self.app.store.pool().close().await;
        if let Some(db) = self.embedded.take() {
            db.stop().await?;
        }
        Ok(())
    }
}

/// Starts a node from `config`: data dir, database, migrations, keys, then the listener.
pub async fn start(config: Config) -> Result<RunningServer, ServerError> {
    prepare_data_dir(&config)?;
    let db = Database::open(&config).await?;
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
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: config.listen,
        source,
    })?;
    let grace = config.http.shutdown_grace;
    let app = Arc::new(App::new(config, store, tokens, crate::telemetry::metrics()));
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = tokio::spawn(crate::http::serve(
        listener,
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
        embedded: None,
    })
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
