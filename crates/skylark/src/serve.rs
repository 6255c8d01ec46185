//! `skylark serve`: configuration, the embedded store, the gateway, and a
//! graceful shutdown on SIGTERM or Ctrl-C.

use anyhow::{Context, Result};
use clap::Args;
use skylark_core::SystemClock;
use skylark_gateway::Gateway;
use skylark_gateway::Settings as Config;
use skylark_server::Server;
use skylark_server::config::SmsConfig;
use skylark_server::sms::{ConsoleSms, HttpSms, SmsSender};
use skylark_store::postgres::hide_password;
use skylark_store::{PgStore, RedbOptions, RedbStore, Store};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

/// How long shutdown waits for connections to close.
const DRAIN: Duration = Duration::from_secs(10);

#[derive(Args)]
pub struct ServeArgs {
    /// A TOML configuration file; flags and environment override it.
    #[arg(long, env = "SKYLARK_CONFIG")]
    config: Option<PathBuf>,
    /// Directory for the embedded store [default: ./skylark-data].
    #[arg(long, env = "SKYLARK_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Keep the data in PostgreSQL: a `postgres://…` URL; repeat for
    /// shards (the first also holds the directory). Replaces `[store]
    /// shards` of the file [default: the embedded store].
    #[arg(long = "store", env = "SKYLARK_STORE", value_name = "URL")]
    store: Vec<String>,
    /// Address for HTTP and WebSocket [default: 127.0.0.1:7480].
    #[arg(long, env = "SKYLARK_HTTP")]
    http: Option<SocketAddr>,
    /// Address for raw TCP [default: 127.0.0.1:7481].
    #[arg(long, env = "SKYLARK_TCP")]
    tcp: Option<SocketAddr>,
    /// Address for the admin API and Prometheus metrics; keep it private
    /// [default: 127.0.0.1:7482].
    #[arg(long, env = "SKYLARK_ADMIN")]
    admin: Option<SocketAddr>,
    /// TLS certificate chain (PEM) for both listeners; needs --tls-key
    /// [default: none, TLS off].
    #[arg(long, env = "SKYLARK_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "SKYLARK_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// TLS with a self-signed certificate for localhost, made on first use
    /// and kept in the data directory (clients trust it with `--ca`).
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key"])]
    dev_tls: bool,
    /// Cluster mode: this node's name (unique in the cluster). Needs the
    /// PostgreSQL store and NATS; docs/CLUSTER.md.
    #[arg(long, env = "SKYLARK_CLUSTER_NODE", value_name = "NAME")]
    cluster_node: Option<String>,
    /// Cluster mode: a NATS server URL; repeat for a NATS cluster.
    #[arg(long = "nats", env = "SKYLARK_NATS", value_name = "URL", value_delimiter = ',')]
    nats: Vec<String>,
    /// Cluster mode: the address devices use to reach this node, shown to
    /// operators and listed to clients at /v1/nodes (default: the HTTP
    /// listen address).
    #[arg(long, env = "SKYLARK_ADVERTISE", value_name = "HOST:PORT")]
    advertise: Option<String>,
    /// Log filter, such as `info` or `info,skylark_gateway=debug`.
    #[arg(long, env = "SKYLARK_LOG", default_value = "info")]
    log: String,
}

/// The admin API's token, in the data directory (mode 0600).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// The admin token kept in `dir`, made (random, 256 bits) on first start.
fn admin_token(dir: &std::path::Path) -> Result<String> {
    let path = dir.join(ADMIN_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => return Ok(token.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading the admin token {}", path.display())),
    }
    let token: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
    let tmp = dir.join(format!("{ADMIN_TOKEN_FILE}.new"));
    {
        use std::io::Write;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        file.write_all(token.as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    sync_dir(dir)?;
    Ok(token)
}

/// Makes the entries of `dir` durable (new files, renames in it).
fn sync_dir(dir: &std::path::Path) -> Result<()> {
    skylark_store::sync_path(dir).with_context(|| format!("syncing the directory {}", dir.display()))
}

/// Creates the data directory (and any missing parent), each new level
/// made durable in its parent: a power cut must not take it, and the store
/// in it, away.
fn create_data_dir(dir: &std::path::Path) -> Result<()> {
    let mut missing = Vec::new();
    let mut at = dir;
    while !at.exists() {
        missing.push(at.to_owned());
        match at.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => at = parent,
            _ => break,
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating data directory {}", dir.display()))?;
    for created in missing.iter().rev() {
        if let Some(parent) = created.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// The file's settings (or the defaults), then each flag given.
fn load_config(args: &ServeArgs) -> Result<Config> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => Config::default(),
    };
    if let Some(dir) = &args.data_dir {
        config.data_dir = dir.clone();
    }
    if !args.store.is_empty() {
        config.store.shards = args.store.clone();
    }
    if let Some(addr) = args.http {
        config.listen.http = addr;
    }
    if let Some(addr) = args.tcp {
        config.listen.tcp = addr;
    }
    if let Some(addr) = args.admin {
        config.listen.admin = addr;
    }
    if let Some(cert) = &args.tls_cert {
        config.tls.cert_file = Some(cert.clone());
    }
    if let Some(key) = &args.tls_key {
        config.tls.key_file = Some(key.clone());
    }
    if let Some(node) = &args.cluster_node {
        config.cluster.get_or_insert_with(Default::default).node = node.clone();
    }
    if let Some(cluster) = &mut config.cluster {
        if !args.nats.is_empty() {
            cluster.nats = args.nats.clone();
        }
        if let Some(advertise) = &args.advertise {
            cluster.advertise = advertise.clone();
        }
        if cluster.advertise.is_empty() {
            cluster.advertise = config.listen.http.to_string();
        }
    }
    if args.dev_tls {
        let dir = config.data_dir.join("dev-tls");
        let (cert, key) = skylark_gateway::tls::dev_certificate(&dir)
            .with_context(|| format!("making a self-signed certificate in {}", dir.display()))?;
        config.tls.cert_file = Some(cert);
        config.tls.key_file = Some(key);
    }
    Ok(config)
}

fn sms_provider(config: &SmsConfig) -> Result<Arc<dyn SmsSender>> {
    Ok(match config {
        SmsConfig::Console => Arc::new(ConsoleSms),
        SmsConfig::Http { url, headers, timeout_ms } => {
            Arc::new(HttpSms::new(url, headers.clone(), Duration::from_millis(*timeout_ms))?)
        }
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// The embedded store in the data directory, or PostgreSQL when shards
/// are configured. Either refuses, in words, what it cannot use.
/// With the embedded store comes the signal that its disk failed a write.
async fn open_store(config: &Config) -> Result<(Arc<dyn Store>, Option<DiskFailure>)> {
    if config.store.shards.is_empty() {
        let db_path = config.data_dir.join("skylark.redb");
        let nice = config.store.committer_nice;
        if nice > 19 {
            anyhow::bail!(
                "store.committer_nice = {nice} is out of range: use 0 (the committer at the network threads' priority) to 19"
            );
        }
        let options = RedbOptions { committer_nice: nice, ..RedbOptions::default() };
        let store =
            RedbStore::open_with(&db_path, options).with_context(|| format!("opening {}", db_path.display()))?;
        tracing::info!(data = %db_path.display(), "store opened");
        let failure = store.disk_failure();
        return Ok((Arc::new(store), Some(failure)));
    }
    let store = PgStore::open(&config.store.pg_options()).await.context("opening the PostgreSQL store")?;
    let shown: Vec<String> = config.store.shards.iter().map(|u| hide_password(u)).collect();
    tracing::info!(shards = ?shown, "PostgreSQL store opened");
    Ok((Arc::new(store), None))
}

type DiskFailure = tokio::sync::watch::Receiver<Option<String>>;

/// Resolves, with the reason, once the embedded store's disk failed a write.
async fn disk_failed(failure: Option<DiskFailure>) -> String {
    if let Some(mut failure) = failure {
        loop {
            if let Some(why) = failure.borrow_and_update().clone() {
                return why;
            }
            if failure.changed().await.is_err() {
                break;
            }
        }
    }
    std::future::pending().await
}

/// `skylark store copy`: the embedded store into PostgreSQL, verified.
pub async fn copy_store(from: &std::path::Path, to: Vec<String>) -> Result<()> {
    let file = if from.is_dir() { from.join("skylark.redb") } else { from.to_owned() };
    let options = skylark_gateway::config::StoreSettings { shards: to, ..Default::default() }.pg_options();
    println!("Copying {} into {} PostgreSQL shard(s)…", file.display(), options.shards.len());
    let reports = skylark_store::copy::redb_to_postgres(&file, &options, |table| println!("  {table}…"))
        .await
        .context("copying the store")?;
    println!("{:<14} {:>10} {:>10}  checksum", "table", "source", "copied");
    let mut bad = Vec::new();
    for r in &reports {
        let verdict = if r.matches() { "ok" } else { "DIFFERS" };
        println!("{:<14} {:>10} {:>10}  {} {verdict}", r.table, r.rows, r.copied_rows, &r.source[..12]);
        if !r.matches() {
            bad.push(r.table);
        }
    }
    if !bad.is_empty() {
        anyhow::bail!(
            "the copy does not match the source in {}; do not use it (drop those databases and copy again)",
            bad.join(", ")
        );
    }
    let rows: u64 = reports.iter().map(|r| r.rows).sum();
    println!(
        "Verified: {} tables, {rows} rows, every count and checksum equal. Start the server with --store {}",
        reports.len(),
        options.shards.iter().map(|u| hide_password(u)).collect::<Vec<_>>().join(" --store ")
    );
    Ok(())
}

/// Resolves once an operator drained this node and its actors moved away
/// (never on one node).
async fn drained(server: &Server, cluster: Option<&skylark_server::cluster::Cluster>) {
    let Some(cluster) = cluster else { return std::future::pending().await };
    let mut draining = cluster.draining();
    let _ = draining.wait_for(|d| *d).await;
    while server.router.live_actors() > 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Before stopping: marks this node draining so its actors move (and are
/// released) while it still answers, for at most a few seconds.
async fn hand_over(server: &Server, cluster: &skylark_server::cluster::Cluster) {
    if let Err(e) = cluster.drain().await {
        tracing::warn!(error = %e, "could not announce the drain; the others take over when the lease lapses");
        return;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.router.live_actors() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `skylark cluster status`: the live nodes, as the store records them.
pub async fn cluster_status(store: Vec<String>) -> Result<()> {
    let store = open_cluster_store(store).await?;
    let members = skylark_store::LeaseStore::members(&store).await?;
    if members.is_empty() {
        println!("No node is live.");
    }
    for node in members {
        println!("{}  {}{}", node.id, node.address, if node.draining { "  (draining)" } else { "" });
    }
    Ok(())
}

/// `skylark cluster drain NODE`: asks the node to hand its actors to the
/// others and stop, then waits until it has left.
pub async fn cluster_drain(store: Vec<String>, node: &str, wait: Duration) -> Result<()> {
    let store = open_cluster_store(store).await?;
    if !skylark_store::LeaseStore::set_draining(&store, node, true).await? {
        anyhow::bail!("no node named {node:?} has joined this cluster (see `skylark cluster status`)");
    }
    println!("Draining {node}: its actors move to the other nodes, then it stops…");
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let members = skylark_store::LeaseStore::members(&store).await?;
        if !members.iter().any(|n| n.id == node) {
            println!("{node} has left the cluster.");
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("{node} is still a member after {} s; is it running?", wait.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn open_cluster_store(store: Vec<String>) -> Result<PgStore> {
    if store.is_empty() {
        anyhow::bail!("name the cluster's PostgreSQL store with --store postgres://… (or SKYLARK_STORE)");
    }
    let options = skylark_gateway::config::StoreSettings { shards: store, ..Default::default() }.pg_options();
    PgStore::open(&options).await.context("opening the PostgreSQL store")
}

pub async fn run(args: ServeArgs) -> Result<()> {
    let filter: Targets = args.log.parse().with_context(|| format!("bad log filter {:?}", args.log))?;
    let config = load_config(&args)?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let log = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi).with_filter(filter);
    // Spans to an OpenTelemetry collector, with a filter of their own.
    let otlp = match config.tracing.otlp_endpoint.as_str() {
        "" => None,
        endpoint => {
            let spans: Targets = config.tracing.filter.parse().with_context(|| {
                format!("[tracing] filter {:?} is not a filter (like \"skylark_server=debug\")", config.tracing.filter)
            })?;
            let layer = crate::otlp::start(endpoint, &config.tracing.service_name, Duration::from_secs(1))
                .map_err(anyhow::Error::msg)?;
            Some(layer.with_filter(spans))
        }
    };
    tracing_subscriber::registry().with(log).with(otlp).init();
    if !config.tracing.otlp_endpoint.is_empty() {
        tracing::info!(endpoint = %config.tracing.otlp_endpoint, "exporting spans over OTLP/HTTP");
    }

    create_data_dir(&config.data_dir)?;
    let (store, disk_failure) = open_store(&config).await?;
    let sms = sms_provider(&config.sms)?;
    if matches!(config.sms, SmsConfig::Console) {
        tracing::warn!("SMS provider is `console`: verification codes are printed in this log");
    }

    if config.cluster.is_some() && config.store.shards.is_empty() {
        anyhow::bail!(
            "cluster mode needs the PostgreSQL store every node shares: add --store postgres://… (docs/CLUSTER.md)"
        );
    }
    let tls_cert = config.tls.cert_file.clone().filter(|_| config.tls.key_file.is_some());
    let (services, mut transport) = config.split();
    transport.admin = skylark_gateway::admin::AdminConfig {
        token: Some(admin_token(&config.data_dir)?),
        audit_log: Some(config.data_dir.join("audit.log")),
    };
    let server = Server::new(services, store, sms, Arc::new(SystemClock)).await?;
    let cluster = match config.cluster.clone() {
        Some(settings) => Some(server.join_cluster(settings).await?),
        None => None,
    };
    let gateway = Gateway::start(server.clone(), transport).await.context("starting the listeners")?;
    // In the background: the listeners serve meanwhile, and an actor started
    // by its own mail first is simply not started twice.
    let resuming = server.clone();
    tokio::spawn(async move {
        if let Err(e) = resuming.resume_forwards().await {
            tracing::warn!(error = %e, "could not list the forwards left pending; each resumes when its sender's actor next starts");
        }
    });
    let (scheme, tcp) = if tls_cert.is_some() { ("https", "TCP+TLS") } else { ("http", "TCP") };
    println!(
        "Skylark is running: HTTP + WebSocket on {scheme}://{} (WebSocket at /v1/ws), {tcp} on {}; admin API and \
         metrics on http://{} (token in {}). Ctrl-C stops it.",
        gateway.http_addr(),
        gateway.tcp_addr(),
        gateway.admin_addr(),
        config.data_dir.join(ADMIN_TOKEN_FILE).display()
    );
    if let (true, Some(cert)) = (args.dev_tls, &tls_cert) {
        println!("Self-signed certificate (for local use): trust it with --ca {}", cert.display());
    }

    if let Some(cluster) = &cluster {
        // On stderr: whoever started the server may read only the line above.
        tracing::info!(node = cluster.node(), members = ?cluster.placement(), "cluster node serving");
    }
    tokio::select! {
        _ = shutdown_signal() => {}
        _ = drained(&server, cluster.as_deref()) => {
            tracing::info!("drained: every actor moved to the other nodes; stopping");
        }
        why = disk_failed(disk_failure) => {
            // No graceful steps: they would write. What was not acknowledged
            // is resent by its clients; what was is on disk.
            tracing::error!(%why, "stopping at once; start again to recover from what is on disk");
            anyhow::bail!(
                "{why}. Skylark stopped at once, so that it starts again from what is on the disk: nothing that \
                 failed to be written was acknowledged, and clients resend it. Check the disk (dmesg), then start \
                 Skylark again (under systemd it restarts by itself)."
            );
        }
    }
    if let Some(cluster) = &cluster {
        // The others take this node's actors now, not when its lease lapses.
        hand_over(&server, cluster).await;
    }
    tracing::info!("shutting down: closing connections");
    gateway.shutdown(DRAIN).await;
    server.shutdown().await;
    if let Some(cluster) = cluster {
        cluster.leave().await;
    }
    drop(server);
    tracing::info!("stopped cleanly");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_file_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("skylark.toml");
        std::fs::write(
            &path,
            r#"
data_dir = "/srv/skylark"
[listen]
http = "127.0.0.1:9000"
[limits]
idle_timeout_ms = 30000
[rate_limits]
sms_per_number = { burst = 1, per_ms = 60000 }
"#,
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            data_dir: None,
            store: Vec::new(),
            cluster_node: None,
            nats: Vec::new(),
            advertise: None,
            http: None,
            tcp: Some("127.0.0.1:9001".parse().unwrap()),
            admin: None,
            tls_cert: None,
            tls_key: None,
            dev_tls: false,
            log: "info".into(),
        };
        let config = load_config(&args).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/srv/skylark"));
        assert_eq!(config.listen.http, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(config.listen.tcp, "127.0.0.1:9001".parse().unwrap());
        assert_eq!(config.limits.idle_timeout_ms, 30_000);
        assert_eq!(config.rate_limits.sms_per_number.burst, 1);
        assert_eq!(config.limits.max_frame_bytes, Config::default().limits.max_frame_bytes);
    }

    #[tokio::test]
    async fn the_committers_priority_is_a_setting_checked_before_the_store_opens() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config { data_dir: dir.path().to_owned(), ..Config::default() };
        config.store.committer_nice = 25;
        let refused = open_store(&config).await.err().expect("25 is refused").to_string();
        assert!(refused.contains("store.committer_nice = 25 is out of range: use 0"), "{refused}");
        assert!(!dir.path().join("skylark.redb").exists(), "refused before the store is created");
        config.store.committer_nice = 0;
        let (store, _) = open_store(&config).await.unwrap();
        drop(store);
        assert!(dir.path().join("skylark.redb").exists());
    }

    #[test]
    fn dev_tls_makes_a_certificate_once_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let args = ServeArgs {
            config: None,
            data_dir: Some(dir.path().to_owned()),
            store: vec!["postgres://db.example/skylark".into()],
            cluster_node: None,
            nats: Vec::new(),
            advertise: None,
            http: None,
            tcp: None,
            admin: None,
            tls_cert: None,
            tls_key: None,
            dev_tls: true,
            log: "info".into(),
        };
        let first = load_config(&args).unwrap();
        assert_eq!(first.store.shards, vec!["postgres://db.example/skylark".to_string()], "--store names the database");
        let cert = first.tls.cert_file.clone().unwrap();
        let pem = std::fs::read_to_string(&cert).unwrap();
        assert!(pem.contains("BEGIN CERTIFICATE"));
        let again = load_config(&args).unwrap();
        assert_eq!(std::fs::read_to_string(again.tls.cert_file.unwrap()).unwrap(), pem, "kept, not remade");
        skylark_gateway::tls::server_config(&cert, &first.tls.key_file.unwrap()).unwrap();
    }

    /// The README's "All keys, with their defaults" block.
    fn readme_config_block() -> &'static str {
        let readme = include_str!("../../../README.md");
        let start = readme.find("All keys, with their").expect("README lists the configuration keys");
        let block = &readme[start..];
        let block = &block[block.find("```toml").expect("a toml block follows") + 7..];
        &block[..block.find("```").expect("the block ends")]
    }

    /// Every key path of a TOML table (nested tables as `a.b`).
    fn key_paths(prefix: &str, value: &toml::Value, out: &mut Vec<String>) {
        if let toml::Value::Table(table) = value {
            for (key, inner) in table {
                let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                // Quotas are documented as inline tables: the table is the key.
                if matches!(inner, toml::Value::Table(t) if !t.contains_key("burst")) {
                    key_paths(&path, inner, out);
                } else {
                    out.push(path);
                }
            }
        }
    }

    #[test]
    fn the_readme_configuration_is_the_defaults_and_names_every_key() {
        let text = readme_config_block();
        let parsed: Config = toml::from_str(text).expect("the README's configuration parses");
        assert_eq!(parsed, Config::default(), "the README's values are the defaults");
        let documented: toml::Value = toml::from_str(text).expect("parses as TOML");
        let defaults = toml::Value::try_from(Config::default()).expect("the defaults serialise");
        let (mut want, mut have) = (Vec::new(), Vec::new());
        key_paths("", &defaults, &mut want);
        key_paths("", &documented, &mut have);
        // Keys without a default value (optional files, URLs) are shown
        // commented out; every other key must be written out.
        let missing: Vec<&String> = want.iter().filter(|k| !have.contains(k)).collect();
        assert!(missing.is_empty(), "README.md's configuration lacks {missing:?}");
    }

    /// The configuration types' fields, from the sources: struct name →
    /// (field, its type, its doc comment) in declaration order.
    fn config_fields() -> std::collections::HashMap<String, Vec<(String, String, String)>> {
        let crates = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let files = [
            "skylark-gateway/src/config.rs",
            "skylark-server/src/config.rs",
            "skylark-server/src/messaging.rs",
            "skylark-server/src/devices.rs",
            "skylark-server/src/push.rs",
            "skylark-server/src/media.rs",
            "skylark-server/src/cluster/mod.rs",
            "skylark-server/src/actor/machine.rs",
            "skylark-core/src/verification.rs",
        ];
        let mut structs = std::collections::HashMap::new();
        for file in files {
            let text = std::fs::read_to_string(crates.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
            let (mut current, mut doc): (Option<String>, Vec<String>) = (None, Vec::new());
            for line in text.lines() {
                let trimmed = line.trim();
                if let Some(rest) = line.strip_prefix("pub struct ") {
                    // The first of two structs of one name wins (the
                    // gateway's `Limits` holds the services' too).
                    current = rest.strip_suffix(" {").map(str::to_owned).filter(|n| !structs.contains_key(n));
                    doc.clear();
                } else if line == "}" {
                    current = None;
                } else if let Some(name) = &current {
                    if let Some(text) = trimmed.strip_prefix("///") {
                        doc.push(text.trim().to_owned());
                    } else if let Some(field) = trimmed.strip_prefix("pub ") {
                        if let Some((key, ty)) = field.split_once(": ") {
                            let entry = (key.to_owned(), ty.trim_end_matches(',').to_owned(), doc.join(" "));
                            structs.entry(name.clone()).or_insert_with(Vec::new).push(entry);
                        }
                        doc.clear();
                    } else if !trimmed.starts_with("#[") {
                        doc.clear();
                    }
                }
            }
        }
        structs
    }

    /// A value as it is written in the file.
    fn toml_text(v: &toml::Value) -> String {
        match v {
            toml::Value::String(s) => serde_json::to_string(s).unwrap(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Datetime(d) => d.to_string(),
            toml::Value::Array(items) => format!("[{}]", items.iter().map(toml_text).collect::<Vec<_>>().join(", ")),
            toml::Value::Table(t) => {
                let pairs: Vec<String> = t.iter().map(|(k, v)| format!("{k} = {}", toml_text(v))).collect();
                if pairs.is_empty() { "{}".to_owned() } else { format!("{{ {} }}", pairs.join(", ")) }
            }
        }
    }

    /// docs/CONFIG.md, generated: every key of the file with its default
    /// (from `Config::default()`) and what it does (the field's doc comment).
    fn config_doc() -> String {
        let structs = config_fields();
        let defaults = toml::Value::try_from(Config::default()).expect("the defaults serialise");
        let mut out = String::from(
            "# Configuration\n\n<!-- Generated from the configuration types by the test \
             `serve::tests::docs_config_md_is_current`; do not edit by hand. To regenerate: \
             SKYLARK_WRITE_DOCS=1 cargo test -p skylark --bin skylark docs_config_md -->\n\n\
             `skylark serve --config FILE` reads a TOML file with these keys; every key is optional \
             (omitted keys keep the default shown) and an unknown key is an error. Flags and \
             environment variables override the file (README.md, \"Running the server\"). What each \
             limit does when reached: docs/LIMITS.md. A rate limit is written `{ burst = N, per_ms = M }`: \
             N at once, then one more every M milliseconds.\n",
        );
        fn section(
            out: &mut String,
            structs: &std::collections::HashMap<String, Vec<(String, String, String)>>,
            ty: &str,
            path: &str,
            defaults: Option<&toml::Value>,
            about: &str,
        ) {
            let fields = structs.get(ty).unwrap_or_else(|| panic!("no struct {ty} in the configuration sources"));
            let mut nested = Vec::new();
            let mut rows = String::new();
            for (key, field_ty, doc) in fields {
                let inner = field_ty.trim_start_matches("Option<").trim_end_matches('>');
                let value = defaults.and_then(|d| d.get(key));
                // A rate limit is one value, `{ burst, per_ms }`.
                if structs.contains_key(inner) && inner != "Quota" {
                    nested.push((key.clone(), inner.to_owned(), value.cloned(), doc.clone()));
                    continue;
                }
                let shown = match value {
                    Some(v) => format!("`{}`", toml_text(v).replace('|', "\\|")),
                    None => "none".to_owned(),
                };
                let doc = if doc.is_empty() { "—".to_owned() } else { doc.replace('|', "\\|") };
                rows.push_str(&format!("| `{key}` | {shown} | {doc} |\n"));
            }
            if !rows.is_empty() {
                let title = if path.is_empty() { "Top level".to_owned() } else { format!("`[{path}]`") };
                let about = if about.is_empty() { String::new() } else { format!("{about}\n\n") };
                out.push_str(&format!(
                    "\n## {title}\n\n{about}| key | default | what it does |\n| --- | --- | --- |\n{rows}"
                ));
            }
            for (key, inner, value, doc) in nested {
                let path = if path.is_empty() { key } else { format!("{path}.{key}") };
                section(out, structs, &inner, &path, value.as_ref(), &doc);
            }
        }
        section(&mut out, &structs, "Settings", "", Some(&defaults), "");
        out.push_str(
            "\n## `[sms]`\n\n| key | default | what it does |\n| --- | --- | --- |\n\
             | `provider` | `\"console\"` | `console` prints codes in the server log; `http` POSTs JSON \
             `{\"to\", \"text\", \"code\"}` to `url` |\n\
             | `url` | none | with `http`: where to POST |\n\
             | `headers` | `{}` | with `http`: headers to send (an API key) |\n\
             | `timeout_ms` | `5000` | with `http`: how long one attempt may take |\n",
        );
        out
    }

    #[test]
    fn docs_config_md_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/CONFIG.md");
        let generated = config_doc();
        if std::env::var_os("SKYLARK_WRITE_DOCS").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/CONFIG.md is not what the configuration types say; regenerate it with \
             SKYLARK_WRITE_DOCS=1 cargo test -p skylark --bin skylark docs_config_md"
        );
        assert!(!generated.contains("| — |"), "a configuration field has no doc comment:\n{generated}");
        // Every key of the defaults is in it.
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        let mut keys = Vec::new();
        key_paths("", &defaults, &mut keys);
        for key in keys {
            let last = key.rsplit('.').next().unwrap();
            assert!(generated.contains(&format!("| `{last}` |")), "docs/CONFIG.md lacks {key}");
        }
    }

    #[test]
    fn typo_in_config_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("skylark.toml");
        std::fs::write(&path, "[limits]\nidle_timeout = 5\n").unwrap();
        let args = ServeArgs {
            config: Some(path),
            data_dir: None,
            store: Vec::new(),
            cluster_node: None,
            nats: Vec::new(),
            advertise: None,
            http: None,
            tcp: None,
            admin: None,
            tls_cert: None,
            tls_key: None,
            dev_tls: false,
            log: "info".into(),
        };
        let err = format!("{:#}", load_config(&args).unwrap_err());
        assert!(err.contains("unknown field"), "{err}");
    }
}
