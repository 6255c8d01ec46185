//! `skylark`: the server (`serve`) and the command-line client (`register`,
//! `whoami`) in one binary. Thin by design: argument parsing, config
//! loading and printing; the work happens in the library crates.

mod account;
mod admin;
mod blocks;
mod chat;
mod cli;
mod converse;
mod devices;
mod files;
mod groups;
mod otlp;
mod serve;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "skylark", version, about = "Skylark: a self-hostable messaging server and its CLI client")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (embedded store, nothing else to install).
    Serve(serve::ServeArgs),
    /// Manage the server's store: `store copy` moves the embedded store into PostgreSQL.
    Store {
        #[command(subcommand)]
        action: StoreCommand,
    },
    /// Cluster mode: `cluster status` lists the live nodes; `cluster drain
    /// NODE` moves a node's actors and connections away, then it stops.
    Cluster {
        #[command(subcommand)]
        action: ClusterCommand,
        /// The cluster's PostgreSQL store (as given to `serve --store`).
        #[arg(long = "store", env = "SKYLARK_STORE", value_name = "URL", global = true)]
        store: Vec<String>,
    },
    /// Operate a running server through its admin listener: stats,
    /// accounts, disconnecting a device, backups.
    Admin {
        #[command(subcommand)]
        action: admin::AdminCommand,
        #[command(flatten)]
        args: admin::AdminArgs,
    },
    /// A consistent copy of a running server's embedded store (same as
    /// `admin backup`).
    Backup {
        /// The file to write (must not exist).
        dest: PathBuf,
        #[command(flatten)]
        args: admin::AdminArgs,
    },
    /// Put a backup in place as a stopped server's store.
    Restore {
        /// The backup file (from `skylark backup`).
        from: PathBuf,
        /// The server's data directory.
        #[arg(long, env = "SKYLARK_DATA_DIR", default_value = "./skylark-data")]
        data_dir: PathBuf,
        /// Replace an existing store (it is kept beside, renamed).
        #[arg(long)]
        force: bool,
    },
    /// Register a phone number: sends an SMS code, asks for it, enrols this device.
    Register {
        /// The phone number in international form, such as +15551234567.
        phone: String,
        /// The server's HTTP address; for a cluster, several, comma-separated
        /// (kept in the profile; connections try each in turn).
        #[arg(long, env = "SKYLARK_SERVER", default_value = "http://127.0.0.1:7480")]
        server: String,
        /// A name for this device, shown in device lists.
        #[arg(long, default_value = "cli")]
        name: String,
        /// Also trust the CA certificate(s) in this PEM file (for https:// servers).
        #[arg(long, env = "SKYLARK_CA")]
        ca: Option<PathBuf>,
        #[command(flatten)]
        profile: cli::ProfileArgs,
    },
    /// Connect, authenticate with this device's key, and print who you are.
    Whoami {
        #[command(flatten)]
        profile: cli::ProfileArgs,
        #[command(flatten)]
        transport: cli::TransportArgs,
    },
    /// Link this machine to an existing account (no SMS): shows a code to
    /// approve on a signed-in device. `link approve CODE` approves one.
    #[command(args_conflicts_with_subcommands = true)]
    Link {
        #[command(subcommand)]
        approve: Option<LinkCommand>,
        /// The server's HTTP address; for a cluster, several, comma-separated
        /// (kept in the profile; connections try each in turn).
        #[arg(long, env = "SKYLARK_SERVER", default_value = "http://127.0.0.1:7480")]
        server: String,
        /// A name for this device, shown in device lists.
        #[arg(long, default_value = "linked device")]
        name: String,
        /// Also trust the CA certificate(s) in this PEM file (for https:// servers).
        #[arg(long, env = "SKYLARK_CA")]
        ca: Option<PathBuf>,
        #[command(flatten)]
        profile: cli::ProfileArgs,
    },
    /// List this account's devices; `rename` or `remove` one.
    Devices {
        #[command(subcommand)]
        action: Option<DevicesCommand>,
        #[command(flatten)]
        profile: cli::ProfileArgs,
        #[command(flatten)]
        transport: cli::TransportArgs,
    },
    /// Send one text message, or a file; returns once the server has stored
    /// it (one tick).
    Send {
        /// The recipient's phone number, or a group id.
        to: String,
        /// The text to send (with --file: its caption, optional).
        message: Option<String>,
        /// Send this file (photo, document…), encrypted; the recipient's
        /// `listen` saves it.
        #[arg(long, value_name = "PATH")]
        file: Option<std::path::PathBuf>,
        #[command(flatten)]
        profile: cli::ProfileArgs,
        #[command(flatten)]
        transport: cli::TransportArgs,
    },
    /// Reply to a message, quoting it. CONVERSATION is a phone number or a
    /// group id; MESSAGE the number `listen` or `chat` shows (#12, or
    /// #ACCOUNT:SEQ in a chat that is not end-to-end encrypted).
    Reply {
        /// A phone number (+15551234567) or a group id.
        conversation: String,
        /// The message to reply to, as `listen` shows it.
        message: String,
        /// Your reply.
        text: String,
        #[command(flatten)]
        profile: cli::ProfileArgs,
        #[command(flatten)]
        transport: cli::TransportArgs,
    },
    /// React to a message with an emoji (one reaction per person per
    /// message: a new one replaces yours; --remove takes it back).
    React {
        /// A phone number (+15551234567) or a group id.
        conversation: String,
        /// The message to react to, as `listen` shows it.
        message: String,
        /// The emoji (leave out with --remove).
        #[arg(default_value = "")]
        emoji: String,
        /// Take back your reaction.
        #[arg(long)]
        remove: bool,
        #[command(flatten)]
        profile: cli::ProfileArgs,
        #[command(flatten)]
        transport: cli::TransportArgs,
    },
    /// Change the text of a message of yours (within 15 minutes of sending
    /// it, by default); everyone sees it marked "edited".
    Edit {
        /// A phone number (+15551234567) or a group id.
        conversation: String,
        /// Your message to edit, as `listen` shows it.
        message: String,
        /// The new text.
        text: String,
        #[command(flatten)]
        profile: cli::ProfileArgs,
        #[command(flatten)]
        transport: cli::TransportArgs,
    },
    /// Delete a message of yours for everyone (within 2 days of sending it,
    /// by default): the server removes its text, every device shows that it
    /// was deleted.
    Delete {
        /// A phone number (+15551234567) or a group id.
        conversation: String,
        /// Your message to delete, as `listen` shows it.
        message: String,
        #[command(flatten)]
        profile: cli::ProfileArgs,
        #[command(flatten)]
        transport: cli::TransportArgs,
    },
    /// Forward a message to another chat (marked as forwarded).
    Forward {
        /// The chat the message is in: a phone number or a group id.
        conversation: String,
        /// The message, as `listen` shows it.
        message: String,
        /// Where to forward it: a phone number or a group id.
        to: String,
        #[command(flatten)]
        profile: cli::ProfileArgs,
        #[command(flatten)]
        transport: cli::TransportArgs,
    },
    /// Disappearing messages for a chat: off, 24h, 7d or 90d. Messages sent
    /// after this disappear that long after they are sent, from every
    /// device and from the server's store.
    Disappear {
        /// A phone number (+15551234567) or a group id.
        conversation: String,
        /// off, 24h, 7d or 90d (any length like 30m or 12h works too).
        timer: String,
        #[command(flatten)]
        profile: cli::ProfileArgs,
        #[command(flatten)]
        transport: cli::TransportArgs,
    },
    /// Block a phone number: their messages stop reaching you (they see one
    /// tick), they cannot see your presence or typing, nor add you to groups.
    Block {
        /// The phone number to block.
        phone: String,
        #[command(flatten)]
        profile: cli::ProfileArgs,
        #[command(flatten)]
        transport: cli::TransportArgs,
    },
    /// Unblock a phone number you blocked.
    Unblock {
        /// The phone number to unblock.
        phone: String,
        #[command(flatten)]
        profile: cli::ProfileArgs,
        #[command(flatten)]
        transport: cli::TransportArgs,
    },
    /// Two-step verification: `pin set` asks for a 6-digit PIN that
    /// registering this number on another phone will need; `pin off`
    /// removes it; `pin` says whether one is set.
    Pin {
        #[command(subcommand)]
        action: Option<account::PinCommand>,
        #[command(flatten)]
        profile: cli::ProfileArgs,
        #[command(flatten)]
        transport: cli::TransportArgs,
    },
    /// Your account: `account export` (what the server keeps about it, as
    /// JSON) and `account delete`.
    Account {
        #[command(subcommand)]
        action: account::AccountCommand,
        #[command(flatten)]
        profile: cli::ProfileArgs,
        #[command(flatten)]
        transport: cli::TransportArgs,
    },
    /// Report a conversation to the server's operator (the last few
    /// messages' times and sizes go with it, never their text).
    Report {
        /// The other person's phone number.
        #[arg(required_unless_present = "group")]
        phone: Option<String>,
        /// Report this group instead.
        #[arg(long, conflicts_with = "phone")]
        group: Option<u64>,
        /// Block the number too.
        #[arg(long, conflicts_with = "group")]
        block: bool,
        #[command(flatten)]
        profile: cli::ProfileArgs,
        #[command(flatten)]
        transport: cli::TransportArgs,
    },
    /// Give a phone number a name, shown on all your devices (`--forget`
    /// removes it).
    Contact {
        /// Their phone number.
        phone: String,
        /// The name to show for them.
        #[arg(required_unless_present = "forget")]
        name: Option<String>,
        /// Remove the name.
        #[arg(long, conflicts_with = "name")]
        forget: bool,
        #[command(flatten)]
        profile: cli::ProfileArgs,
        #[command(flatten)]
        transport: cli::TransportArgs,
    },
    /// The names you gave your contacts.
    Contacts {
        #[command(flatten)]
        profile: cli::ProfileArgs,
        #[command(flatten)]
        transport: cli::TransportArgs,
    },
    /// List the phone numbers you blocked.
    Blocked {
        #[command(flatten)]
        profile: cli::ProfileArgs,
        #[command(flatten)]
        transport: cli::TransportArgs,
    },
    /// Your profile and this profile directory's settings: `profile set
    /// --name … --about … --visible-to …` and `profile show [+NUMBER…]`;
    /// `profile server URL[,URL…] [--ca FILE]` points this profile at
    /// another address of its server (say, after TLS was switched on) and
    /// remembers the CA to trust.
    Profile {
        #[command(subcommand)]
        action: ProfileCommand,
        #[command(flatten)]
        profile: cli::ProfileArgs,
        #[command(flatten)]
        transport: cli::TransportArgs,
    },
    /// The safety number of your end-to-end encrypted conversation with a
    /// phone number: compare it with theirs to know nobody is in between.
    Verify {
        /// Their phone number.
        phone: String,
        #[command(flatten)]
        profile: cli::ProfileArgs,
        #[command(flatten)]
        transport: cli::TransportArgs,
    },
    /// Groups: create, list, info, add, remove, leave, promote, demote,
    /// subject, admin-only, send, msginfo.
    Group {
        #[command(subcommand)]
        action: groups::GroupCommand,
        #[command(flatten)]
        profile: cli::ProfileArgs,
        #[command(flatten)]
        transport: cli::TransportArgs,
    },
    /// Print incoming messages, receipts and read markers as they arrive,
    /// and presence and typing of the numbers watched.
    Listen {
        /// Show this number's presence (repeatable).
        #[arg(long)]
        watch: Vec<String>,
        /// Save received files here (default: `files` in the profile's directory).
        #[arg(long, value_name = "DIR")]
        files: Option<std::path::PathBuf>,
        #[command(flatten)]
        profile: cli::ProfileArgs,
        #[command(flatten)]
        transport: cli::TransportArgs,
    },
    /// Chat with one number (or one group): type to send, watch the ticks change.
    Chat {
        /// The other person's phone number.
        #[arg(required_unless_present = "group")]
        with: Option<String>,
        /// Chat in this group instead.
        #[arg(long, conflicts_with = "with")]
        group: Option<u64>,
        #[command(flatten)]
        profile: cli::ProfileArgs,
        #[command(flatten)]
        transport: cli::TransportArgs,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// The live nodes and their addresses.
    Status,
    /// Drain a node: its actors move to the others, its devices reconnect
    /// elsewhere, then it stops. Waits until it has left.
    Drain {
        node: String,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 60)]
        wait_secs: u64,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Copy the embedded store into empty PostgreSQL databases, then verify
    /// every table (row counts and checksums). Offline: stop the server first.
    Copy {
        /// The embedded store's data directory (or its skylark.redb file).
        #[arg(long, default_value = "./skylark-data")]
        from: PathBuf,
        /// A PostgreSQL URL; repeat for shards, in the order `serve --store`
        /// will be given them.
        #[arg(long = "to", value_name = "URL", required = true)]
        to: Vec<String>,
    },
}

#[derive(Subcommand)]
enum LinkCommand {
    /// On a signed-in device: approve the code a new device shows.
    Approve {
        code: String,
        #[command(flatten)]
        profile: cli::ProfileArgs,
        #[command(flatten)]
        transport: cli::TransportArgs,
    },
}

#[derive(Subcommand)]
enum ProfileCommand {
    /// Set your name and about text (shown to others as `visible-to` allows).
    Set {
        /// Your name as others see it (at most 25 characters).
        #[arg(long)]
        name: Option<String>,
        /// A line about you (at most 139 characters).
        #[arg(long)]
        about: Option<String>,
        /// Who may see them: everyone, contacts (people you wrote to) or nobody.
        #[arg(long, value_parser = ["everyone", "contacts", "nobody"])]
        visible_to: Option<String>,
    },
    /// Show profiles: yours, or these numbers' (as they let you see them).
    Show {
        /// Phone numbers; none shows yours.
        phones: Vec<String>,
    },
    /// Connect to the server at these addresses from now on (checked first).
    Server {
        /// The server's address (`https://chat.example.org`), or several,
        /// comma-separated (the nodes of a cluster).
        servers: String,
        /// Also trust the CA certificate(s) in this PEM file from now on.
        #[arg(long)]
        ca: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DevicesCommand {
    /// Give a device another name.
    Rename {
        /// The device's id (as `skylark devices` lists them).
        id: u64,
        /// Its new name.
        name: String,
    },
    /// Sign a device out for good (its key stops working).
    Remove {
        /// The device's id (as `skylark devices` lists them).
        id: u64,
    },
}

/// Errors are printed in words, with their causes on one line: never a
/// backtrace (even with RUST_BACKTRACE set) or a debug dump.
fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match args.command {
        Command::Serve(serve_args) => runtime.block_on(serve::run(serve_args)),
        Command::Store { action: StoreCommand::Copy { from, to } } => runtime.block_on(serve::copy_store(&from, to)),
        Command::Cluster { action: ClusterCommand::Status, store } => runtime.block_on(serve::cluster_status(store)),
        Command::Cluster { action: ClusterCommand::Drain { node, wait_secs }, store } => {
            runtime.block_on(serve::cluster_drain(store, &node, std::time::Duration::from_secs(wait_secs)))
        }
        Command::Register { phone, server, name, ca, profile } => {
            runtime.block_on(cli::register(&phone, &server, &name, &profile.dir()?, ca.as_deref()))
        }
        Command::Admin { action, args } => runtime.block_on(admin::run(&args, &action)),
        Command::Backup { dest, args } => runtime.block_on(admin::run(&args, &admin::AdminCommand::Backup { dest })),
        Command::Restore { from, data_dir, force } => admin::restore(&from, &data_dir, force),
        Command::Whoami { profile, transport } => runtime.block_on(cli::whoami(&profile.dir()?, &transport)),
        Command::Link { approve: Some(LinkCommand::Approve { code, profile, transport }), .. } => {
            runtime.block_on(devices::approve(&profile.dir()?, &transport, &code))
        }
        Command::Link { approve: None, server, name, ca, profile } => {
            runtime.block_on(devices::link(&server, &name, &profile.dir()?, ca.as_deref()))
        }
        Command::Devices { action, profile, transport } => {
            let dir = profile.dir()?;
            runtime.block_on(async {
                match action {
                    None => devices::list(&dir, &transport).await,
                    Some(DevicesCommand::Rename { id, name }) => devices::rename(&dir, &transport, id, &name).await,
                    Some(DevicesCommand::Remove { id }) => devices::remove(&dir, &transport, id).await,
                }
            })
        }
        Command::Send { to, message, file, profile, transport } => {
            runtime.block_on(chat::send(&profile.dir()?, &transport, &to, message.as_deref(), file.as_deref()))
        }
        Command::Reply { conversation, message, text, profile, transport } => runtime.block_on(converse::run(
            &profile.dir()?,
            &transport,
            &conversation,
            converse::Verb::Reply { message, text },
        )),
        Command::React { conversation, message, emoji, remove, profile, transport } => {
            if emoji.trim().is_empty() != remove {
                anyhow::bail!("give an emoji to react with, or --remove to take your reaction back (not both)");
            }
            let verb = converse::Verb::React { message, emoji };
            runtime.block_on(converse::run(&profile.dir()?, &transport, &conversation, verb))
        }
        Command::Edit { conversation, message, text, profile, transport } => runtime.block_on(converse::run(
            &profile.dir()?,
            &transport,
            &conversation,
            converse::Verb::Edit { message, text },
        )),
        Command::Delete { conversation, message, profile, transport } => runtime.block_on(converse::run(
            &profile.dir()?,
            &transport,
            &conversation,
            converse::Verb::Delete { message },
        )),
        Command::Forward { conversation, message, to, profile, transport } => {
            let verb = converse::Verb::Forward { message, to: converse::Conversation::parse(&to)? };
            runtime.block_on(converse::run(&profile.dir()?, &transport, &conversation, verb))
        }
        Command::Disappear { conversation, timer, profile, transport } => {
            let Some(timer_ms) = skylark_client::content::parse_timer(&timer) else {
                anyhow::bail!("{timer:?} is not a timer: give off, 24h, 7d or 90d");
            };
            let verb = converse::Verb::Disappear { timer_ms };
            runtime.block_on(converse::run(&profile.dir()?, &transport, &conversation, verb))
        }
        Command::Block { phone, profile, transport } => {
            runtime.block_on(blocks::set(&profile.dir()?, &transport, &phone, true))
        }
        Command::Unblock { phone, profile, transport } => {
            runtime.block_on(blocks::set(&profile.dir()?, &transport, &phone, false))
        }
        Command::Blocked { profile, transport } => runtime.block_on(blocks::list(&profile.dir()?, &transport)),
        Command::Contact { phone, name, forget: _, profile, transport } => {
            runtime.block_on(blocks::name(&profile.dir()?, &transport, &phone, name.as_deref().unwrap_or("")))
        }
        Command::Contacts { profile, transport } => runtime.block_on(blocks::names(&profile.dir()?, &transport)),
        Command::Report { phone, group, block, profile, transport } => {
            runtime.block_on(blocks::report(&profile.dir()?, &transport, phone.as_deref(), group, block))
        }
        Command::Account { action, profile, transport } => {
            runtime.block_on(account::account(&profile.dir()?, &transport, &action))
        }
        Command::Pin { action, profile, transport } => {
            runtime.block_on(account::pin(&profile.dir()?, &transport, action.as_ref()))
        }
        Command::Profile { action: ProfileCommand::Set { name, about, visible_to }, profile, transport } => runtime
            .block_on(account::set_profile(
                &profile.dir()?,
                &transport,
                name.as_deref(),
                about.as_deref(),
                visible_to.as_deref(),
            )),
        Command::Profile { action: ProfileCommand::Show { phones }, profile, transport } => {
            runtime.block_on(account::show_profiles(&profile.dir()?, &transport, &phones))
        }
        Command::Profile { action: ProfileCommand::Server { servers, ca }, profile, .. } => {
            runtime.block_on(cli::set_server(&profile.dir()?, &servers, ca.as_deref()))
        }
        Command::Verify { phone, profile, transport } => {
            runtime.block_on(chat::verify(&profile.dir()?, &transport, &phone))
        }
        Command::Listen { watch, files, profile, transport } => {
            let profile = profile.dir()?;
            let files = files.unwrap_or_else(|| profile.join("files"));
            runtime.block_on(chat::listen(&profile, &transport, &watch, &files))
        }
        Command::Chat { with, group, profile, transport } => {
            runtime.block_on(chat::chat(&profile.dir()?, &transport, with.as_deref(), group))
        }
        Command::Group { action, profile, transport } => {
            runtime.block_on(groups::run(&profile.dir()?, &transport, action))
        }
    }
}

/// `$SKYLARK_HOME`, or `~/.skylark`.
fn skylark_home() -> PathBuf {
    if let Some(home) = std::env::var_os("SKYLARK_HOME") {
        return PathBuf::from(home);
    }
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".")).join(".skylark")
}
