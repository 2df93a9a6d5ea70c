//! The private PostgreSQL that `vibe serve` starts when no database URL is configured: found on
//! the system, initialised once into `<data dir>/postgres`, reachable only through a unix socket
//! inside that folder, and stopped when the server stops.
//!
//! PostgreSQL refuses to run as root, so as root the cluster is owned by and run as the `postgres`
//! user; the socket folder is mode 0700, so only that user and root can connect (trust auth).

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
}

impl EmbeddedPostgres {
    /// Initialises the cluster on first use, starts it (or adopts one a crashed run left behind)
    /// and makes sure the `vibe` database exists.
    pub async fn start(data_dir: &Path) -> Result<Self, EmbeddedDbError> {
        let bin_dir = find_bin_dir().ok_or(EmbeddedDbError::BinariesNotFound)?;
        std::fs::create_dir_all(data_dir)?;
        let data_dir = std::fs::canonicalize(data_dir)?;
        let cluster_dir = data_dir.join("postgres");
        if cluster_dir.as_os_str().len() > MAX_SOCKET_DIR_LEN {
            return Err(EmbeddedDbError::PathTooLong(cluster_dir));
        }
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
        };
        db.init_if_needed().await?;
        if !db.is_running().await? {
            db.pg_ctl_start().await?;
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
        std::fs::create_dir_all(&self.cluster_dir)?;
        set_mode(&self.cluster_dir, 0o700)?;
        if let Some((uid, gid)) = self.run_as {
            nix::unistd::chown(
                &self.cluster_dir,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
            .map_err(std::io::Error::from)?;
            // The server process needs to enter every parent folder of the cluster.
            let probe = self
                .command("/bin/sh")
                .args(["-c", "cd \"$1\"", "sh"])
                .arg(&self.cluster_dir)
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
            .arg(&self.cluster_dir)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"])
            .output()
            .await?;
        check("initdb", out)?;
        // No TCP at all; the socket sits in the cluster folder (the server's working directory).
        let settings = "\n# Written by vibe: private cluster, unix socket only.\n\
                        listen_addresses = ''\n\
                        unix_socket_directories = '.'\n\
                        unix_socket_permissions = 0700\n";
        let conf = self.cluster_dir.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf)?;
        text.push_str(settings);
        std::fs::write(&conf, text)?;
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
        check("pg_ctl start", out)
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
