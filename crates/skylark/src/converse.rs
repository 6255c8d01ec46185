//! `skylark reply`, `react`, `edit`, `delete`, `forward` and `disappear`:
//! what people do to the messages of a conversation besides sending new
//! ones. Each is one message of the conversation (end-to-end encrypted when
//! the conversation is; see `skylark_client::content` for what it says),
//! and edits and deletions carry the little the server must check and act
//! on (whose message, how old; a deletion purges every stored copy).
//!
//! A conversation is named by a phone number (`+…`) or a group id; a
//! message by the id `listen` and `chat` show: `#SEQ` in groups and
//! encrypted 1:1 chats, `#ACCOUNT:SEQ` in a 1:1 chat that is not encrypted
//! (where your own messages may also be named by their `SEQ`).

use crate::chat::{client_id, clock, normalise};
use crate::cli::{Connected, TransportArgs, explain};
use anyhow::{Context, Result, bail};
use skylark_client::content::{Content, Quote, id_text, parse_id, quote_of, timer_words};
use skylark_client::e2ee::{Crypto, Shown};
use skylark_client::session::{SendOptions, SessionHandle, To};
use skylark_protocol::v1::{self, event::Body};
use std::path::Path;

/// A conversation as the user named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conversation {
    Phone(String),
    Group(u64),
}

impl Conversation {
    /// A phone number (starting with `+`) or a group id (digits).
    pub fn parse(arg: &str) -> Result<Conversation> {
        let arg = arg.trim();
        if arg.starts_with('+') {
            return Ok(Conversation::Phone(normalise(arg)?));
        }
        match arg.parse::<u64>() {
            Ok(group) if skylark_core::AccountId(group).is_group() => Ok(Conversation::Group(group)),
            _ => bail!(
                "{arg:?} names no conversation: give a phone number in international form (+15551234567) or a \
                 group id as `skylark groups` lists it"
            ),
        }
    }
}

/// Where the conversation's messages go, once its encryption is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A 1:1 conversation without end-to-end encryption.
    Plain(String),
    /// A group, or the encrypted group of a 1:1 conversation (`direct`).
    Group { group: u64, direct: Option<String> },
}

impl Route {
    fn describe(&self) -> String {
        match self {
            Route::Plain(phone) | Route::Group { direct: Some(phone), .. } => phone.clone(),
            Route::Group { group, .. } => format!("group {group}"),
        }
    }
}

/// Catches up (encrypting needs the newest keys) and finds the route.
pub async fn route(c: &mut Connected, conversation: &Conversation) -> Result<Route> {
    let h = c.session.handle();
    c.crypto.catch_up(&h, &mut c.events).await.map_err(explain)?;
    c.crypto.maintain(&h, &mut c.events).await.map_err(explain)?;
    Ok(match conversation {
        Conversation::Phone(phone) => match c.crypto.start_direct(&h, &mut c.events, phone).await.map_err(explain)? {
            Some(group) => Route::Group { group, direct: Some(phone.clone()) },
            None => Route::Plain(phone.clone()),
        },
        Conversation::Group(group) => Route::Group { group: *group, direct: None },
    })
}

/// Sends `content` on `route`; returns the ack and whether it was encrypted.
pub async fn deliver(
    c: &mut Connected,
    route: &Route,
    content: &Content,
    options: SendOptions,
) -> Result<(v1::SendAck, bool)> {
    let h = c.session.handle();
    let id = client_id();
    match route {
        Route::Group { group, .. } => {
            c.crypto.post_with(&h, &mut c.events, *group, &id, &content.encode(), options).await.map_err(explain)
        }
        Route::Plain(phone) => {
            let payload = content.encode().into_bytes();
            Ok((h.send_with(To::Phone(phone), &id, payload, options).await.map_err(explain)?, false))
        }
    }
}

/// A message of the conversation found in the account's history.
struct Found {
    content: Content,
}

/// Log entries searched for a message (or the conversation's timer).
const SEARCHED: usize = 2_000;
const PAGE: u32 = 200;

/// Walks the account's history newest first (at most [`SEARCHED`]
/// entries), handing each message or post of the conversation on `route`
/// to `visit` with its id and content, until `visit` says stop.
async fn walk(
    h: &SessionHandle,
    crypto: &Crypto,
    route: &Route,
    mut visit: impl FnMut((u64, u64), Found, &v1::Event) -> bool,
) -> Result<()> {
    let mut before = 0;
    let mut seen = 0;
    while seen < SEARCHED {
        let page = h.history(before, PAGE).await.map_err(explain)?;
        for event in &page.events {
            before = event.seq;
            seen += 1;
            let found = match (&event.body, route) {
                (Some(Body::Message(m)), Route::Plain(phone) | Route::Group { direct: Some(phone), .. })
                    if (m.to_phone == *phone || m.from_phone == *phone) && !m.purged =>
                {
                    let id = m.id.unwrap_or_default();
                    let text = String::from_utf8_lossy(&m.payload);
                    Some(((id.sender, id.seq), Found { content: Content::parse(&text) }))
                }
                (Some(Body::Group(g)), Route::Group { group, .. }) if g.group == *group => {
                    let text = match crypto.recall(event) {
                        Some(Shown::Encrypted(text) | Shown::Plain(text)) => Some(text),
                        _ => None,
                    };
                    let purged = matches!(&g.body, Some(v1::group_event::Body::Message(m)) if m.purged);
                    text.filter(|_| !purged)
                        .map(|text| ((g.group, g.group_seq), Found { content: Content::parse(&text) }))
                }
                _ => None,
            };
            if let Some((id, found)) = found
                && visit(id, found, event)
            {
                return Ok(());
            }
        }
        if !page.has_more {
            break;
        }
    }
    Ok(())
}

/// The conversation's disappearing timer now: the newest timer message
/// in it (0 when there is none).
pub async fn timer_of(c: &Connected, route: &Route) -> Result<u64> {
    timer_in(&c.session.handle(), &c.crypto, route).await
}

/// [`timer_of`] on any session of the profile.
pub async fn timer_in(h: &SessionHandle, crypto: &Crypto, route: &Route) -> Result<u64> {
    let mut timer = 0;
    walk(h, crypto, route, |_, found, _| match found.content {
        Content::Timer { ms } => {
            timer = ms;
            true
        }
        _ => false,
    })
    .await?;
    Ok(timer)
}

/// The message `arg` names on `route`: its id as (sender, seq). `own`: it
/// must be one of yours (edit, delete), so a bare sequence in a plain chat
/// is yours.
fn target(arg: &str, route: &Route, me: u64, own: bool) -> Result<(u64, u64)> {
    if let Some(id) = parse_id(arg) {
        return Ok(id);
    }
    let seq: u64 = arg.trim().trim_start_matches('#').parse().with_context(|| {
        format!("{arg:?} names no message: give its number as `listen` or `chat` shows it (#12, or #ACCOUNT:SEQ)")
    })?;
    match route {
        Route::Group { group, .. } => Ok((*group, seq)),
        Route::Plain(_) if own => Ok((me, seq)),
        Route::Plain(phone) => bail!(
            "this chat with {phone} is not end-to-end encrypted, so its messages are named ACCOUNT:SEQ: give the \
             message as `listen` shows it (like #{}:{seq})",
            me
        ),
    }
}

/// One of the verbs, with what it needs beyond the conversation.
pub enum Verb {
    Reply { message: String, text: String },
    React { message: String, emoji: String },
    Edit { message: String, text: String },
    Delete { message: String },
    Forward { message: String, to: Conversation },
    Disappear { timer_ms: u64 },
}

/// Runs one verb on the conversation `conversation` names.
pub async fn run(profile: &Path, transport: &TransportArgs, conversation: &str, verb: Verb) -> Result<()> {
    let conversation = Conversation::parse(conversation)?;
    let me = skylark_client::Identity::load(profile)?.account_id;
    let mut c = crate::cli::connect(profile, transport).await?;
    let done = async {
        let route = route(&mut c, &conversation).await?;
        let h = c.session.handle();
        let timer = timer_of(&c, &route).await?;
        let timed = SendOptions { expire_after_ms: timer, ..SendOptions::default() };
        let (line, ack, encrypted) = match verb {
            Verb::Reply { message, text } => {
                let id = target(&message, &route, me, false)?;
                let quoted = find(&h, &c, &route, id).await?.map(|f| match f.content {
                    Content::Text { text, .. } => quote_of(&text),
                    other => other.describe(&|id| id.to_owned()),
                });
                let Some(quote) = quoted else { bail!(not_found(&message, &route)) };
                let content = Content::Text {
                    text: nonempty(&text)?,
                    reply: Some(Quote { id: id_text(id.0, id.1), quote }),
                    fwd: false,
                };
                let (ack, encrypted) = deliver(&mut c, &route, &content, timed).await?;
                (format!("replied to #{} in your chat with {}", show(id, &route), route.describe()), ack, encrypted)
            }
            Verb::React { message, emoji } => {
                let id = target(&message, &route, me, false)?;
                if find(&h, &c, &route, id).await?.is_none() {
                    bail!(not_found(&message, &route));
                }
                let emoji = emoji.trim().to_owned();
                if emoji.chars().count() > 8 {
                    bail!("a reaction is one emoji (or a few characters), not a message; use `reply` to answer");
                }
                let content = Content::React { to: id_text(id.0, id.1), emoji: emoji.clone() };
                let (ack, encrypted) = deliver(&mut c, &route, &content, timed).await?;
                let did = if emoji.is_empty() {
                    format!("took back your reaction to #{}", show(id, &route))
                } else {
                    format!("reacted {emoji} to #{}", show(id, &route))
                };
                (did, ack, encrypted)
            }
            Verb::Edit { message, text } => {
                let id = target(&message, &route, me, true)?;
                let seq = own_seq(id, &route, me, "edit")?;
                let content = Content::text(&nonempty(&text)?);
                let options = SendOptions { edits: Some(seq), ..timed };
                let (ack, encrypted) = deliver(&mut c, &route, &content, options).await?;
                (format!("edited #{}: everyone in the chat now sees the new text", show(id, &route)), ack, encrypted)
            }
            Verb::Delete { message } => {
                let id = target(&message, &route, me, true)?;
                let seq = own_seq(id, &route, me, "delete")?;
                let options = SendOptions { deletes: Some(seq), ..SendOptions::default() };
                let (ack, encrypted) = deliver(&mut c, &route, &Content::Delete {}, options).await?;
                let did = format!(
                    "deleted #{} for everyone: the server removed its text, and every device shows that it was \
                     deleted",
                    show(id, &route)
                );
                (did, ack, encrypted)
            }
            Verb::Forward { message, to } => {
                let id = target(&message, &route, me, false)?;
                let Some(found) = find(&h, &c, &route, id).await? else { bail!(not_found(&message, &route)) };
                // A file is forwarded by reference: the same blob, readable
                // by the new chat too (no upload again).
                let (content, attachments) = match found.content {
                    Content::Text { text, .. } => (Content::Text { text, reply: None, fwd: true }, Vec::new()),
                    Content::File { file, text, .. } => {
                        let blob = vec![file.id.clone()];
                        (Content::File { file, text, fwd: true }, blob)
                    }
                    _ => bail!(
                        "only a message with text or a file can be forwarded, and #{} is not one",
                        show(id, &route)
                    ),
                };
                let dest = self::route(&mut c, &to).await?;
                let dest_timer = timer_of(&c, &dest).await?;
                let options = SendOptions { expire_after_ms: dest_timer, attachments, ..SendOptions::default() };
                let (ack, encrypted) = deliver(&mut c, &dest, &content, options).await?;
                (format!("forwarded #{} to {}", show(id, &route), dest.describe()), ack, encrypted)
            }
            Verb::Disappear { timer_ms } => {
                let content = Content::Timer { ms: timer_ms };
                let (ack, encrypted) = deliver(&mut c, &route, &content, SendOptions::default()).await?;
                let did = match timer_ms {
                    0 => format!("turned off disappearing messages in your chat with {}", route.describe()),
                    ms => format!(
                        "messages in your chat with {} now disappear {} after they are sent (from everyone's \
                         devices and from the server)",
                        route.describe(),
                        timer_words(ms)
                    ),
                };
                (did, ack, encrypted)
            }
        };
        let lock = if encrypted { " 🔒" } else { "" };
        println!("✓{lock} {line} (at {})", clock(ack.sent_at_ms));
        Ok::<(), anyhow::Error>(())
    }
    .await;
    c.session.close().await;
    done
}

/// A message's id as the user gives it back: `#SEQ` in a group (or an
/// encrypted chat), `ACCOUNT:SEQ` otherwise.
fn show(id: (u64, u64), route: &Route) -> String {
    match route {
        Route::Group { group, .. } if *group == id.0 => id.1.to_string(),
        _ => id_text(id.0, id.1),
    }
}

fn not_found(message: &str, route: &Route) -> String {
    format!(
        "no message {message} in your chat with {} (among its recent messages, not deleted or disappeared); check \
         the number `listen` or `chat` shows",
        route.describe()
    )
}

fn nonempty(text: &str) -> Result<String> {
    if text.trim().is_empty() {
        bail!("the text is empty, so nothing was sent; give the text in quotes");
    }
    Ok(text.to_owned())
}

/// The sequence the server knows your message `id` by (your log's, or the
/// group's): only your own messages can be edited or deleted.
fn own_seq(id: (u64, u64), route: &Route, me: u64, verb: &str) -> Result<u64> {
    match route {
        Route::Group { group, .. } if id.0 == *group => Ok(id.1),
        Route::Plain(_) if id.0 == me => Ok(id.1),
        _ => bail!("you can only {verb} your own messages, and #{} is someone else's", show(id, route)),
    }
}

async fn find(h: &SessionHandle, c: &Connected, route: &Route, id: (u64, u64)) -> Result<Option<Found>> {
    let mut out = None;
    walk(h, &c.crypto, route, |found_id, found, _| {
        if found_id == id {
            out = Some(found);
            return true;
        }
        false
    })
    .await?;
    Ok(out)
}
