//! `skylark-load`: run a load scenario against a Skylark server and print
//! a summary table; `--report FILE` also writes the JSON report.
//! See docs/BENCHMARKS.md for the commands behind the published figures.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use skylark_client::Endpoint;
use skylark_client::TlsClient;
use skylark_load::provision::{Manifest, provision};
use skylark_load::scenarios::{self, IdleReport, Target};
use skylark_load::stats::{Latency, cpu_seconds, rss_kib};
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command as Process, Stdio};
use std::time::Duration;

#[derive(Parser)]
#[command(name = "skylark-load", about = "Load generator for Skylark")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write N test accounts into a stopped server's data directory.
    Provision {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        accounts: usize,
        #[arg(long, default_value = "skylark-load")]
        seed: String,
        /// Where to write the manifest the scenarios read.
        #[arg(long)]
        manifest: PathBuf,
    },
    /// Many idle authenticated connections: connect latency, server memory per connection.
    Idle(IdleArgs),
    /// Print a media token (for the attachments' HTTP endpoints) of account
    /// INDEX of the manifest, for benchmarks that upload with curl
    /// (bench/media.sh).
    MediaToken {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 0)]
        index: usize,
    },
    /// Open-loop 1:1 traffic between online pairs.
    Chat {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 100)]
        pairs: usize,
        #[command(flatten)]
        traffic: Traffic,
    },
    /// Open-loop 1:1 traffic among online users, each message to another
    /// user chosen at random (everyone sends and receives).
    Mesh {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 2000)]
        users: usize,
        #[command(flatten)]
        traffic: Traffic,
    },
    /// Kill -9 the server with clients connected and restart it: reconnect
    /// time, messages lost or duplicated.
    Storm {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// The `skylark` binary to run as the server.
        #[arg(long, default_value = "./target/release/skylark")]
        server_bin: PathBuf,
        /// The server's data directory (provisioned).
        #[arg(long)]
        data_dir: PathBuf,
        /// Pin the server to this core (taskset), as in the other runs.
        #[arg(long)]
        server_core: Option<u32>,
    },
    /// A cluster loses a node: how long the devices it dropped take to be
    /// back and serving on the other nodes. Connects its clients over every
    /// node given with --tcp, prints "ready", then waits for --kill-file to
    /// hold the kill's time (milliseconds since the Unix epoch, written by
    /// whoever kills the node).
    Failover {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// Use accounts from this index on.
        #[arg(long, default_value_t = 0)]
        offset: usize,
        /// Clients started per second.
        #[arg(long, default_value_t = 300.0)]
        rate: f64,
        #[arg(long)]
        kill_file: PathBuf,
        /// Keep measuring at least this long after the kill (past the
        /// killed node's lease, when the last streams end).
        #[arg(long, default_value_t = 20.0)]
        settle_secs: f64,
    },
    /// Fan-out: one group of N members, all online; posts at a set rate.
    Group {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1024)]
        members: usize,
        /// Posts in all.
        #[arg(long, default_value_t = 100)]
        messages: u64,
        /// Posts per second.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// Members taking turns to post.
        #[arg(long, default_value_t = 8)]
        senders: usize,
        #[arg(long, default_value_t = 100)]
        payload: usize,
    },
    /// An end-to-end encrypted group of N full SDK devices (MLS state in
    /// profiles under --profiles): its start, a message, a removal before
    /// and after members' first posts (each commits fresh keys first).
    E2eeGroup {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1024)]
        members: usize,
        /// Members who post once, one after another, between the removals.
        #[arg(long, default_value_t = 16)]
        first_posts: usize,
        /// The posters are the first members (neighbours in the tree)
        /// instead of members spread over the group.
        #[arg(long)]
        consecutive: bool,
        /// An empty directory for the devices' profiles.
        #[arg(long)]
        profiles: PathBuf,
    },
    /// Messages to offline users, then everyone connects and drains.
    Backlog {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 1000)]
        users: usize,
        #[arg(long, default_value_t = 50)]
        per_user: usize,
    },
}

/// The open-loop 1:1 traffic of `chat` and `mesh`.
#[derive(Args, Clone)]
struct Traffic {
    /// Messages per second in all.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    #[arg(long, default_value_t = 100)]
    payload: usize,
}

/// Prints a `chat` or `mesh` report under its first line.
fn print_traffic(head: &str, r: &scenarios::ChatReport) {
    println!(
        "{head}, target {:.0} msgs/s for {:.0} s: sent {}, acked {}, delivered {}, receipted {}, errors {}",
        r.target_rate, r.seconds, r.sent, r.acked, r.delivered, r.receipted, r.errors
    );
    println!("  sustained {:.0} acknowledged msgs/s", r.acked_per_second);
    println!("  send -> ack (✓)       {}", r.send_to_ack);
    println!("  send -> delivered     {}", r.send_to_deliver);
    println!("  send -> receipt (✓✓)  {}", r.send_to_receipt);
}

#[derive(Args, Clone)]
struct Common {
    #[arg(long)]
    manifest: PathBuf,
    /// The server's HTTP address.
    #[arg(long, default_value = "http://127.0.0.1:7480")]
    server: String,
    /// Use raw TCP at this address (default: WebSocket on the HTTP address).
    /// Several, comma-separated (the nodes of a cluster): each client
    /// connects to one of them, chosen at random.
    #[arg(long)]
    tcp: Option<String>,
    /// Connect from this many loopback addresses, 127.0.0.1 upwards.
    #[arg(long, default_value_t = 1)]
    sources: u8,
    /// Connect over TLS, trusting this CA certificate (PEM) besides the web
    /// PKI roots: `skylark serve --dev-tls` writes its own as
    /// DATA_DIR/dev-tls/cert.pem. With `--tcp` the raw TCP listener is
    /// reached through TLS; without it, `--server` must be an https:// URL.
    #[arg(long, value_name = "PEM")]
    ca: Option<PathBuf>,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct IdleArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long)]
    connections: usize,
    /// Use accounts from this index on.
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// New connections per second, in all.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Keep the connections this long after the ramp.
    #[arg(long, default_value_t = 5.0)]
    hold_secs: f64,
    /// The server's process id, to read its memory from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// With `--server-pid`: read the server's memory again this long after
    /// the ramp, every connection still open (before the hold).
    #[arg(long, default_value_t = 0.0)]
    settle_secs: f64,
    /// Spread the connections over this many processes (one process can
    /// hold about 19,900 sockets here).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Internal: run as worker process (syncs with the parent on stdin/stdout).
    #[arg(long, hide = true)]
    worker: bool,
}

impl Common {
    fn target(&self) -> Result<Target> {
        let tls = match &self.ca {
            Some(ca) => Some(TlsClient::new(Some(ca)).map_err(|e| anyhow::anyhow!("{e}"))?),
            None => None,
        };
        let wrap = |endpoint: Endpoint| match &tls {
            Some(tls) => Endpoint::Tls(Box::new(endpoint), tls.clone()),
            None => endpoint,
        };
        let endpoint = match &self.tcp {
            Some(list) if list.contains(',') => {
                Endpoint::Any(list.split(',').map(|a| wrap(Endpoint::Tcp(a.trim().to_owned()))).collect())
            }
            Some(addr) => wrap(Endpoint::Tcp(addr.clone())),
            None => wrap(Endpoint::websocket_for(&self.server, false)),
        };
        let sources = (1..=self.sources.max(1)).map(|i| IpAddr::from([127, 0, 0, i])).collect();
        Ok(Target { http_base: self.server.clone(), endpoint, sources })
    }

    fn write(&self, report: &impl serde::Serialize) -> Result<()> {
        let json = serde_json::to_string_pretty(report)?;
        if let Some(path) = &self.report {
            std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("report written to {}", path.display());
        }
        Ok(())
    }
}

fn print_idle(r: &IdleReport) {
    println!(
        "idle: {} connections ({} failed) in {:.2} s = {:.0} connects/s",
        r.connections, r.failed, r.ramp_seconds, r.connects_per_second
    );
    println!("  connect + authenticate  {}", r.connect_latency);
    if let (Some(b), Some(a)) = (r.server_rss_before_kib, r.server_rss_after_kib) {
        println!("  server RSS {} KiB -> {} KiB", b, a);
    }
    if let Some(per) = r.server_bytes_per_connection {
        println!("  server memory per connection: {per:.0} bytes");
    }
    if let (Some(a), Some(per)) = (r.server_rss_settled_kib, r.server_bytes_per_connection_settled) {
        println!("  settled: server RSS {a} KiB, {per:.0} bytes per connection");
    }
    if let Some(cpu) = r.server_cpu_seconds {
        println!("  server CPU during the ramp: {cpu:.2} s ({:.0} µs per connection)", per_connection(cpu, r));
    }
    if let Some(cpu) = r.client_cpu_seconds {
        println!("  load tool CPU during the ramp: {cpu:.2} s ({:.0} µs per connection)", per_connection(cpu, r));
    }
}

/// The server's CPU time since `before` (seconds), if its pid is known.
fn server_cpu_after(pid: Option<u32>, before: Option<f64>) -> Option<f64> {
    let now = cpu_seconds(&pid?.to_string())?;
    Some(now - before?)
}

fn per_connection(seconds: f64, r: &IdleReport) -> f64 {
    seconds * 1e6 / r.connections.max(1) as f64
}

async fn idle(args: IdleArgs) -> Result<()> {
    let manifest = Manifest::load(&args.common.manifest)?;
    if args.offset + args.connections > manifest.accounts.len() {
        bail!("the manifest has {} accounts; {} from {} asked", manifest.accounts.len(), args.connections, args.offset);
    }
    let target = args.common.target()?;
    if args.worker {
        // Ramp, tell the parent, wait for its go, hold, report.
        let hold = async {
            println!("RAMPED");
            let _ = std::io::stdout().flush();
            let mut line = String::new();
            let _ = tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line)).await;
            tokio::time::sleep(Duration::from_secs_f64(args.hold_secs)).await;
        };
        let range = args.offset..args.offset + args.connections;
        let (report, sessions) = scenarios::idle(&target, &manifest, range, args.rate, hold, true).await;
        println!("REPORT {}", serde_json::to_string(&report)?);
        drop(sessions);
        return Ok(());
    }
    let before = args.server_pid.and_then(rss_kib);
    let workers = args.workers.max(1);
    let report = if workers == 1 {
        let range = args.offset..args.offset + args.connections;
        let server_cpu = args.server_pid.and_then(|pid| cpu_seconds(&pid.to_string()));
        let (mut report, sessions) = scenarios::idle(&target, &manifest, range, args.rate, async {}, false).await;
        // Measured right after the ramp, with every connection open.
        report.server_cpu_seconds = server_cpu_after(args.server_pid, server_cpu);
        scenarios::server_memory(&mut report, args.server_pid, before);
        if args.settle_secs > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(args.settle_secs)).await;
            report.server_rss_settled_kib = args.server_pid.and_then(rss_kib);
            report.server_bytes_per_connection_settled =
                scenarios::per_connection_bytes(before, report.server_rss_settled_kib, report.connections);
        }
        tokio::time::sleep(Duration::from_secs_f64(args.hold_secs)).await;
        drop(sessions);
        report
    } else {
        run_workers(&args, workers, before)?
    };
    print_idle(&report);
    args.common.write(&report)
}

/// Runs `workers` copies of this program, each with its share of the
/// connections; reads the server's memory once all have ramped.
fn run_workers(args: &IdleArgs, workers: usize, before: Option<u64>) -> Result<IdleReport> {
    let exe = std::env::current_exe()?;
    // From before the workers start (they make their keys first, while the
    // server waits) to the end of the last one's ramp.
    let server_cpu = args.server_pid.and_then(|pid| cpu_seconds(&pid.to_string()));
    let share = args.connections.div_ceil(workers);
    let mut children = Vec::new();
    for w in 0..workers {
        let offset = args.offset + w * share;
        let count = share.min(args.offset + args.connections - offset.min(args.offset + args.connections));
        if count == 0 {
            break;
        }
        let mut cmd = Process::new(&exe);
        cmd.args(["idle", "--worker", "--manifest"]).arg(&args.common.manifest);
        cmd.args([
            "--server",
            &args.common.server,
            "--connections",
            &count.to_string(),
            "--offset",
            &offset.to_string(),
        ]);
        cmd.args(["--rate", &(args.rate / workers as f64).to_string(), "--hold-secs", &args.hold_secs.to_string()]);
        cmd.args(["--sources", &args.common.sources.to_string()]);
        if let Some(tcp) = &args.common.tcp {
            cmd.args(["--tcp", tcp]);
        }
        if let Some(ca) = &args.common.ca {
            cmd.arg("--ca").arg(ca);
        }
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
        let stdout = BufReader::new(child.stdout.take().context("worker stdout")?);
        children.push((child, stdout));
    }
    for (_, stdout) in &mut children {
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if line.trim() != "RAMPED" {
            bail!("a worker failed before ramping: {line:?}");
        }
    }
    let after_ramp = args.server_pid.and_then(rss_kib);
    let server_cpu = server_cpu_after(args.server_pid, server_cpu);
    eprintln!("all {} workers ramped", children.len());
    // Every connection is open until the workers are told to go.
    let settled_rss = if args.settle_secs > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(args.settle_secs));
        args.server_pid.and_then(rss_kib)
    } else {
        None
    };
    let mut merged: Option<IdleReport> = None;
    let mut histogram = Latency::default();
    for (child, stdout) in &mut children {
        writeln!(child.stdin.as_mut().context("worker stdin")?, "go")?;
        for line in stdout.lines() {
            let line = line?;
            if let Some(json) = line.strip_prefix("REPORT ") {
                let r: IdleReport = serde_json::from_str(json)?;
                if let Some(h) = Latency::decode(&r.connect_histogram) {
                    histogram.merge(&h);
                }
                merged = Some(match merged.take() {
                    None => r,
                    Some(mut m) => {
                        m.connections += r.connections;
                        m.failed += r.failed;
                        m.ramp_seconds = m.ramp_seconds.max(r.ramp_seconds);
                        m.client_cpu_seconds = m.client_cpu_seconds.zip(r.client_cpu_seconds).map(|(a, b)| a + b);
                        m
                    }
                });
                break;
            }
        }
    }
    for (mut child, _) in children {
        let _ = child.wait();
    }
    let mut report = merged.context("no worker reported")?;
    report.connect_latency = histogram.summary();
    report.connect_histogram = histogram.encode();
    report.connects_per_second = report.connections as f64 / report.ramp_seconds.max(1e-9);
    report.server_cpu_seconds = server_cpu;
    report.server_rss_before_kib = before;
    report.server_rss_after_kib = after_ramp;
    report.server_bytes_per_connection = scenarios::per_connection_bytes(before, after_ramp, report.connections);
    report.server_rss_settled_kib = settled_rss;
    report.server_bytes_per_connection_settled =
        scenarios::per_connection_bytes(before, settled_rss, report.connections);
    Ok(report)
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Provision { data_dir, accounts, seed, manifest } => {
            std::fs::create_dir_all(&data_dir)?;
            let m = provision(&data_dir.join("skylark.redb"), accounts, &seed).await?;
            std::fs::write(&manifest, serde_json::to_string(&m)?)?;
            println!("provisioned {accounts} accounts; manifest in {}", manifest.display());
            Ok(())
        }
        Command::Idle(args) => idle(args).await,
        Command::MediaToken { common, index } => {
            let manifest = Manifest::load(&common.manifest)?;
            if manifest.accounts.len() <= index {
                bail!("the manifest has no account {index}");
            }
            let token =
                scenarios::media_token(&common.target()?, &manifest, index).await.map_err(anyhow::Error::msg)?;
            println!("{token}");
            Ok(())
        }
        Command::Chat { common, pairs, traffic: Traffic { rate, seconds, payload } } => {
            let manifest = Manifest::load(&common.manifest)?;
            if manifest.accounts.len() < 2 * pairs {
                bail!("chat with {pairs} pairs needs {} accounts", 2 * pairs);
            }
            let r = scenarios::chat(&common.target()?, &manifest, pairs, rate, seconds, payload).await;
            print_traffic(&format!("chat: {} pairs", r.pairs), &r);
            common.write(&r)
        }
        Command::Mesh { common, users, traffic: Traffic { rate, seconds, payload } } => {
            let manifest = Manifest::load(&common.manifest)?;
            if users < 2 || manifest.accounts.len() < users {
                bail!("mesh with {users} users needs at least 2, and {users} accounts in the manifest");
            }
            let r = scenarios::mesh(&common.target()?, &manifest, users, rate, seconds, payload).await;
            print_traffic(&format!("mesh: {users} users to random peers"), &r);
            common.write(&r)
        }
        Command::Storm { common, clients, server_bin, data_dir, server_core } => {
            let manifest = Manifest::load(&common.manifest)?;
            if manifest.accounts.len() < clients {
                bail!("storm with {clients} clients needs {clients} accounts");
            }
            let spawn = {
                let (server_bin, data_dir, http, tcp) =
                    (server_bin.clone(), data_dir.clone(), common.server.clone(), common.tcp.clone());
                move || -> Result<std::process::Child> {
                    let mut cmd = match server_core {
                        Some(core) => {
                            let mut c = Process::new("taskset");
                            c.args(["-c", &core.to_string()]).arg(&server_bin);
                            c
                        }
                        None => Process::new(&server_bin),
                    };
                    cmd.arg("serve").arg("--data-dir").arg(&data_dir).args(["--log", "warn", "--admin", "127.0.0.1:0"]);
                    cmd.args(["--http", http.trim_start_matches("http://")]);
                    if let Some(tcp) = &tcp {
                        cmd.args(["--tcp", tcp]);
                    }
                    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
                    let mut line = String::new();
                    BufReader::new(child.stdout.take().context("server stdout")?).read_line(&mut line)?;
                    if !line.contains("Skylark is running") {
                        bail!("the server did not start: {line:?}");
                    }
                    Ok(child)
                }
            };
            let child = std::sync::Arc::new(std::sync::Mutex::new(spawn()?));
            let restart = {
                let child = child.clone();
                move || async move {
                    let mut child = child.lock().unwrap_or_else(|p| p.into_inner());
                    let _ = child.kill(); // SIGKILL
                    let _ = child.wait();
                    eprintln!("server killed (SIGKILL); restarting");
                    match spawn() {
                        Ok(new) => *child = new,
                        Err(e) => eprintln!("the server did not restart: {e:#}"),
                    }
                }
            };
            let r = scenarios::storm(&common.target()?, &manifest, clients, restart).await;
            {
                let mut child = child.lock().unwrap_or_else(|p| p.into_inner());
                let _ = child.kill();
                let _ = child.wait();
            }
            println!(
                "storm: {} clients; after kill -9 and restart, {} came back; 99% back in {:.2} s, all in {:.2} s \
                 (NaN: never); acked {}, lost {}, duplicated {} (redelivered on the wire and dropped: {})",
                r.clients,
                r.reconnected,
                r.reconnect_99_seconds,
                r.reconnect_all_seconds,
                r.acked,
                r.lost,
                r.duplicated,
                r.redelivered
            );
            common.write(&r)
        }
        Command::Failover { common, clients, offset, rate, kill_file, settle_secs } => {
            let manifest = Manifest::load(&common.manifest)?;
            if manifest.accounts.len() < offset + clients {
                bail!("failover with {clients} clients from account {offset} needs {} accounts", offset + clients);
            }
            let killed = || async move {
                println!("ready: {clients} clients connected; waiting for {}", kill_file.display());
                let _ = std::io::stdout().flush();
                loop {
                    if let Ok(text) = std::fs::read_to_string(&kill_file)
                        && let Ok(ms) = text.trim().parse::<u64>()
                    {
                        return std::time::UNIX_EPOCH + Duration::from_millis(ms);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            };
            let settle = Duration::from_secs_f64(settle_secs);
            let r = scenarios::failover(&common.target()?, &manifest, (offset, clients, rate), settle, killed).await;
            println!(
                "failover: {} clients, {} dropped by the kill, {} back and serving; 50% back in {:.2} s, 99% in {:.2} s, \
                 all in {:.2} s (NaN: never); {} failed attempts on the way",
                r.clients,
                r.dropped,
                r.back,
                r.back_50_seconds,
                r.back_99_seconds,
                r.back_all_seconds,
                r.failed_attempts
            );
            common.write(&r)
        }
        Command::Group { common, members, messages, rate, senders, payload } => {
            let manifest = Manifest::load(&common.manifest)?;
            if manifest.accounts.len() < members {
                bail!("a group of {members} needs {members} accounts");
            }
            let r = scenarios::group(&common.target()?, &manifest, members, senders, messages, rate, payload).await;
            println!(
                "group: {} members, {} posts at {:.0}/s: acked {}, deliveries {} ({:.0}/s over {:.2} s), missing {}, duplicates {}",
                r.members,
                r.messages,
                r.target_rate,
                r.acked,
                r.deliveries,
                r.deliveries_per_second,
                r.seconds,
                r.missing,
                r.duplicates
            );
            println!("  post -> ack (✓)          {}", r.post_to_ack);
            println!("  post -> a member device  {}", r.post_to_device);
            println!("  post -> last device      {}", r.post_to_last_device);
            common.write(&r)
        }
        Command::E2eeGroup { common, members, first_posts, consecutive, profiles } => {
            let manifest = Manifest::load(&common.manifest)?;
            if manifest.accounts.len() < members {
                bail!("a group of {members} needs {members} accounts");
            }
            let r = skylark_load::e2ee::e2ee_group(
                &common.target()?,
                &manifest,
                members,
                first_posts,
                consecutive,
                &profiles,
            )
            .await
            .map_err(anyhow::Error::msg)?;
            let kb = |b: usize| format!("{:.1} KB", b as f64 / 1024.0);
            println!(
                "e2ee-group: {} devices, each a full SDK device; devices connected and keys published in {:.1} s",
                r.members, r.setup_seconds
            );
            println!("  start (claims, adds 32 per commit)        {:.2} s", r.start_seconds);
            println!("  start's end -> last member read message 1 {:.2} s", r.welcome_to_last_seconds);
            println!("  message -> last member read it             {:.2} s", r.message_to_last_seconds);
            println!(
                "  removal before first posts: commit {}, removal -> last member read the next message {:.2} s",
                kb(r.removal_before_bytes),
                r.removal_before_seconds
            );
            let sizes: Vec<String> = r.refresh_bytes.iter().map(|&b| kb(b)).collect();
            println!(
                "  {} first posts ({}), one after another, in {:.2} s; their key refreshes: {}",
                r.first_posts,
                if r.consecutive { "the first members" } else { "members spread over the group" },
                r.first_posts_seconds,
                sizes.join(", ")
            );
            println!(
                "  removal after first posts: commit {}, removal -> last member read the next message {:.2} s",
                kb(r.removal_after_bytes),
                r.removal_after_seconds
            );
            common.write(&r)
        }
        Command::Backlog { common, users, per_user } => {
            let manifest = Manifest::load(&common.manifest)?;
            if manifest.accounts.len() < 2 * users {
                bail!("backlog for {users} users needs {} accounts", 2 * users);
            }
            let r = scenarios::backlog(&common.target()?, &manifest, users, per_user).await;
            println!(
                "backlog: {} messages to {} offline users stored in {:.2} s ({:.0}/s); drained in {:.2} s ({:.0}/s); received {}, duplicates {}",
                r.messages,
                r.users,
                r.store_seconds,
                r.stored_per_second,
                r.drain_seconds,
                r.drained_per_second,
                r.received,
                r.duplicates
            );
            common.write(&r)
        }
    }
}
