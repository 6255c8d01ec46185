//! `group`: create and manage groups, post to them, ask who has a message.

use crate::chat::{client_id, clock, normalise};
use crate::cli::{TransportArgs, explain};
use anyhow::{Result, bail};
use clap::Subcommand;
use skylark_client::Identity;
use skylark_client::e2ee::{Crypto, Setup, Shown};
use skylark_client::session::{Event, SessionHandle};
use skylark_protocol::v1::{self, change_group::Change};
use std::path::Path;
use tokio::sync::mpsc;

#[derive(Subcommand)]
pub enum GroupCommand {
    /// Create a group with a subject and members (phone numbers); you are its admin.
    Create {
        /// What the group is called (1 to 100 characters).
        subject: String,
        /// The members' phone numbers (international form, +…).
        members: Vec<String>,
    },
    /// The groups you are a member of.
    List,
    /// A group's subject, settings and members.
    Info {
        /// The group's id (as `group list` shows it).
        group: u64,
    },
    /// Add members (admins only).
    Add {
        /// The group's id.
        group: u64,
        /// The new members' phone numbers.
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Remove a member (admins only).
    Remove {
        /// The group's id.
        group: u64,
        /// The member's phone number.
        member: String,
    },
    /// Leave a group.
    Leave {
        /// The group's id.
        group: u64,
    },
    /// Make a member an admin (admins only).
    Promote {
        /// The group's id.
        group: u64,
        /// The member's phone number.
        member: String,
    },
    /// Make an admin a plain member again (admins only).
    Demote {
        /// The group's id.
        group: u64,
        /// The admin's phone number.
        member: String,
    },
    /// Change the subject (admins only).
    Subject {
        /// The group's id.
        group: u64,
        /// The new subject.
        subject: String,
    },
    /// Let only admins post (`on`) or everyone (`off`) (admins only).
    AdminOnly {
        /// The group's id.
        group: u64,
        /// `on` or `off`.
        #[arg(value_parser = ["on", "off"])]
        setting: String,
    },
    /// Post a text message; returns once the group has stored it.
    Send {
        /// The group's id.
        group: u64,
        /// The text to post.
        message: String,
    },
    /// Who has received and read one of your messages (by its group sequence).
    Msginfo {
        /// The group's id.
        group: u64,
        /// The message's number in the group (the `#n` shown when it was posted).
        seq: u64,
    },
}

fn print_info(info: &v1::GroupInfo) {
    println!("Group {} \"{}\"{}", info.id, info.subject, if info.admin_only { " (only admins post)" } else { "" });
    for m in &info.members {
        println!("  {}{}", m.phone, if m.admin { "  admin" } else { "" });
    }
}

pub async fn run(profile: &Path, transport: &TransportArgs, command: GroupCommand) -> Result<()> {
    if let GroupCommand::Send { message, .. } = &command {
        crate::chat::text_to_send(message)?;
    }
    let mut c = crate::cli::connect(profile, transport).await?;
    let result = command_on(&c.session.handle(), &mut c.events, &c.crypto, command).await;
    c.session.close().await;
    result
}

/// Says whether a group is end-to-end encrypted after a setup.
fn say_setup(setup: &Setup) {
    match setup {
        Setup::Encrypted => println!("🔒 Messages in this group are end-to-end encrypted."),
        Setup::Plain { without_keys } => {
            let devices: Vec<String> = without_keys.iter().map(|(p, d)| format!("{p} (device {d})")).collect();
            println!(
                "⚠ This group is NOT end-to-end encrypted: {} cannot encrypt yet (an older client, or the web \
                 client). The server can read its messages.",
                devices.join(", ")
            );
        }
    }
}

async fn change(h: &SessionHandle, group: u64, change: Change) -> Result<()> {
    print_info(&h.change_group(group, change).await.map_err(explain)?);
    Ok(())
}

async fn command_on(
    h: &SessionHandle,
    events: &mut mpsc::Receiver<Event>,
    crypto: &Crypto,
    command: GroupCommand,
) -> Result<()> {
    // Encrypting or committing needs the group's newest state.
    crypto.catch_up(h, events).await.map_err(explain)?;
    crypto.maintain(h, events).await.map_err(explain)?;
    match command {
        GroupCommand::Create { subject, members } => {
            let members: Vec<String> = members.iter().map(|m| normalise(m)).collect::<Result<_>>()?;
            let refs: Vec<&str> = members.iter().map(String::as_str).collect();
            let info = h.create_group(&subject, &refs).await.map_err(explain)?;
            print_info(&info);
            say_setup(&crypto.start_group(h, events, &info).await.map_err(explain)?);
            println!(
                "Post with: skylark group send {} \"hello\"   (or chat with: skylark chat --group {})",
                info.id, info.id
            );
        }
        GroupCommand::List => {
            let groups = h.list_groups().await.map_err(explain)?;
            if groups.iter().all(|g| g.direct) {
                println!("You are in no groups.");
            }
            // 1:1 conversations' groups are not groups to the person.
            for g in groups.iter().filter(|g| !g.direct) {
                println!("{}  \"{}\"  {} members", g.id, g.subject, g.members.len());
            }
        }
        GroupCommand::Info { group } => print_info(&h.group_info(group).await.map_err(explain)?),
        GroupCommand::Add { group, members } => {
            let phones: Vec<String> = members.iter().map(|m| normalise(m)).collect::<Result<_>>()?;
            // In an encrypted group, every new device must be able to read it.
            let prepared = crypto.prepare_add(h, group, &phones).await.map_err(explain)?;
            if let Some(p) = &prepared
                && !p.without_keys().is_empty()
            {
                let devices: Vec<String> = p.without_keys().iter().map(|(p, d)| format!("{p} (device {d})")).collect();
                bail!(
                    "group {group} is end-to-end encrypted, and {} cannot encrypt yet (an older client, or the web \
                     client); nobody was added",
                    devices.join(", ")
                );
            }
            change(h, group, Change::Add(v1::PhoneList { phones: phones.clone() })).await?;
            if let Some(p) = prepared {
                if let Err(e) = crypto.finish_add(h, events, group, p).await {
                    // Members who could not get the keys could not read
                    // the group: they are taken out again.
                    let out = crypto.undo_unkeyed_add(h, group, &phones).await.map_err(explain)?;
                    if out.is_empty() {
                        return Err(explain(e));
                    }
                    bail!(
                        "{}; so {} could not read the group, and {} taken out of it again",
                        explain(e),
                        out.join(", "),
                        if out.len() == 1 { "was" } else { "were" }
                    );
                }
                println!("🔒 The new members' devices were given the group's keys.");
            }
        }
        GroupCommand::Remove { group, member } => {
            let phone = normalise(&member)?;
            let before = h.group_info(group).await.map_err(explain)?;
            let account = before.members.iter().find(|m| m.phone == phone).map(|m| m.account);
            change(h, group, Change::Remove(phone)).await?;
            if let Some(account) = account
                && crypto.remove_accounts(h, events, group, &[account]).await.map_err(explain)?
            {
                println!("🔒 Their devices were removed from the group's keys: they cannot read what is sent next.");
            }
        }
        GroupCommand::Leave { group } => {
            h.change_group(group, Change::Leave(v1::Leave {})).await.map_err(explain)?;
            println!("You left group {group}.");
        }
        GroupCommand::Promote { group, member } => change(h, group, Change::Promote(normalise(&member)?)).await?,
        GroupCommand::Demote { group, member } => change(h, group, Change::Demote(normalise(&member)?)).await?,
        GroupCommand::Subject { group, subject } => change(h, group, Change::Subject(subject)).await?,
        GroupCommand::AdminOnly { group, setting } => change(h, group, Change::AdminOnly(setting == "on")).await?,
        GroupCommand::Send { group, message } => {
            let (ack, encrypted) = crypto.post(h, events, group, &client_id(), &message).await.map_err(explain)?;
            let id = ack.id.unwrap_or_default();
            let lock = if encrypted { "🔒 " } else { "" };
            println!("✓ {lock}posted to group {group} at {} (#{})", clock(ack.sent_at_ms), id.seq);
        }
        GroupCommand::Msginfo { group, seq } => {
            let info = h.message_info(group, seq).await.map_err(explain)?;
            let total = info.recipients.len();
            println!("Message #{seq}: delivered to {} of {total}, read by {}", info.delivered, info.read);
            for r in &info.recipients {
                let state = if r.read {
                    "read"
                } else if r.delivered {
                    "delivered"
                } else {
                    "not yet delivered"
                };
                println!("  {}  {state}", r.phone);
            }
            if total == 0 && seq == 0 {
                bail!("group sequences start at 1");
            }
        }
    }
    Ok(())
}

/// A group event as a line of text; `shown` is the post as this device
/// opened it (`None` for a post that only carries encryption changes).
///
/// A 1:1 conversation's group (`peer`: the other party's number, when
/// known) reads as the 1:1 conversation it carries.
pub fn describe_group(g: &v1::GroupEvent, me: &Identity, shown: Option<Shown>, peer: Option<&str>) -> Option<String> {
    use v1::group_event::Body;
    let who = if g.by == me.account_id { "you".to_owned() } else { g.by_phone.clone() };
    let at = clock(g.at_ms);
    // A post's words: its content, and what the server says of it.
    let post = match g.body.as_ref() {
        Some(Body::Message(m)) => Some(crate::chat::meta(m.edits, m.deletes, m.expires_at_ms, m.purged)),
        _ => None,
    };
    let words = |text: &str| match post {
        Some(meta) => crate::chat::message_text(text, meta, g.group, true),
        None => Some(text.to_owned()),
    };
    let shown = match shown {
        // A purged post holds nothing, encrypted or not: no note about it.
        Some(Shown::Encrypted(text)) => Some(Shown::Encrypted(words(&text)?)),
        Some(Shown::Plain(text)) if post.is_some_and(|m| m.purged) => Some(Shown::Encrypted(words(&text)?)),
        Some(Shown::Plain(text)) => Some(Shown::Plain(words(&text)?)),
        other => other,
    };
    if skylark_core::AccountId(g.group).is_direct() {
        // Nothing but posts: its creation and key changes are no news.
        let Some(Body::Message(_)) = g.body.as_ref() else { return None };
        let id = g.group_seq;
        let line = if g.by == me.account_id {
            format!("[{at}] you → {}", peer.unwrap_or("your 1:1 chat"))
        } else {
            format!("[{at}] {}", g.by_phone)
        };
        return Some(match shown? {
            Shown::Encrypted(text) => format!("{line}: {text}  (#{id})"),
            Shown::Plain(text) => format!("{line}: {text}  (#{id}, not end-to-end encrypted)"),
            Shown::Unreadable(why) => format!("{line}: [this device cannot read it: {why}]"),
            Shown::DevicesChanged => {
                let peer = peer.unwrap_or("the other person");
                format!(
                    "[{at}] 🔑 the devices in your conversation with {peer} changed, and so did your safety \
                     number: compare it again with `skylark verify {peer}`"
                )
            }
        });
    }
    let tag = format!("[{at}] group {}", g.group);
    Some(match g.body.as_ref()? {
        Body::Message(_) => match shown? {
            Shown::DevicesChanged => format!("{tag}: 🔑 the members' devices changed (linked, removed, added)"),
            Shown::Encrypted(text) => format!("{tag} #{} {who}: {text}", g.group_seq),
            Shown::Plain(text) => format!("{tag} #{} {who}: {text}  (not end-to-end encrypted)", g.group_seq),
            Shown::Unreadable(why) => format!("{tag} #{} {who}: [this device cannot read it: {why}]", g.group_seq),
        },
        Body::Created(c) => {
            let members: Vec<&str> = c.members.iter().map(|m| m.phone.as_str()).collect();
            format!("{tag}: {who} created \"{}\" with {}", c.subject, members.join(", "))
        }
        Body::Added(a) => {
            let members: Vec<&str> = a.members.iter().map(|m| m.phone.as_str()).collect();
            format!("{tag}: {who} added {}", members.join(", "))
        }
        Body::Removed(m) => format!("{tag}: {who} removed {}", m.phone),
        Body::Left(_) => format!("{tag}: {who} left"),
        Body::Promoted(m) if g.by == g.group => format!("{tag}: {} is now an admin", m.phone),
        Body::Promoted(m) => format!("{tag}: {who} made {} an admin", m.phone),
        Body::Demoted(m) => format!("{tag}: {who} made {} a plain member", m.phone),
        Body::Subject(s) => format!("{tag}: {who} changed the subject to \"{s}\""),
        Body::AdminOnly(true) => format!("{tag}: {who} let only admins post"),
        Body::AdminOnly(false) => format!("{tag}: {who} let everyone post"),
    })
}
