//! A throwaway PostgreSQL server for tests and benchmarks.
//!
//! Each [`TestPostgres`] is a cluster of its own: a fresh data directory
//! made by `initdb`, its own port on 127.0.0.1, started from the installed
//! binaries (Debian's `/usr/lib/postgresql/*/bin`, or the directory named by
//! `SKYLARK_PG_BIN`). It can be killed with SIGKILL and started again on
//! the same data and port, cloned into a streaming standby, and promoted —
//! what the crash and failover tests need. Everything is removed on drop.
//!
//! PostgreSQL refuses to run as root; when the tests run as root, the
//! server runs as the `postgres` user (via `setpriv`), owning its directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The superuser every throwaway cluster is made with.
pub const USER: &str = "skylark";

/// Why a throwaway server could not be had, in words.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HarnessError(String);

fn fail(message: impl Into<String>) -> HarnessError {
    HarnessError(message.into())
}

/// The directory holding PostgreSQL's server programs: `SKYLARK_PG_BIN`,
/// or the newest `/usr/lib/postgresql/*/bin`.
pub fn binaries() -> Result<PathBuf, HarnessError> {
    find_binaries(std::env::var_os("SKYLARK_PG_BIN").map(PathBuf::from), Path::new("/usr/lib/postgresql"))
}

const PROGRAMS: [&str; 4] = ["initdb", "postgres", "pg_basebackup", "psql"];

fn find_binaries(named: Option<PathBuf>, installed: &Path) -> Result<PathBuf, HarnessError> {
    let has_all = |dir: &Path| PROGRAMS.iter().all(|b| dir.join(b).is_file());
    if let Some(dir) = named {
        return if has_all(&dir) {
            Ok(dir)
        } else {
            Err(fail(format!("SKYLARK_PG_BIN is {} but {} are not all there", dir.display(), PROGRAMS.join(", "))))
        };
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(installed)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            has_all(&bin).then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).ok_or_else(|| {
        fail(format!(
            "PostgreSQL's server programs ({}) were not found under {}/*/bin. Install them (Debian: \
             apt-get install postgresql) or set SKYLARK_PG_BIN to the directory that holds them.",
            PROGRAMS.join(", "),
            installed.display()
        ))
    })
}

/// The uid and gid to run the server as when this process is root.
fn run_as() -> Result<Option<(u32, u32)>, HarnessError> {
    use std::os::unix::fs::MetadataExt;
    let me = std::fs::metadata("/proc/self").map_err(|e| fail(format!("reading /proc/self: {e}")))?;
    if me.uid() != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| fail(format!("reading /etc/passwd: {e}")))?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&"postgres") && f.len() > 3)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .map(Some)
        .ok_or_else(|| {
            fail("running as root, and PostgreSQL will not; there is no `postgres` user to run it as (create one)")
        })
}

fn free_port() -> Result<u16, HarnessError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| fail(format!("finding a port: {e}")))?;
    Ok(listener.local_addr().map_err(|e| fail(e.to_string()))?.port())
}

/// One throwaway PostgreSQL cluster.
#[derive(Debug)]
pub struct TestPostgres {
    bin: PathBuf,
    run_as: Option<(u32, u32)>,
    /// Holds `data/` and `server.log`; removed on drop.
    root: PathBuf,
    /// The data directory, when not `root/data` (see [`TestPostgres::start_in`]).
    data_dir: Option<PathBuf>,
    port: u16,
    child: Option<Child>,
    /// Settings given at every start besides the defaults (TLS).
    extra: Vec<String>,
}

impl TestPostgres {
    /// initdb, then start.
    pub fn start() -> Result<TestPostgres, HarnessError> {
        let mut pg = Self::fresh()?;
        let data = pg.data();
        let mut initdb = pg.command("initdb");
        initdb.arg("-D").arg(&data).args(["-U", USER, "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"]);
        pg.run(initdb, "initdb")?;
        pg.launch()?;
        Ok(pg)
    }

    fn fresh() -> Result<TestPostgres, HarnessError> {
        static N: AtomicU64 = AtomicU64::new(0);
        let bin = binaries()?;
        let run_as = run_as()?;
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let root = std::env::temp_dir().join(format!(
            "skylark-pg-{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            stamp % 1_000_000_000
        ));
        std::fs::create_dir_all(&root).map_err(|e| fail(format!("creating {}: {e}", root.display())))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&root, Some(uid), Some(gid))
                .map_err(|e| fail(format!("giving {} to the postgres user: {e}", root.display())))?;
        }
        Ok(TestPostgres { bin, run_as, root, data_dir: None, port: free_port()?, child: None, extra: Vec::new() })
    }

    fn data(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| self.root.join("data"))
    }

    /// As [`TestPostgres::start`], with the data directory at `data` (to be
    /// created; its parent must exist), and initdb's files synced: for a
    /// data directory on a filesystem that can lose power.
    pub fn start_in(data: &Path) -> Result<TestPostgres, HarnessError> {
        let mut pg = Self::fresh()?;
        std::fs::create_dir(data).map_err(|e| fail(format!("creating {}: {e}", data.display())))?;
        if let Some((uid, gid)) = pg.run_as {
            std::os::unix::fs::chown(data, Some(uid), Some(gid))
                .map_err(|e| fail(format!("giving {} to the postgres user: {e}", data.display())))?;
        }
        if let Some(parent) = data.parent() {
            std::fs::File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(|e| fail(format!("syncing {}: {e}", parent.display())))?;
        }
        pg.data_dir = Some(data.to_owned());
        let mut initdb = pg.command("initdb");
        initdb.arg("-D").arg(data).args(["-U", USER, "--auth=trust", "-E", "UTF8", "--locale=C"]);
        pg.run(initdb, "initdb")?;
        pg.launch()?;
        Ok(pg)
    }

    /// A command for one of the server programs, run as the right user.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match self.run_as {
            Some((uid, gid)) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}")).arg(format!("--regid={gid}")).arg("--clear-groups").arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    fn run(&self, mut command: Command, what: &str) -> Result<(), HarnessError> {
        let out = command.output().map_err(|e| fail(format!("running {what}: {e}")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(fail(format!(
                "{what} failed: {}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            )))
        }
    }

    /// Starts the postmaster on this cluster's data and port and waits
    /// until it accepts connections. After a SIGKILL the old server's
    /// processes may take a moment to go; the start is retried meanwhile.
    fn launch(&mut self) -> Result<(), HarnessError> {
        let started = Instant::now();
        loop {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.log_path())
                .map_err(|e| fail(format!("opening the server log: {e}")))?;
            let mut postgres = self.command("postgres");
            postgres.arg("-D").arg(self.data()).arg("-p").arg(self.port.to_string()).arg("-k").arg(&self.root);
            for setting in [
                "listen_addresses=127.0.0.1",
                "fsync=on",
                "synchronous_commit=on",
                "max_connections=200",
                "shared_buffers=64MB",
            ]
            .into_iter()
            .chain(self.extra.iter().map(String::as_str))
            {
                postgres.arg("-c").arg(setting);
            }
            let log_err = log.try_clone().map_err(|e| fail(e.to_string()))?;
            let mut child = postgres
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log_err)
                .spawn()
                .map_err(|e| fail(format!("starting {}: {e}", self.bin.join("postgres").display())))?;
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // exited: retry below
                }
                if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() && self.ready() {
                    self.child = Some(child);
                    return Ok(());
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(fail(format!("PostgreSQL did not start in 30 s; see {}", self.log_path().display())));
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(fail(format!("PostgreSQL would not start; see {}", self.log_path().display())));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether the server answers queries (not only the port).
    fn ready(&self) -> bool {
        Command::new(self.bin.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER, "-d", "postgres"])
            .status()
            .is_ok_and(|s| s.success())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn log_path(&self) -> PathBuf {
        self.root.join("server.log")
    }

    /// The URL of a database on this server.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates an empty database and returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String, HarnessError> {
        let mut createdb = Command::new(self.bin.join("createdb"));
        if !self.bin.join("createdb").is_file() {
            createdb = Command::new("createdb");
        }
        createdb.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER, name]);
        self.run(createdb, "createdb")?;
        Ok(self.url(name))
    }

    /// Turns TLS on with this certificate and key (PEM) and restarts;
    /// clients may then connect with `sslmode=verify-full`.
    pub fn enable_tls(&mut self, cert_pem: &str, key_pem: &str) -> Result<(), HarnessError> {
        let (cert, key) = (self.root.join("server.crt"), self.root.join("server.key"));
        let write = |path: &Path, text: &str, mode: u32| -> Result<(), HarnessError> {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(path, text).map_err(|e| fail(format!("writing {}: {e}", path.display())))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| fail(format!("setting the mode of {}: {e}", path.display())))?;
            if let Some((uid, gid)) = self.run_as {
                std::os::unix::fs::chown(path, Some(uid), Some(gid))
                    .map_err(|e| fail(format!("giving {} to the postgres user: {e}", path.display())))?;
            }
            Ok(())
        };
        write(&cert, cert_pem, 0o644)?;
        write(&key, key_pem, 0o600)?;
        self.extra = vec![
            "ssl=on".into(),
            format!("ssl_cert_file={}", cert.display()),
            format!("ssl_key_file={}", key.display()),
        ];
        self.restart()
    }

    /// The postmaster's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL to the postmaster: no shutdown, no checkpoint, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the postmaster and every process of the cluster (its
    /// backends run in the data directory) with SIGKILL, and returns once
    /// none is left: a machine losing power stops them all at once.
    pub fn kill_all(&mut self) -> Result<(), HarnessError> {
        self.kill();
        let data = self.data().canonicalize().map_err(|e| fail(format!("{}: {e}", self.data().display())))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left: Vec<String> = std::fs::read_dir("/proc")
                .map_err(|e| fail(format!("reading /proc: {e}")))?
                .filter_map(|entry| {
                    let name = entry.ok()?.file_name().into_string().ok()?;
                    name.parse::<u32>().ok()?;
                    let cwd = std::fs::read_link(format!("/proc/{name}/cwd")).ok()?;
                    cwd.starts_with(&data).then_some(name)
                })
                .collect();
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(fail(format!("PostgreSQL processes {left:?} would not die")));
            }
            let _ = Command::new("kill").arg("-9").args(&left).status();
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same data and port (crash recovery
    /// runs first, as after a power cut).
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        self.kill();
        self.launch()
    }

    /// A streaming-replication standby of this server, cloned with
    /// `pg_basebackup`, running on a port of its own. With `synchronous`,
    /// this server then waits for the standby to flush every commit
    /// (`synchronous_standby_names`), so a commit is on both machines.
    pub fn standby(&mut self, synchronous: bool) -> Result<TestPostgres, HarnessError> {
        let mut standby = Self::fresh()?;
        let mut base = self.command("pg_basebackup");
        let conninfo = format!("host=127.0.0.1 port={} user={USER} application_name=standby", self.port);
        base.arg("-D").arg(standby.data()).args([
            "-X",
            "stream",
            "-R",
            "--no-sync",
            "--checkpoint=fast",
            "-d",
            &conninfo,
        ]);
        self.run(base, "pg_basebackup")?;
        // The standby names itself to the primary, which waits for it by that name.
        let auto = standby.data().join("postgresql.auto.conf");
        let mut conf = std::fs::read_to_string(&auto).map_err(|e| fail(format!("reading {}: {e}", auto.display())))?;
        conf.push_str(&format!("primary_conninfo = '{conninfo}'\n"));
        std::fs::write(&auto, conf).map_err(|e| fail(format!("writing {}: {e}", auto.display())))?;
        standby.launch()?;
        if synchronous {
            self.sql("ALTER SYSTEM SET synchronous_standby_names = 'standby'")?;
            self.sql("SELECT pg_reload_conf()")?;
        }
        // Streaming (and, if asked, counted as synchronous) before returning.
        let state = if synchronous { "sync" } else { "async" };
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.sql(&format!("SELECT count(*) FROM pg_stat_replication WHERE sync_state = '{state}'"))? != "1" {
            if Instant::now() > deadline {
                return Err(fail(format!("the standby did not start streaming; see {}", standby.log_path().display())));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(standby)
    }

    /// Runs one SQL command on the `postgres` database with psql; returns
    /// its output, trimmed.
    pub fn sql(&self, command: &str) -> Result<String, HarnessError> {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-t",
                "-A",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                USER,
                "-d",
                "postgres",
            ])
            .args(["-c", command])
            .output()
            .map_err(|e| fail(format!("running psql: {e}")))?;
        if !out.status.success() {
            return Err(fail(format!("psql {command:?} failed: {}", String::from_utf8_lossy(&out.stderr))));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Promotes a standby to primary and waits until it accepts writes.
    pub fn promote(&self) -> Result<(), HarnessError> {
        let mut ctl = self.command("pg_ctl");
        ctl.arg("promote").arg("-w").arg("-D").arg(self.data());
        self.run(ctl, "pg_ctl promote")
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        self.kill();
        // SKYLARK_KEEP_TEST_PG=1 keeps the log (and data) of a failed run.
        if std::env::var_os("SKYLARK_KEEP_TEST_PG").is_some() {
            eprintln!("kept the throwaway PostgreSQL cluster in {}", self.root.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_programs_are_named() {
        let empty = std::env::temp_dir().join(format!("skylark-no-pg-{}", std::process::id()));
        std::fs::create_dir_all(empty.join("15/bin")).unwrap();
        let message = find_binaries(None, &empty).unwrap_err().to_string();
        assert!(
            message.contains("initdb, postgres, pg_basebackup, psql") && message.contains("apt-get install postgresql")
        );
        let message = find_binaries(Some(empty.join("15/bin")), &empty).unwrap_err().to_string();
        assert!(message.contains("SKYLARK_PG_BIN") && message.contains("not all there"), "{message}");
        for program in PROGRAMS {
            std::fs::write(empty.join("15/bin").join(program), "").unwrap();
        }
        assert_eq!(find_binaries(None, &empty).unwrap(), empty.join("15/bin"), "the newest installed version");
        std::fs::remove_dir_all(&empty).unwrap();
    }
}
