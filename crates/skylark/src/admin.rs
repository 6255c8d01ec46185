//! `skylark admin …`, `skylark backup` and `skylark restore`: the
//! operator's commands. The first two talk to a running server's admin
//! listener (its token read from the data directory, or given); `restore`
//! works on a stopped server's data directory.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde::Deserialize;
use serde_json::{Value, json};
use skylark_client::ClientError;
use skylark_client::api::Api;
use skylark_core::words;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct AdminArgs {
    /// The server's admin listener.
    #[arg(long = "admin", env = "SKYLARK_ADMIN_URL", default_value = "http://127.0.0.1:7482", global = true)]
    url: String,
    /// The admin token [default: read from admin.token in --data-dir].
    #[arg(long, env = "SKYLARK_ADMIN_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// The server's data directory, where its admin token is kept.
    #[arg(long, env = "SKYLARK_DATA_DIR", default_value = "./skylark-data", global = true)]
    data_dir: PathBuf,
}

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Version, uptime and live connections.
    Stats,
    /// An account by phone number: its devices, which are connected.
    Account {
        /// The phone number in international form.
        phone: String,
    },
    /// End a device's live connection (it may connect again).
    Disconnect {
        /// The device's number (see `admin account`).
        device: u64,
    },
    /// Ban a number: refused at sign-up and when its devices connect
    /// (those connected now are disconnected).
    Ban {
        /// The phone number in international form.
        phone: String,
    },
    /// Delete an account for good: it leaves its groups, its devices are
    /// signed out, its number is freed (as its owner's `account delete`).
    DeleteAccount {
        /// The phone number in international form.
        phone: String,
    },
    /// Lift a ban.
    Unban {
        /// The phone number in international form.
        phone: String,
    },
    /// The banned numbers.
    Bans,
    /// Conversations users reported, newest first.
    Reports,
    /// A message's lifecycle, without its content: accepted, forwarded,
    /// stored for the recipient, on which devices, receipts.
    Trace {
        /// ACCOUNT:SEQ, as `skylark send` prints it.
        message: String,
    },
    /// Send a test SMS through the server's SMS provider.
    TestSms {
        /// The phone number in international form.
        phone: String,
    },
    /// Send a device one wake-up through its push registration.
    TestPush {
        /// The device's number (see `admin account`).
        device: u64,
    },
    /// A consistent copy of the embedded store, made while the server runs.
    Backup {
        /// The file to write (must not exist), on the server's machine.
        dest: PathBuf,
    },
}

impl AdminArgs {
    fn api(&self) -> Result<Api> {
        let token = match &self.token {
            Some(t) => t.clone(),
            None => {
                let path = self.data_dir.join(crate::serve::ADMIN_TOKEN_FILE);
                std::fs::read_to_string(&path).map(|t| t.trim().to_owned()).with_context(|| {
                    format!("reading the admin token {} (give the server's --data-dir, or --token)", path.display())
                })?
            }
        };
        Ok(Api::new(&self.url).map_err(anyhow::Error::new)?.with_bearer(&token))
    }

    async fn call<T: serde::de::DeserializeOwned>(&self, method: &str, path: &str, body: Option<Value>) -> Result<T> {
        self.api()?.call(method, path, body).await.map_err(|e| match e {
            ClientError::Io(why) => anyhow::anyhow!(
                "cannot reach the admin API at {} ({why}); is the server running, and is that its --admin address?",
                self.url
            ),
            other => anyhow::Error::new(other),
        })
    }
}

#[derive(Deserialize)]
struct Stats {
    version: String,
    uptime_seconds: u64,
    live_connections: u64,
    #[serde(default)]
    cluster_connections: Option<u64>,
    #[serde(default)]
    unanswered_nodes: u64,
    ready: bool,
}

/// A note on cluster nodes that did not answer, or nothing.
fn unanswered(n: u64) -> String {
    match n {
        0 => String::new(),
        n => format!(" ({} did not answer in time)", words::count(n, "cluster node", "cluster nodes")),
    }
}

#[derive(Deserialize)]
struct AccountView {
    account_id: u64,
    phone: String,
    devices: Vec<DeviceView>,
}

#[derive(Deserialize)]
struct DeviceView {
    id: u64,
    name: String,
    last_seen_ms: Option<u64>,
    connected: bool,
}

#[derive(Deserialize)]
struct Disconnected {
    device: u64,
    was_connected: bool,
    #[serde(default)]
    unanswered_nodes: u64,
}

#[derive(Deserialize)]
struct BackupMade {
    dest: String,
    rows: u64,
    bytes: u64,
    seconds: f64,
}

fn ago(ms: u64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64);
    let elapsed = now.unwrap_or(ms).saturating_sub(ms);
    format!("last seen {} ago", words::wait(elapsed.max(1000)))
}

pub async fn run(args: &AdminArgs, command: &AdminCommand) -> Result<()> {
    match command {
        AdminCommand::Stats => {
            let s: Stats = args.call("GET", "/admin/v1/stats", None).await?;
            let cluster = match s.cluster_connections {
                Some(n) => format!(
                    " on this node, {} in the whole cluster{}",
                    words::count(n, "live connection", "live connections"),
                    unanswered(s.unanswered_nodes)
                ),
                None => String::new(),
            };
            println!(
                "Skylark {}, up {}; {}{cluster}; {}.",
                s.version,
                words::wait(s.uptime_seconds.max(1) * 1000),
                words::count(s.live_connections, "live connection", "live connections"),
                if s.ready { "ready" } else { "not ready (starting or stopping)" }
            );
        }
        AdminCommand::Account { phone } => {
            let a: AccountView = args.call("GET", &format!("/admin/v1/accounts/{phone}"), None).await?;
            println!(
                "{} is account {}, with {}:",
                a.phone,
                a.account_id,
                words::count(a.devices.len() as u64, "device", "devices")
            );
            for d in &a.devices {
                let state = if d.connected {
                    "connected".to_owned()
                } else {
                    d.last_seen_ms.map(ago).unwrap_or_else(|| "never connected".into())
                };
                println!("  device {} \"{}\": {state}", d.id, d.name);
            }
        }
        AdminCommand::Disconnect { device } => {
            let d: Disconnected = args.call("POST", &format!("/admin/v1/devices/{device}/disconnect"), None).await?;
            if d.was_connected {
                println!("Device {} was disconnected (it may connect again).", d.device);
            } else {
                println!("Device {} had no live connection{}.", d.device, unanswered(d.unanswered_nodes));
            }
        }
        AdminCommand::Ban { phone } => {
            let b: Value = args.call("POST", "/admin/v1/bans", Some(json!({ "phone": phone }))).await?;
            let n = b["disconnected"].as_u64().unwrap_or(0);
            println!(
                "{} is banned: refused at sign-up and when its devices connect ({} disconnected now{}).",
                b["phone"].as_str().unwrap_or(phone),
                words::count(n, "device", "devices"),
                unanswered(b["unanswered_nodes"].as_u64().unwrap_or(0))
            );
        }
        AdminCommand::DeleteAccount { phone } => {
            let d: Value = args.call("DELETE", &format!("/admin/v1/accounts/{phone}"), None).await?;
            println!(
                "Deleted {}: {} device(s) signed out, left {} group(s).",
                d["phone"].as_str().unwrap_or(phone),
                d["devices_removed"],
                d["groups_left"]
            );
        }
        AdminCommand::Trace { message } => {
            let t: Value = args.call("GET", &format!("/admin/v1/messages/{message}"), None).await?;
            let when = |v: &Value| v.as_u64().map(|ms| format!("{}:{:02}", crate::devices::utc(ms), (ms / 1000) % 60));
            println!(
                "Message {} ({} bytes) from {} (device {}) to {}",
                t["message"].as_str().unwrap_or(message),
                t["bytes"],
                t["sender_phone"].as_str().unwrap_or("?"),
                t["sender_device"],
                t["to_name"].as_str().unwrap_or("?")
            );
            if let Some(at) = when(&t["accepted_at_ms"]) {
                println!("  {at}  accepted and stored (one tick)");
            }
            let group = t["to"].as_u64().is_some_and(|to| skylark_core::AccountId(to).is_group());
            if !group {
                match (t["recipient_log_seq"].as_u64(), t["forward_pending"].as_bool()) {
                    (Some(seq), _) => println!("  stored for the recipient (their log, #{seq})"),
                    (None, Some(true)) => println!("  still being forwarded (in the sender's outbox)"),
                    (None, _) => println!("  not stored for the recipient (blocked, or the account was deleted)"),
                }
            }
            for r in t["reached"].as_array().cloned().unwrap_or_default() {
                let what = if group { "member" } else { "device" };
                let has = match (r["delivered"].as_bool(), r["read"].as_bool()) {
                    (Some(true), Some(true)) => "has it, read",
                    (Some(true), _) => "has it",
                    _ => "not yet",
                };
                println!("  {what} {} {}: {has}", r["who"], r["name"].as_str().unwrap_or(""));
            }
            if let Some(at) = when(&t["delivered_receipt_at_ms"]) {
                println!("  {at}  delivery receipt back to the sender (two ticks)");
            }
            if let Some(at) = when(&t["read_receipt_at_ms"]) {
                println!("  {at}  read receipt back to the sender");
            }
            if let Some(note) = t["note"].as_str() {
                println!("  ({note})");
            }
        }
        AdminCommand::Reports => {
            let reports: Value = args.call("GET", "/admin/v1/reports", None).await?;
            let list = reports.as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("No reports.");
            }
            for r in list {
                println!(
                    "#{} {}: {} reported {}{}",
                    r["id"],
                    crate::devices::utc(r["at_ms"].as_u64().unwrap_or(0)),
                    r["reporter"].as_str().unwrap_or("?"),
                    r["reported"].as_str().unwrap_or("?"),
                    if r["blocked"].as_bool() == Some(true) { " (and blocked)" } else { "" }
                );
                for m in r["messages"].as_array().cloned().unwrap_or_default() {
                    println!(
                        "    {} from {}, {} bytes (message {})",
                        crate::devices::utc(m["sent_at_ms"].as_u64().unwrap_or(0)),
                        m["sender"].as_str().unwrap_or("?"),
                        m["bytes"],
                        m["seq"]
                    );
                }
            }
        }
        AdminCommand::Unban { phone } => {
            let u: Value = args.call("DELETE", &format!("/admin/v1/bans/{phone}"), None).await?;
            let number = u["phone"].as_str().unwrap_or(phone);
            if u["was_banned"].as_bool() == Some(true) {
                println!("{number} is no longer banned.");
            } else {
                println!("{number} was not banned.");
            }
        }
        AdminCommand::Bans => {
            let listed: Vec<Value> = args.call("GET", "/admin/v1/bans", None).await?;
            if listed.is_empty() {
                println!("No number is banned.");
            }
            for b in listed {
                let at = b["at_ms"].as_u64().map(ago).unwrap_or_default().replace("last seen", "banned");
                println!("{}  ({at})", b["phone"].as_str().unwrap_or("?"));
            }
        }
        AdminCommand::TestSms { phone } => {
            let t: Value = args.call("POST", "/admin/v1/test/sms", Some(json!({ "phone": phone }))).await?;
            println!("{}.", t["outcome"].as_str().unwrap_or("done"));
        }
        AdminCommand::TestPush { device } => {
            let t: Value = args.call("POST", &format!("/admin/v1/test/push/{device}"), None).await?;
            println!("{}.", t["outcome"].as_str().unwrap_or("done"));
        }
        AdminCommand::Backup { dest } => {
            // The server writes the file: give it a full path.
            let dest = if dest.is_absolute() { dest.clone() } else { std::env::current_dir()?.join(dest) };
            let made: BackupMade = args.call("POST", "/admin/v1/backup", Some(json!({ "dest": dest }))).await?;
            println!(
                "Backup written to {}: {} rows, {:.1} MB, in {:.1} s. Restore it with `skylark restore {}` (server stopped).",
                made.dest,
                made.rows,
                made.bytes as f64 / 1e6,
                made.seconds,
                made.dest
            );
        }
    }
    Ok(())
}

/// Puts the backup `from` in place as the store of `data_dir`. The server
/// must be stopped; an existing store is kept beside it, renamed.
pub fn restore(from: &Path, data_dir: &Path, force: bool) -> Result<()> {
    // The backup must be a store this binary can open (not damaged, not newer).
    drop(skylark_store::RedbStore::open(from).map_err(|e| anyhow::anyhow!("cannot restore {}: {e}", from.display()))?);
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let target = data_dir.join("skylark.redb");
    if target.exists() {
        let file = std::fs::File::open(&target).with_context(|| format!("opening {}", target.display()))?;
        if file.try_lock().is_err() {
            bail!("{} is in use by a running server; stop it, then restore", target.display());
        }
        drop(file);
        if !force {
            bail!(
                "{} exists; restoring replaces it. Add --force to restore anyway (the current file is kept beside it)",
                target.display()
            );
        }
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let aside = data_dir.join(format!("skylark.redb.before-restore-{secs}"));
        std::fs::rename(&target, &aside).with_context(|| format!("moving {} aside", target.display()))?;
        println!("The store that was there is kept as {}.", aside.display());
    }
    let tmp = data_dir.join("skylark.redb.restoring");
    std::fs::copy(from, &tmp).with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    skylark_store::sync_path(&tmp).with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, &target).with_context(|| format!("moving the copy to {}", target.display()))?;
    skylark_store::sync_path(data_dir).with_context(|| format!("syncing {}", data_dir.display()))?;
    println!(
        "Restored {} into {}; start the server with --data-dir {}.",
        from.display(),
        target.display(),
        data_dir.display()
    );
    Ok(())
}
