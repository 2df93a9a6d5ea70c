//! The private PostgreSQL that `vibe serve` starts when no database URL is configured: found on
//! the system, initialised once into `<data dir>/postgres`, reachable only through a unix socket
//! inside that folder, and stopped when the server stops.
//!
//! PostgreSQL refuses to run as root, so as root the cluster is owned by and run as the `postgres`
//! user; the socket folder is mode 0700, so only that user and root can connect (trust auth).
//!
//! One process owns the cluster at a time: the one holding the lock on `<data dir>/postgres.lock`
//! (the `serve` that started it, or adopted one a crashed run left running). Another vibe process
//! on the same data dir (`vibe migrate` beside a running server) uses the cluster and leaves it
//! running. A cluster is initialised in a folder of its own and renamed into place only once its
//! settings are written, so an interrupted first run never leaves one on PostgreSQL's defaults.

use std::path::{Path, PathBuf};
use std::process::Output;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tokio::process::Command;

/// The database Vibe creates inside the private cluster.
pub const DATABASE_NAME: &str = "vibe";

/// Unix socket paths are limited to 107 bytes; the socket lives in the cluster folder.
const MAX_SOCKET_DIR_LEN: usize = 90;

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedDbError {
    #[error(
        "no database_url is configured and no PostgreSQL server binaries were found \
         (looked for pg_ctl and initdb on PATH and under /usr/lib/postgresql/*/bin). \
         Install them (Debian/Ubuntu: `apt-get install postgresql`) or set VIBE_DATABASE_URL"
    )]
    BinariesNotFound,
    #[error(
        "running as root, but there is no `postgres` user to run the embedded PostgreSQL as \
         (PostgreSQL refuses to run as root); create one or set VIBE_DATABASE_URL"
    )]
    NoPostgresUser,
    #[error(
        "the embedded PostgreSQL runs as user `postgres`, which cannot reach {0}; choose a \
         data_dir whose parent folders it may enter (e.g. under /var/lib) or set VIBE_DATABASE_URL"
    )]
    Unreachable(PathBuf),
    #[error("data_dir path {0} is too long for a unix socket; use a shorter data_dir")]
    PathTooLong(PathBuf),
    #[error(
        "another vibe process owns the embedded PostgreSQL in {0} and it is not running (yet); \
         try again once that process is up"
    )]
    OwnedElsewhere(PathBuf),
    #[error(
        "another vibe process holds the embedded PostgreSQL in {0}: run one server \
         per data dir (several nodes share a database through database_url, each with its own \
         data dir holding the cluster's keys)"
    )]
    ServedElsewhere(PathBuf),
    #[error("embedded PostgreSQL: {step} failed: {detail}")]
    Command { step: &'static str, detail: String },
    #[error("embedded PostgreSQL: {0}")]
    Io(#[from] std::io::Error),
    #[error("embedded PostgreSQL: {0}")]
    Sql(#[from] sqlx::Error),
}

/// A running private cluster. Call [`EmbeddedPostgres::stop`] to shut it down cleanly.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    bin_dir: PathBuf,
    cluster_dir: PathBuf,
    /// Set when running as root: the `postgres` user's ids.
    run_as: Option<(u32, u32)>,
    /// The locked `postgres.lock` while this process owns the cluster (None: another process
    /// does; this one leaves it running).
    owner: Option<std::fs::File>,
}

impl EmbeddedPostgres {
    /// Initialises the cluster on first use, starts it (or adopts one a crashed run left behind)
    /// and makes sure the `vibe` database exists. While another process owns the cluster, a
    /// `guest` (a one-off command: `vibe migrate`) uses it as it runs; anyone else is refused —
    /// a second server would lose its database when the owner stops.
    pub async fn start(data_dir: &Path, guest: bool) -> Result<Self, EmbeddedDbError> {
        std::fs::create_dir_all(data_dir)?;
        let data_dir = std::fs::canonicalize(data_dir)?;
        let cluster_dir = data_dir.join("postgres");
        if cluster_dir.as_os_str().len() > MAX_SOCKET_DIR_LEN {
            return Err(EmbeddedDbError::PathTooLong(cluster_dir));
        }
        // The binaries of the version that made the cluster, if it exists and they are here: a
        // newer major version cannot run its files.
        let made_by = std::fs::read_to_string(cluster_dir.join("PG_VERSION")).ok();
        let bin_dir = made_by
            .and_then(|v| bin_dir_of_version(v.trim()))
            .or_else(find_bin_dir)
            .ok_or(EmbeddedDbError::BinariesNotFound)?;
        let owner = take_ownership(&data_dir.join("postgres.lock"))?;
        let run_as = if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .ok_or(EmbeddedDbError::NoPostgresUser)?;
            Some((user.uid.as_raw(), user.gid.as_raw()))
        } else {
            None
        };
        let db = Self {
            bin_dir,
            cluster_dir,
            run_as,
            owner,
        };
        if db.owner.is_some() {
            db.init_if_needed().await?;
            if !db.is_running().await? {
                db.pg_ctl_start().await?;
            }
        } else if !guest {
            return Err(EmbeddedDbError::ServedElsewhere(data_dir));
        } else if !db.is_running().await? {
            return Err(EmbeddedDbError::OwnedElsewhere(db.cluster_dir));
        }
        db.ensure_database().await?;
        tracing::info!(cluster = %db.cluster_dir.display(), "embedded PostgreSQL is up");
        Ok(db)
    }

    /// Connection options for the `vibe` database over the private socket.
    pub fn connect_options(&self) -> PgConnectOptions {
        PgConnectOptions::new()
            .host(&self.cluster_dir.to_string_lossy())
            .username("postgres")
            .database(DATABASE_NAME)
    }

    /// A URL for the `vibe` database over the private socket.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@localhost/{DATABASE_NAME}?host={}",
            self.cluster_dir.display()
        )
    }

    /// Restarts the cluster (fast shutdown, then start): every session is cut, nothing
    /// committed is lost. For fault tests and operators.
    pub async fn restart(&self) -> Result<(), EmbeddedDbError> {
        let out = self
            .command("pg_ctl")
            .arg("restart")
            .arg("-D")
            .arg(&self.cluster_dir)
            .arg("-l")
            .arg(self.cluster_dir.join("server.log"))
            .args(["-m", "fast", "-w", "-t", "120"])
            .output()
            .await?;
        check("pg_ctl restart", out)
    }

    /// Stops the cluster (fast shutdown: open sessions are ended, committed data is flushed).
    pub async fn stop(self) -> Result<(), EmbeddedDbError> {
        if self.owner.is_none() {
            tracing::info!("embedded PostgreSQL left running for the vibe process that owns it");
            return Ok(());
        }
        let out = self
            .command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(&self.cluster_dir)
            .args(["-m", "fast", "-w", "-t", "60"])
            .output()
            .await?;
        check("pg_ctl stop", out)?;
        tracing::info!("embedded PostgreSQL stopped");
        Ok(())
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(program));
        cmd.current_dir("/").kill_on_drop(false);
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    async fn init_if_needed(&self) -> Result<(), EmbeddedDbError> {
        if self.cluster_dir.join("PG_VERSION").exists() {
            return Ok(());
        }
        // Made aside and renamed into place once configured. An earlier run's half-made cluster
        // (here, or one in place with no PG_VERSION yet) is started over.
        let making = self.cluster_dir.with_extension("init");
        for dir in [&making, &self.cluster_dir] {
            if dir.exists() {
                std::fs::remove_dir_all(dir)?;
            }
        }
        std::fs::create_dir_all(&making)?;
        set_mode(&making, 0o700)?;
        if let Some((uid, gid)) = self.run_as {
            nix::unistd::chown(
                &making,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
            .map_err(std::io::Error::from)?;
            // The server process needs to enter every parent folder of the cluster.
            let probe = self
                .command("/bin/sh")
                .args(["-c", "cd \"$1\"", "sh"])
                .arg(&making)
                .output()
                .await?;
            if !probe.status.success() {
                return Err(EmbeddedDbError::Unreachable(self.cluster_dir.clone()));
            }
        }
        tracing::info!(cluster = %self.cluster_dir.display(), "initialising embedded PostgreSQL");
        let out = self
            .command("initdb")
            .arg("-D")
            .arg(&making)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"])
            .output()
            .await?;
        check("initdb", out)?;
        // No TCP at all; the socket sits in the cluster folder (the server's working directory).
        let settings = "\n# Written by vibe: private cluster, unix socket only.\n\
                        listen_addresses = ''\n\
                        unix_socket_directories = '.'\n\
                        unix_socket_permissions = 0700\n";
        let conf = making.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf)?;
        text.push_str(settings);
        std::fs::write(&conf, text)?;
        std::fs::rename(&making, &self.cluster_dir)?;
        Ok(())
    }

    async fn is_running(&self) -> Result<bool, EmbeddedDbError> {
        let out = self
            .command("pg_ctl")
            .arg("status")
            .arg("-D")
            .arg(&self.cluster_dir)
            .output()
            .await?;
        // pg_ctl status: 0 running, 3 not running, 4 no accessible data directory.
        Ok(out.status.success())
    }

    async fn pg_ctl_start(&self) -> Result<(), EmbeddedDbError> {
        let out = self
            .command("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(&self.cluster_dir)
            .arg("-l")
            .arg(self.cluster_dir.join("server.log"))
            .args(["-w", "-t", "120"])
            .output()
            .await?;
        check("pg_ctl start", out).map_err(|e| match e {
            // pg_ctl says only "examine the log output": the reason is in the log.
            EmbeddedDbError::Command { step, detail } => {
                let log = self.cluster_dir.join("server.log");
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                let lines: Vec<&str> = tail.lines().rev().take(5).collect();
                let last: Vec<&str> = lines.into_iter().rev().collect();
                EmbeddedDbError::Command {
                    step,
                    detail: format!("{detail}; {}: {}", log.display(), last.join(" | ")),
                }
            }
            other => other,
        })
    }

    async fn ensure_database(&self) -> Result<(), EmbeddedDbError> {
        let mut conn = self
            .connect_options()
            .database("postgres")
            .connect()
            .await?;
        let exists: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
                .bind(DATABASE_NAME)
                .fetch_optional(&mut conn)
                .await?;
        if exists.is_none() {
            // The name is a constant: no user input reaches this statement.
            sqlx::query("CREATE DATABASE vibe")
                .execute(&mut conn)
                .await?;
        }
        conn.close().await?;
        Ok(())
    }
}

fn check(step: &'static str, out: Output) -> Result<(), EmbeddedDbError> {
    if out.status.success() {
        return Ok(());
    }
    let mut detail = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if detail.is_empty() {
        detail = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    }
    Err(EmbeddedDbError::Command { step, detail })
}

/// The lock of the cluster's owner, if this process can take it (None: another process holds
/// it). Held for as long as the file stays open.
fn take_ownership(path: &Path) -> Result<Option<std::fs::File>, EmbeddedDbError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e.into()),
    }
}

/// `/usr/lib/postgresql/<major>/bin` if it holds the binaries (Debian's layout).
fn bin_dir_of_version(major: &str) -> Option<PathBuf> {
    if major.is_empty() || !major.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let bin = Path::new("/usr/lib/postgresql").join(major).join("bin");
    ["pg_ctl", "initdb", "postgres"]
        .iter()
        .all(|b| bin.join(b).is_file())
        .then_some(bin)
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// The folder holding `pg_ctl`, `initdb` and `postgres`: next to a `pg_ctl` on PATH (through
/// symlinks), else the newest `/usr/lib/postgresql/<version>/bin`.
pub fn find_bin_dir() -> Option<PathBuf> {
    let complete = |dir: &Path| {
        ["pg_ctl", "initdb", "postgres"]
            .iter()
            .all(|b| dir.join(b).is_file())
    };
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("pg_ctl");
            if let Ok(real) = std::fs::canonicalize(&candidate)
                && let Some(parent) = real.parent()
                && complete(parent)
            {
                return Some(parent.to_path_buf());
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            complete(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}
