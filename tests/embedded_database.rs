//! `vibe serve` with no database URL: it initialises and starts a private PostgreSQL in its data
//! dir, serves a write, keeps it running through a `vibe migrate` beside it, stops the cluster on
//! SIGTERM, and on the next start still has the write.
#![allow(clippy::unwrap_used, clippy::expect_used)] // in tests a failed unwrap is a failed test

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

const VIBE: &str = env!("CARGO_BIN_EXE_vibe");

fn vibe(data_dir: &Path) -> Command {
    let mut cmd = Command::new(VIBE);
    cmd.env("VIBE_DATA_DIR", data_dir)
        .env("VIBE_LISTEN", "127.0.0.1:0")
        .env("VIBE_LOG__FORMAT", "json")
        .env_remove("DATABASE_URL")
        .env_remove("VIBE_DATABASE_URL")
        .env_remove("RUST_LOG");
    cmd
}

/// Starts `vibe serve` and returns it with its base URL, read from its "listening" log line.
fn serve(data_dir: &Path) -> (Child, String) {
    let mut child = vibe(data_dir)
        .arg("serve")
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The log goes to standard error.
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let base = loop {
        let line = lines
            .next()
            .expect("vibe serve exited before listening")
            .unwrap();
        let entry: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if let Some(addr) = entry["fields"]["addr"].as_str() {
            break format!("http://{addr}");
        }
    };
    // Keep draining the log so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, base)
}

/// Runs `cmd`, which must succeed (its standard error in the failure); its output.
fn succeeded(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stop(mut child: Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "vibe serve exited with {status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_without_url_runs_a_private_postgres_that_persists() {
    if vibe::embedded_db::find_bin_dir().is_none() {
        panic!(
            "PostgreSQL server binaries are required for this test (apt-get install postgresql)"
        );
    }
    let root = tempfile::tempdir().unwrap();
    // As root the cluster runs as `postgres`, which must be able to enter the folder.
    std::fs::set_permissions(
        root.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let data_dir = root.path().join("data");

    let (child, base) = tokio::task::spawn_blocking({
        let d = data_dir.clone();
        move || serve(&d)
    })
    .await
    .unwrap();
    let mode_of = |path: &Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(path).unwrap().permissions())
            & 0o777
    };
    // Others may pass through to the cluster's socket, not list what is there.
    assert_eq!(mode_of(&data_dir), 0o711, "the data dir");
    assert_eq!(mode_of(&data_dir.join("keys")), 0o700, "the keys");
    let cluster = data_dir.join("postgres");
    assert_eq!(mode_of(&cluster), 0o700, "the cluster");
    assert!(
        cluster.join("PG_VERSION").exists(),
        "initdb ran in the data dir"
    );
    assert!(
        cluster.join("postmaster.pid").exists(),
        "the cluster is running"
    );
    // No TCP listener: the only way in is the socket inside the cluster folder.
    let conf = std::fs::read_to_string(cluster.join("postgresql.conf")).unwrap();
    assert!(conf.contains("listen_addresses = ''"));

    let mut out = vibe(&data_dir);
    out.args([
        "token",
        "mint",
        "--sub",
        "did:key:zAlice",
        "--scope",
        "write:notes",
        "--scope",
        "read:notes",
        "--ttl",
        "10m",
    ]);
    let out = succeeded(&mut out);
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let key = data_dir.join("keys/root.key");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "root key is private");

    let client = reqwest::Client::new();
    let post_note = async |text: &str| {
        client
            .post(format!("{base}/v1/docs/notes"))
            .bearer_auth(&token)
            .json(&json!({"data": {"text": text}}))
            .send()
            .await
            .unwrap()
    };
    let r = post_note("survives restarts").await;
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();

    // `vibe migrate` beside the running server uses its cluster and leaves it running.
    succeeded(vibe(&data_dir).arg("migrate"));
    let r = post_note("after a migrate beside it").await;
    assert_eq!(r.status(), 201, "the server's database is still up");
    // A second server on the same data dir is refused: it would lose its database when the
    // first one stops.
    let mut second = tokio::process::Command::from(vibe(&data_dir));
    second.arg("serve").kill_on_drop(true);
    let second = tokio::time::timeout(std::time::Duration::from_secs(30), second.output())
        .await
        .expect("a second server on the data dir is refused, not left running")
        .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("one server per data dir"), "{err}");
    let r = post_note("after a refused second server").await;
    assert_eq!(r.status(), 201, "the first server is untouched");

    tokio::task::spawn_blocking(move || stop(child))
        .await
        .unwrap();
    assert!(
        !cluster.join("postmaster.pid").exists(),
        "the cluster was stopped cleanly"
    );

    let (child, base) = tokio::task::spawn_blocking({
        let d = data_dir.clone();
        move || serve(&d)
    })
    .await
    .unwrap();
    let r = client
        .get(format!("{base}/v1/docs/notes/{id}"))
        .bearer_auth(&token)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let fetched: Value = r.json().await.unwrap();
    assert_eq!(fetched["data"]["text"], "survives restarts");
    tokio::task::spawn_blocking(move || stop(child))
        .await
        .unwrap();
}

#[test]
fn invalid_config_fails_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = vibe(dir.path())
        .env("VIBE_HTTP__MAX_BODY_BYTES", "lots")
        .arg("serve")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_body_bytes"), "{err}");

    let file = dir.path().join("vibe.toml");
    std::fs::write(&file, "[http]\ndefault_page_size = 0\n").unwrap();
    let out = vibe(dir.path())
        .args(["--config"])
        .arg(&file)
        .arg("serve")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("http.default_page_size"), "{err}");
}

/// A failed command prints one line naming the error and each cause once (many messages already
/// end with their cause, which a plain chain print would repeat).
#[test]
fn a_failure_names_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let mint = || {
        vibe(dir.path())
            .args(["token", "mint", "--sub", "did:key:zAlice", "--scope", "*"])
            .output()
            .unwrap()
    };
    assert!(mint().status.success(), "the first mint makes the key");
    let key = dir.path().join("keys/root.key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = mint();
    assert!(!out.status.success(), "a key others may read is refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(
        err.matches("group or others may read or write it").count(),
        1,
        "{err}"
    );
}

/// `vibe token mint` on a new data dir creates the root key and prints the token alone on
/// standard output, so `TOKEN=$(vibe token mint …)` (the README's first request) holds a token:
/// the log line about the new key goes to standard error.
#[test]
fn a_first_token_mint_prints_only_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let out = succeeded(vibe(dir.path()).env("VIBE_LOG__FORMAT", "text").args([
        "token",
        "mint",
        "--sub",
        "did:key:zAlice",
        "--scope",
        "*",
    ]));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "only the token: {stdout:?}");
    assert!(
        lines[0].len() > 100 && !lines[0].contains(' '),
        "a token: {stdout:?}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("created token root key"), "{stderr}");
    // A new key is most often the wrong data dir: the operator is told whose tokens these are.
    assert!(
        stderr.contains("only a server on this data dir"),
        "{stderr}"
    );
    // Without the plain-text colours of a terminal: stderr is a pipe here.
    assert!(!stderr.contains('\u{1b}'), "{stderr:?}");

    let mint = |ttl: &str| {
        vibe(dir.path())
            .env("VIBE_LOG__FORMAT", "text")
            // A shell's own variable that happens to start with VIBE_ is not configuration.
            .env("VIBE_TOKEN", "an earlier token")
            .args([
                "token",
                "mint",
                "--sub",
                "did:key:zAlice",
                "--scope",
                "admin",
            ])
            .args(["--ttl", ttl])
            .output()
            .unwrap()
    };
    let again = mint("5m");
    assert!(again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        !stderr.contains("creating one"),
        "the key exists now: {stderr}"
    );
    let zero = mint("0s");
    assert!(!zero.status.success(), "a token expired at birth");
    let stderr = String::from_utf8_lossy(&zero.stderr);
    assert!(stderr.contains("longer than 0"), "{stderr}");
}
