//! `send`, `listen` and `chat`: messaging from the command line.
//!
//! Payloads are UTF-8 text by this CLI's convention (the server treats them
//! as opaque bytes). Every event is acknowledged after it is printed, so a
//! restarted `listen` continues where the last one stopped.

use crate::cli::{TransportArgs, explain};
use anyhow::{Context, Result, bail};
use rand::RngCore;
use skylark_client::backoff::Backoff;
use skylark_client::client::ClientEvent;
use skylark_client::e2ee::Crypto;
use skylark_client::media::size_words;
use skylark_client::session::{LogEvent, SendOptions, SessionHandle, log_event};
use skylark_client::{Client, ClientError, Identity};
use skylark_core::PhoneNumber;
use skylark_core::message::Meta;
use skylark_protocol::v1::{self, ReceiptKind, event::Body, server_frame};
use std::collections::BTreeMap;
use std::path::Path;
use tokio::io::{AsyncBufReadExt, BufReader};

/// A fresh client message id.
pub(crate) fn client_id() -> String {
    let mut bytes = [0u8; 12];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `HH:MM:SS` (UTC) of a server timestamp.
pub(crate) fn clock(ms: u64) -> String {
    let secs = (ms / 1000) % 86_400;
    format!("{:02}:{:02}:{:02}", secs / 3600, (secs / 60) % 60, secs % 60)
}

fn text(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload).into_owned()
}

/// What the server says of a message beside its (opaque) payload, from
/// the wire fields of a 1:1 message or a post (0: no expiry).
pub(crate) fn meta(edits: Option<u64>, deletes: Option<u64>, expires_at_ms: u64, purged: bool) -> Meta {
    Meta { edits, deletes, expires_at_ms: (expires_at_ms != 0).then_some(expires_at_ms), purged }
}

/// Milliseconds since the epoch, by this machine's clock.
fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A message's text for a line: its content in words, with what the
/// server says of it (deleted for everyone, edits, a disappearing timer);
/// `None` for a disappearing message whose time has passed (it is gone
/// from the conversation). `sender` sent it (for a post: the group);
/// in a group (and an encrypted 1:1 chat: `bare`) the group's ids are shown
/// as bare sequences, elsewhere in full (ACCOUNT:SEQ).
pub(crate) fn message_text(payload: &str, meta: Meta, sender: u64, bare: bool) -> Option<String> {
    use skylark_client::content::{id_in_chat, id_text};
    let id = |seq: u64| if bare { seq.to_string() } else { id_text(sender, seq) };
    let in_chat = |text: &str| if bare { id_in_chat(text, sender) } else { text.to_owned() };
    use skylark_client::content::Content;
    if meta.expires_at_ms.is_some_and(|at| at <= now_ms()) {
        return None;
    }
    let timer = if meta.expires_at_ms.is_some() { " ⏳" } else { "" };
    if meta.purged {
        return Some("🚫 this message was deleted".to_owned());
    }
    let content = Content::parse(payload);
    Some(match (meta.deletes, meta.edits) {
        (Some(target), _) => format!("🚫 deleted #{} for everyone", id(target)),
        (None, Some(target)) => format!("✏️ edited #{} to: {}{timer}", id(target), content.describe(&in_chat)),
        (None, None) => format!("{}{timer}", content.describe(&in_chat)),
    })
}

fn kind_word(kind: i32) -> &'static str {
    if kind == ReceiptKind::Read as i32 { "read" } else { "delivered" }
}

pub(crate) fn normalise(number: &str) -> Result<String> {
    Ok(PhoneNumber::parse(number).with_context(|| format!("{number:?} is not a phone number"))?.to_string())
}

/// The bytes of a text message, refusing one with nothing to read (an
/// empty or blank argument is a slip, not a message).
pub fn text_to_send(message: &str) -> Result<Vec<u8>> {
    if message.trim().is_empty() {
        bail!("the message is empty, so nothing was sent; give the text to send (in quotes if it has spaces)");
    }
    Ok(message.as_bytes().to_vec())
}

pub async fn send(
    profile: &Path,
    transport: &TransportArgs,
    to: &str,
    message: Option<&str>,
    file: Option<&Path>,
) -> Result<()> {
    use crate::converse::{Conversation, Route};
    use skylark_client::content::Content;
    if file.is_none() {
        text_to_send(message.unwrap_or_default())?;
    }
    let conversation = match Conversation::parse(to) {
        Ok(conversation) => conversation,
        Err(_) => Conversation::Phone(normalise(to)?),
    };
    let to = match &conversation {
        Conversation::Phone(phone) => phone.clone(),
        Conversation::Group(group) => format!("group {group}"),
    };
    let identity = Identity::load(profile)?;
    let mut c = crate::cli::connect(profile, transport).await?;
    let sent = async {
        let route = crate::converse::route(&mut c, &conversation).await?;
        // Sent while the chat's disappearing timer is on: it disappears too.
        let timer = crate::converse::timer_of(&c, &route).await?;
        let mut options = skylark_client::session::SendOptions { expire_after_ms: timer, ..Default::default() };
        let mut what = String::new();
        let content = match file {
            Some(path) => {
                let file = crate::files::upload(&c.session.handle(), &identity, transport, path, true).await?;
                what = format!("📎 {} ({}) ", file.name, skylark_client::media::size_words(file.size));
                options.attachments = vec![file.id.clone()];
                Content::File { file, text: message.unwrap_or_default().trim().to_owned(), fwd: false }
            }
            None => Content::text(message.unwrap_or_default()),
        };
        let (ack, _) = crate::converse::deliver(&mut c, &route, &content, options).await?;
        let id = ack.id.unwrap_or_default();
        let disappears = match timer {
            0 => String::new(),
            ms => format!("; disappears in {}", skylark_client::content::timer_words(ms)),
        };
        match route {
            Route::Group { .. } => println!(
                "✓ 🔒 {what}sent to {to} at {} (end-to-end encrypted, message {}:{}{disappears})",
                clock(ack.sent_at_ms),
                id.sender,
                id.seq
            ),
            Route::Plain(_) => println!(
                "✓ {what}sent to {to} at {} (message {}:{}{disappears}; not end-to-end encrypted: a device of yours or \
                 theirs cannot encrypt yet)",
                clock(ack.sent_at_ms),
                id.sender,
                id.seq
            ),
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;
    c.session.close().await;
    sent
}

/// The other party of 1:1 conversation groups, by group id.
#[derive(Default)]
struct DirectPeers(std::collections::HashMap<u64, String>);

impl DirectPeers {
    fn get(&self, group: u64) -> Option<&str> {
        self.0.get(&group).map(String::as_str)
    }

    /// Learns the other party of the 1:1 conversation group `event`
    /// belongs to (a post, or a receipt or read marker of the group), if it
    /// is one: from the event, or else by asking the server once.
    async fn learn(&mut self, event: &v1::Event, me: &Identity, h: Option<&SessionHandle>) {
        let (group, by) = match &event.body {
            Some(Body::Group(g)) => (g.group, (g.by != me.account_id).then_some(g.by_phone.as_str())),
            Some(Body::Receipt(r)) if r.peer_phone.is_empty() => (r.peer, None),
            Some(Body::ReadSync(r)) if r.peer_phone.is_empty() => (r.peer, None),
            _ => return,
        };
        if !skylark_core::AccountId(group).is_direct() || self.0.contains_key(&group) {
            return;
        }
        if let Some(phone) = by.filter(|p| !p.is_empty()) {
            self.0.insert(group, phone.to_owned());
        } else if let Some(h) = h
            && let Ok(info) = h.group_info(group).await
            && let Some(other) = info.members.iter().find(|m| m.account != me.account_id)
        {
            self.0.insert(group, other.phone.clone());
        }
    }
}

/// `verify`: the safety number of the encrypted conversation with `phone`.
pub async fn verify(profile: &Path, transport: &TransportArgs, phone: &str) -> Result<()> {
    let phone = normalise(phone)?;
    let mut c = crate::cli::connect(profile, transport).await?;
    let h = c.session.handle();
    let shown = async {
        c.crypto.catch_up(&h, &mut c.events).await.map_err(explain)?;
        c.crypto.maintain(&h, &mut c.events).await.map_err(explain)?;
        let Some(group) = c.crypto.start_direct(&h, &mut c.events, &phone).await.map_err(explain)? else {
            bail!(
                "your conversation with {phone} is not end-to-end encrypted (a device of yours or theirs cannot \
                 encrypt yet), so there is no safety number to compare"
            );
        };
        let me = skylark_core::AccountId(Identity::load(profile)?.account_id);
        let Some(peer) = skylark_core::AccountId(group).direct_peer(me) else {
            bail!("the server answered a conversation group that is not yours with {phone}; nothing to verify");
        };
        let (number, mine, theirs) = c.crypto.safety_number(group, peer.0).map_err(explain)?;
        println!("Safety number with {phone}:\n");
        for line in number.split(' ').collect::<Vec<_>>().chunks(4) {
            println!("    {}", line.join(" "));
        }
        println!(
            "\nCompare it with the one {phone} sees (side by side, or read aloud on a call). If they match, your \
             messages are encrypted for your {} and their {} and nobody else. It changes when either of you links \
             or removes a device.",
            skylark_core::words::count(mine as u64, "device", "devices"),
            skylark_core::words::count(theirs as u64, "device", "devices"),
        );
        Ok(())
    }
    .await;
    c.session.close().await;
    shown
}

/// One log event as a line; `only` limits it to one conversation, and
/// `open` shows a group post (`Crypto::open_event` for what arrives,
/// `Crypto::recall` for a page of history).
fn describe(
    event: &v1::Event,
    me: &Identity,
    only: Option<&Peer>,
    peers: &DirectPeers,
    open: &dyn Fn(&v1::Event) -> Option<skylark_client::e2ee::Shown>,
) -> Option<String> {
    let only = match only {
        Some(Peer::Phone(p)) => Some(p.as_str()),
        Some(Peer::Group(g)) => {
            return match event.body.as_ref()? {
                Body::Group(e) if e.group == *g => {
                    crate::groups::describe_group(e, me, open(event), peers.get(e.group))
                }
                _ => None,
            };
        }
        None => None,
    };
    match event.body.as_ref()? {
        // A 1:1 conversation's encrypted posts belong to that conversation.
        Body::Group(g) if skylark_core::AccountId(g.group).is_direct() => {
            let peer = peers.get(g.group);
            if only.is_some_and(|o| Some(o) != peer) {
                return None;
            }
            crate::groups::describe_group(g, me, open(event), peer)
        }
        Body::Group(_) if only.is_some() => None,
        Body::Group(g) => crate::groups::describe_group(g, me, open(event), peers.get(g.group)),
        Body::Message(m) => {
            let mine = m.id.is_some_and(|id| id.sender == me.account_id);
            let peer = if mine { &m.to_phone } else { &m.from_phone };
            if only.is_some_and(|o| o != peer) {
                return None;
            }
            let id = m.id.unwrap_or_default();
            // In a plain chat both sides' messages are numbered: ids in full.
            let body =
                message_text(&text(&m.payload), meta(m.edits, m.deletes, m.expires_at_ms, m.purged), id.sender, false)?;
            let tag = skylark_client::content::id_text(id.sender, id.seq);
            Some(if mine {
                format!("[{}] you → {}: {body}  (#{tag})", clock(m.sent_at_ms), m.to_phone)
            } else {
                format!("[{}] {}: {body}  (#{tag})", clock(m.sent_at_ms), m.from_phone)
            })
        }
        Body::Receipt(r) => {
            // A group's receipt names no number; a 1:1 conversation's group
            // (encrypted) is shown as that conversation, by the other's number.
            let phone = if r.peer_phone.is_empty() { peers.get(r.peer).unwrap_or_default() } else { &r.peer_phone };
            if only.is_some_and(|o| o != phone) {
                return None;
            }
            if phone.is_empty() {
                let everyone = kind_word(r.kind);
                return Some(format!("✓✓ every member of group {} has {everyone} up to #{}", r.peer, r.up_to_seq));
            }
            Some(format!("✓✓ {} {} your messages up to #{}", phone, kind_word(r.kind), r.up_to_seq))
        }
        Body::ReadSync(r) => {
            let phone = if r.peer_phone.is_empty() { peers.get(r.peer).unwrap_or_default() } else { &r.peer_phone };
            if only.is_some_and(|o| o != phone) {
                return None;
            }
            if phone.is_empty() {
                return Some(format!("(read group {} up to #{} on one of your devices)", r.peer, r.up_to_seq));
            }
            Some(format!("(read {}'s messages up to #{} on one of your devices)", phone, r.up_to_seq))
        }
        Body::DeviceChange(change) => {
            use v1::device_change::Change;
            Some(match change.change.as_ref()? {
                Change::Linked(d) => format!("(device {} \"{}\" was linked to your account)", d.id, d.name),
                Change::Renamed(d) => format!("(device {} was renamed \"{}\")", d.id, d.name),
                Change::Removed(id) => format!("(device {id} was removed from your account)"),
            })
        }
        Body::ContactName(n) => {
            if only.is_some_and(|o| o != n.peer_phone) {
                return None;
            }
            Some(if n.name.is_empty() {
                format!("(you removed the name of {})", n.peer_phone)
            } else {
                format!("(you named {} \"{}\")", n.peer_phone, n.name)
            })
        }
        Body::BlockChange(b) => {
            if only.is_some_and(|o| o != b.peer_phone) {
                return None;
            }
            Some(if b.blocked {
                format!("(you blocked {}: their messages no longer reach you)", b.peer_phone)
            } else {
                format!("(you unblocked {})", b.peer_phone)
            })
        }
    }
}

/// One device, one connection: a short command run on this profile (say
/// `send` while `listen` runs) takes the connection over. A long-running
/// command takes it back a moment later and says so; if it keeps being
/// taken (another long-running command on the profile), it gives up in
/// words.
#[derive(Default)]
struct TakeBack {
    recent: Vec<tokio::time::Instant>,
}

/// How long a long-running command leaves the connection to the command
/// that took it, and how often in a minute it takes it back.
const TAKE_BACK_AFTER: std::time::Duration = std::time::Duration::from_millis(1500);
const TAKE_BACKS_PER_MINUTE: usize = 5;

impl TakeBack {
    /// Whether `error` is a takeover to answer by reconnecting (after a pause).
    async fn should_retake(&mut self, error: &ClientError) -> Result<bool> {
        if !matches!(error, ClientError::Closed { code: Some(skylark_protocol::CloseCode::Replaced), .. }) {
            return Ok(false);
        }
        let now = tokio::time::Instant::now();
        self.recent.retain(|t| now.duration_since(*t) < std::time::Duration::from_secs(60));
        if self.recent.len() >= TAKE_BACKS_PER_MINUTE {
            bail!(
                "another long-running command (listen or chat) keeps using this profile's connection; one device \
                 has one connection, so stop one of them (or give each its own device with `skylark link`)"
            );
        }
        self.recent.push(now);
        tokio::time::sleep(TAKE_BACK_AFTER).await;
        Ok(true)
    }
}

const TAKEN_BACK: &str = "— another skylark command used this device's connection; took it back —";

fn start_client(
    profile: &Path,
    transport: &TransportArgs,
) -> Result<(Identity, Client, tokio::sync::mpsc::Receiver<ClientEvent>, Crypto)> {
    let identity = Identity::load(profile)?;
    let crypto = Crypto::open(profile, &identity).map_err(explain)?;
    let (client, events) = Client::start(transport.endpoint(&identity)?, identity.clone(), Backoff::default());
    Ok((identity, client, events, crypto))
}

/// A presence or typing frame as a line, if it concerns `only` (or anyone).
fn describe_ephemeral(body: &Option<server_frame::Body>, only: Option<&str>) -> Option<String> {
    match body.as_ref()? {
        server_frame::Body::Presence(p) if only.is_none_or(|o| o == p.phone) => Some(presence_line(p)),
        server_frame::Body::TypingUpdate(t) if only.is_none_or(|o| o == t.from_phone) => {
            Some(match v1::TypingState::try_from(t.state).unwrap_or(v1::TypingState::Unspecified) {
                v1::TypingState::Composing => format!("… {} is typing", t.from_phone),
                v1::TypingState::Recording => format!("… {} is recording audio", t.from_phone),
                _ => format!("… {} stopped typing", t.from_phone),
            })
        }
        _ => None,
    }
}

fn presence_line(p: &v1::PresenceInfo) -> String {
    if !p.visible {
        format!("○ {} (presence hidden)", p.phone)
    } else if p.online {
        format!("● {} is online", p.phone)
    } else if p.last_seen_ms > 0 {
        format!("○ {} last seen {} UTC", p.phone, crate::devices::utc(p.last_seen_ms))
    } else {
        format!("○ {} is offline", p.phone)
    }
}

/// `event`, with the parts of a commit too large for one post downloaded
/// when it is one (`Crypto::fetch_parts`). An error ends the command: the
/// entry is not acknowledged, and the next run reads it again.
async fn with_parts<'a>(
    client: &Client,
    crypto: &Crypto,
    event: &'a v1::Event,
) -> Result<std::borrow::Cow<'a, v1::Event>> {
    if !skylark_client::e2ee::kept_out_of_line(event) {
        return Ok(std::borrow::Cow::Borrowed(event));
    }
    let handle = client.connected().await.map_err(explain)?;
    crypto.fetch_parts(&handle, event).await.map_err(explain)
}

pub async fn listen(profile: &Path, transport: &TransportArgs, watch: &[String], files: &Path) -> Result<()> {
    let watch: Vec<String> = watch.iter().map(|w| normalise(w)).collect::<Result<_>>()?;
    let (identity, mut client, mut events, crypto) = start_client(profile, transport)?;
    let mut take_back = TakeBack::default();
    let mut peers = DirectPeers::default();
    println!("Listening as {} (Ctrl-C stops).", identity.phone);
    while let Some(event) = events.recv().await {
        match event {
            ClientEvent::Connected(_) => {
                println!("— connected —");
                if let Ok(handle) = client.connected().await {
                    crate::cli::prepare_crypto(&crypto, &handle).await;
                }
                if !watch.is_empty() {
                    let phones: Vec<&str> = watch.iter().map(String::as_str).collect();
                    if let Ok(handle) = client.connected().await {
                        for p in handle.subscribe_presence(&phones).await.unwrap_or_default() {
                            println!("{}", presence_line(&p));
                        }
                    }
                }
            }
            ClientEvent::Disconnected { reason, .. } => println!("— disconnected ({reason}); reconnecting —"),
            ClientEvent::Stopped(e) => {
                if !take_back.should_retake(&e).await? {
                    return Err(explain(e));
                }
                (client, events) = Client::start(transport.endpoint(&identity)?, identity.clone(), Backoff::default());
                println!("{TAKEN_BACK}");
            }
            ClientEvent::Frame(frame) => match log_event(&frame) {
                Some(LogEvent::Entry(event)) => {
                    let event = &*with_parts(&client, &crypto, event).await?;
                    let handle = client.connected().await.ok();
                    peers.learn(event, &identity, handle.as_ref()).await;
                    if let Some(line) = describe(event, &identity, None, &peers, &|e| crypto.open_event(e)) {
                        println!("{line}");
                    }
                    if let (Some(handle), Some(file)) =
                        (&handle, crate::files::incoming_file(event, identity.account_id, &|e| crypto.open_event(e)))
                    {
                        match crate::files::save(handle, &identity, transport, &file, files).await {
                            Ok(path) => {
                                println!("📥 saved {} ({}) to {}", file.name, size_words(file.size), path.display())
                            }
                            Err(e) => println!("(could not save the file {}: {e:#})", file.name),
                        }
                    }
                    if let Some(handle) = handle {
                        let _ = handle.ack(event.seq).await;
                        // A device linked or removed: carry it into the
                        // encrypted conversations (reading on meanwhile).
                        if matches!(event.body, Some(Body::DeviceChange(_))) {
                            if let Err(e) = crypto.maintain(&handle, &mut events).await {
                                println!("(could not update the encrypted conversations for it yet: {e})");
                            }
                            for frame in crypto.take_read() {
                                if let Some(LogEvent::Entry(event)) = log_event(&frame) {
                                    peers.learn(event, &identity, Some(&handle)).await;
                                    if let Some(line) =
                                        describe(event, &identity, None, &peers, &|e| crypto.open_event(e))
                                    {
                                        println!("{line}");
                                    }
                                    let _ = handle.ack(event.seq).await;
                                }
                            }
                        }
                    }
                }
                Some(LogEvent::CaughtUp(_)) => println!("— caught up —"),
                None => {
                    if let Some(line) = describe_ephemeral(&frame.body, None) {
                        println!("{line}");
                    }
                }
            },
        }
    }
    Ok(())
}

/// Sends with the same client id (and the same payload: a group post is
/// encrypted once) until the server acknowledges it, across reconnects (the
/// server drops the duplicates). A refusal is returned as it came.
async fn send_reliably(
    client: &Client,
    to: &Peer,
    id: &str,
    payload: Vec<u8>,
    options: &SendOptions,
) -> Result<Result<v1::SendAck, ClientError>> {
    use skylark_client::session::To;
    for _ in 0..10 {
        let handle: SessionHandle = client.connected().await.map_err(explain)?;
        let to = match to {
            Peer::Phone(phone) => To::Phone(phone),
            Peer::Group(group) => To::Group(*group),
        };
        let sent = handle.send_with(to, id, payload.clone(), options.clone()).await;
        match sent {
            Ok(ack) => return Ok(Ok(ack)),
            Err(e @ ClientError::Refused { .. }) => return Ok(Err(e)),
            Err(_) => continue,
        }
    }
    bail!("could not send after several reconnects")
}

/// Attempts at an encrypted post that other members' commits keep making stale.
const STALE_ATTEMPTS: usize = 10;

/// Sends `text` to `to` reliably: to a group (or a 1:1 conversation's
/// group) encrypted when it is, naming the epoch it was encrypted in. When
/// a commit ended that epoch first, the group refuses it: the log is read
/// on through that commit (the frames read go to `pending`, to be shown)
/// and the text encrypted again.
#[allow(clippy::too_many_arguments)]
async fn send_text(
    client: &Client,
    crypto: &Crypto,
    events: &mut tokio::sync::mpsc::Receiver<ClientEvent>,
    pending: &mut std::collections::VecDeque<ClientEvent>,
    to: &Peer,
    id: &str,
    text: String,
    options: SendOptions,
) -> Result<v1::SendAck> {
    let Peer::Group(group) = *to else {
        return send_reliably(client, to, id, text.into_bytes(), &options).await?.map_err(explain);
    };
    // Fresh keys for this device's leaf before its first post (once).
    let h = client.connected().await.map_err(explain)?;
    crypto.refresh_keys(&h, events, group).await;
    pending.extend(crypto.take_read().into_iter().map(ClientEvent::Frame));
    for _ in 0..STALE_ATTEMPTS {
        let (payload, epoch) = crypto.group_payload(group, id, &text).map_err(explain)?;
        let options = SendOptions { message_epoch: epoch, ..options.clone() };
        match send_reliably(client, to, id, payload, &options).await? {
            Ok(ack) => return Ok(ack),
            Err(e) if e.error_code() == Some(skylark_protocol::ErrorCode::StaleEpoch) => {
                let Some(epoch) = epoch else { return Err(explain(e)) };
                let h = client.connected().await.map_err(explain)?;
                crypto.read_past_epoch(&h, events, group, epoch).await.map_err(explain)?;
                pending.extend(crypto.take_read().into_iter().map(ClientEvent::Frame));
            }
            Err(e) => return Err(explain(e)),
        }
    }
    bail!("the conversation's encryption kept changing while this device tried to send; try again")
}

/// Log entries a chat reads back on opening, and how many of the
/// conversation's it shows.
const HISTORY_PAGE: u32 = 200;
const HISTORY_SHOWN: usize = 20;

/// The next event: those read ahead first, then the client's.
async fn next_event(
    pending: &mut std::collections::VecDeque<ClientEvent>,
    events: &mut tokio::sync::mpsc::Receiver<ClientEvent>,
) -> Option<ClientEvent> {
    match pending.pop_front() {
        Some(event) => Some(event),
        None => events.recv().await,
    }
}

/// Where chat output goes. On a raw terminal the line being typed stays at
/// the bottom and every other line is printed above it; a line still in
/// view can be rewritten in place (a message's ticks).
struct Screen {
    raw: bool,
    typed: String,
    out: Box<dyn std::io::Write>,
    /// Rows printed above the prompt so far.
    rows: u64,
    /// The terminal's (columns, rows); asked of the terminal when None.
    size: Option<(u16, u16)>,
}

/// Where a line was printed: the row it starts on, if it took one row.
type Row = Option<u64>;

impl Screen {
    fn new(raw: bool) -> Screen {
        Screen { raw, typed: String::new(), out: Box::new(std::io::stdout()), rows: 0, size: None }
    }

    fn size(&self) -> (u16, u16) {
        self.size.or_else(|| crossterm::terminal::size().ok()).unwrap_or((80, 24))
    }

    /// Columns `line` takes, counting wide characters (emoji, CJK) as two.
    fn width(line: &str) -> usize {
        line.chars().map(|c| if u32::from(c) >= 0x1100 && c != '✓' { 2 } else { 1 }).sum()
    }

    fn say(&mut self, line: &str) -> Row {
        let (columns, _) = self.size();
        let width = Self::width(line);
        let at = self.rows;
        if self.raw {
            let _ = write!(self.out, "\r\x1b[2K{line}\r\n> {}", self.typed);
        } else {
            let _ = writeln!(self.out, "{line}");
        }
        let _ = self.out.flush();
        let rows = (width.max(1)).div_ceil(usize::from(columns.max(1))) as u64;
        self.rows += rows;
        (self.raw && rows == 1).then_some(at)
    }

    /// Rewrites the line printed at `row` when it is still on the screen
    /// and `line` fits on one row; otherwise prints `line` anew.
    fn replace(&mut self, row: Row, line: &str) -> Row {
        let (columns, height) = self.size();
        let up = row.map(|at| self.rows - at);
        match up {
            Some(up) if up < u64::from(height.saturating_sub(1)) && Self::width(line) < usize::from(columns) => {
                let _ = write!(self.out, "\r\x1b[2K\x1b[{up}A\r\x1b[2K{line}\x1b[{up}B\r> {}", self.typed);
                let _ = self.out.flush();
                row
            }
            _ => self.say(line),
        }
    }

    /// Shows the line being typed again (after an edit).
    fn redraw(&mut self) {
        if self.raw {
            let _ = write!(self.out, "\r\x1b[2K> {}", self.typed);
            let _ = self.out.flush();
        }
    }
}

/// Leaves raw mode however `chat` ends.
struct RawMode;

impl RawMode {
    fn enter() -> Result<RawMode> {
        crossterm::terminal::enable_raw_mode().context("switching the terminal to raw mode")?;
        Ok(RawMode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
        println!();
    }
}

/// What the person did at the keyboard.
enum Input {
    Line(String),
    /// A keystroke changed the line being typed.
    Edited,
    Quit,
}

/// Keyboard input: whole lines from a pipe, or keystrokes from a terminal.
enum Keyboard {
    Lines(tokio::io::Lines<BufReader<tokio::io::Stdin>>),
    Keys(crossterm::event::EventStream),
}

impl Keyboard {
    async fn next(&mut self, screen: &mut Screen) -> Result<Input> {
        use crossterm::event::{Event as TermEvent, KeyCode, KeyEventKind, KeyModifiers};
        use futures_util::StreamExt;
        match self {
            Keyboard::Lines(lines) => Ok(match lines.next_line().await? {
                Some(line) => Input::Line(line),
                None => Input::Quit,
            }),
            Keyboard::Keys(keys) => loop {
                let Some(event) = keys.next().await else { return Ok(Input::Quit) };
                let TermEvent::Key(key) = event? else { continue };
                if key.kind == KeyEventKind::Release {
                    continue;
                }
                let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
                match key.code {
                    KeyCode::Char('c' | 'd') if ctrl => return Ok(Input::Quit),
                    KeyCode::Char(c) if !ctrl => {
                        screen.typed.push(c);
                        screen.redraw();
                        return Ok(Input::Edited);
                    }
                    KeyCode::Backspace => {
                        screen.typed.pop();
                        screen.redraw();
                        return Ok(Input::Edited);
                    }
                    KeyCode::Enter => return Ok(Input::Line(std::mem::take(&mut screen.typed))),
                    _ => continue,
                }
            },
        }
    }
}

/// After this long without a keystroke, the indicator turns to "paused".
const TYPING_PAUSE: std::time::Duration = std::time::Duration::from_secs(4);
/// While typing goes on, "composing" is repeated this often (the server's
/// indicators expire after 10 s).
const TYPING_REFRESH: std::time::Duration = std::time::Duration::from_secs(7);

/// Whom a chat is with.
pub enum Peer {
    Phone(String),
    Group(u64),
}

pub async fn chat(profile: &Path, transport: &TransportArgs, with: Option<&str>, group: Option<u64>) -> Result<()> {
    use std::io::IsTerminal;
    let peer = match (with, group) {
        (Some(with), None) => Peer::Phone(normalise(with)?),
        (None, Some(group)) => Peer::Group(group),
        _ => bail!("chat with one phone number, or one group (--group ID)"),
    };
    // Presence and typing are for 1:1 chats.
    let peer_phone = match &peer {
        Peer::Phone(p) => p.clone(),
        Peer::Group(_) => String::new(),
    };
    let (identity, mut client, mut events, crypto) = start_client(profile, transport)?;
    let mut take_back = TakeBack::default();
    let tty = std::io::stdin().is_terminal();
    let _raw = if tty { Some(RawMode::enter()?) } else { None };
    let mut screen = Screen::new(tty);
    let mut keyboard = if tty {
        Keyboard::Keys(crossterm::event::EventStream::new())
    } else {
        Keyboard::Lines(BufReader::new(tokio::io::stdin()).lines())
    };
    let mut peers = DirectPeers::default();
    // A 1:1 chat goes through the conversation's end-to-end encrypted
    // group when both accounts' devices can encrypt. Setting it up may read
    // some of the log; those frames are shown first.
    let mut direct = None;
    if let Peer::Phone(p) = &peer {
        let h = client.connected().await.map_err(explain)?;
        direct = crypto.start_direct(&h, &mut events, p).await.map_err(explain)?;
        if let Some(g) = direct {
            peers.0.insert(g, p.clone());
        }
    }
    let mut pending: std::collections::VecDeque<ClientEvent> =
        crypto.take_read().into_iter().map(ClientEvent::Frame).collect();
    // The name this account gave them, if any.
    let named = match &peer {
        Peer::Phone(p) => {
            let names = client.connected().await.map_err(explain)?.contact_names().await.map_err(explain)?;
            names.into_iter().find(|c| &c.phone == p).map(|c| format!("{} ({p})", c.name)).unwrap_or_else(|| p.clone())
        }
        Peer::Group(_) => String::new(),
    };
    let title = match (&peer, direct) {
        (Peer::Phone(_), Some(_)) => format!("{named} (🔒 end-to-end encrypted)"),
        (Peer::Phone(_), None) => {
            format!("{named} (not end-to-end encrypted: a device of yours or theirs cannot encrypt yet)")
        }
        (Peer::Group(g), _) => match client.connected().await.map_err(explain)?.group_info(*g).await {
            Ok(info) => format!("group \"{}\" ({g})", info.subject),
            Err(e) => return Err(explain(e)),
        },
    };
    screen
        .say(&format!("Chat with {title}. Type a message and press Enter (`/file PATH` sends a file); Ctrl-D leaves."));
    // The conversation so far; entries shown here are not shown again
    // when the live stream delivers them.
    let mut shown_before = std::collections::HashSet::new();
    if let Ok(h) = client.connected().await
        && let Ok(page) = h.history(0, HISTORY_PAGE).await
    {
        let mut earlier: Vec<(u64, String)> = Vec::new();
        for event in &page.events {
            peers.learn(event, &identity, Some(&h)).await;
            if let Some(line) = describe(event, &identity, Some(&peer), &peers, &|e| crypto.recall(e)) {
                earlier.push((event.seq, line));
            }
        }
        // Newest first from the server; the last few, oldest first.
        earlier.truncate(HISTORY_SHOWN);
        earlier.reverse();
        if !earlier.is_empty() {
            screen.say("— earlier —");
            for (seq, line) in earlier {
                screen.say(&line);
                shown_before.insert(seq);
            }
            screen.say("— now —");
        }
    }
    // The chat's disappearing timer: its newest timer message's (then kept
    // current as timer messages arrive), applied to what is typed here.
    let route = match (&peer, direct) {
        (Peer::Phone(p), Some(group)) => crate::converse::Route::Group { group, direct: Some(p.clone()) },
        (Peer::Phone(p), None) => crate::converse::Route::Plain(p.clone()),
        (Peer::Group(group), _) => crate::converse::Route::Group { group: *group, direct: None },
    };
    let mut timer = match client.connected().await {
        Ok(h) => crate::converse::timer_in(&h, &crypto, &route).await.unwrap_or(0),
        Err(_) => 0,
    };
    if timer > 0 {
        screen.say(&format!(
            "(messages in this chat disappear {} after they are sent)",
            skylark_client::content::timer_words(timer)
        ));
    }
    // My messages in this chat by sequence, for showing ticks as they change.
    let mut mine: BTreeMap<u64, (String, &'static str, Row)> = BTreeMap::new();
    // When "composing" was last sent, while the person is typing.
    let mut composing: Option<tokio::time::Instant> = None;
    let mut last_key = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tokio::select! {
            input = keyboard.next(&mut screen) => match input? {
                Input::Quit => break,
                Input::Edited => {
                    last_key = tokio::time::Instant::now();
                    if !peer_phone.is_empty() && composing.is_none_or(|sent| sent.elapsed() >= TYPING_REFRESH) {
                        if let Ok(handle) = client.connected().await {
                            let _ = handle.typing(&peer_phone, v1::TypingState::Composing).await;
                        }
                        composing = Some(tokio::time::Instant::now());
                    }
                }
                Input::Line(line) => {
                    composing = None;
                    if line.trim().is_empty() {
                        screen.redraw();
                        continue;
                    }
                    // `/file PATH` sends a file (encrypted, uploaded, then
                    // named in the message); anything else is text.
                    let (text, line, attachments) = match line.strip_prefix("/file ") {
                        Some(path) => {
                            let handle = client.connected().await.map_err(explain)?;
                            let path = Path::new(path.trim());
                            match crate::files::upload(&handle, &identity, transport, path, false).await {
                                Ok(file) => {
                                    let shown = format!("📎 {} ({})", file.name, size_words(file.size));
                                    let attachments = vec![file.id.clone()];
                                    let content = skylark_client::content::Content::File {
                                        file,
                                        text: String::new(),
                                        fwd: false,
                                    };
                                    (content.encode(), shown, attachments)
                                }
                                Err(e) => {
                                    screen.say(&format!("  (nothing was sent: {e:#})"));
                                    continue;
                                }
                            }
                        }
                        None => (line.clone(), line, Vec::new()),
                    };
                    let id = client_id();
                    let to = match (&peer, direct) {
                        (&Peer::Group(group), _) | (Peer::Phone(_), Some(group)) => Peer::Group(group),
                        (Peer::Phone(p), None) => Peer::Phone(p.clone()),
                    };
                    let options = SendOptions { expire_after_ms: timer, attachments, ..SendOptions::default() };
                    let ack =
                        send_text(&client, &crypto, &mut events, &mut pending, &to, &id, text, options).await?;
                    let seq = ack.id.unwrap_or_default().seq;
                    let row = screen.say(&format!("  ✓ you: {line}"));
                    mine.insert(seq, (line, "✓", row));
                }
            },
            _ = tick.tick() => {
                if composing.is_some() && last_key.elapsed() >= TYPING_PAUSE {
                    composing = None;
                    if let Ok(handle) = client.connected().await {
                        let _ = handle.typing(&peer_phone, v1::TypingState::Paused).await;
                    }
                }
            }
            event = next_event(&mut pending, &mut events) => {
                let Some(event) = event else { break };
                let frame = match event {
                    ClientEvent::Frame(frame) => frame,
                    ClientEvent::Connected(_) => {
                        if let Ok(handle) = client.connected().await {
                            crate::cli::prepare_crypto(&crypto, &handle).await;
                            if peer_phone.is_empty() {
                                continue;
                            }
                            for p in handle.subscribe_presence(&[peer_phone.as_str()]).await.unwrap_or_default() {
                                screen.say(&presence_line(&p));
                            }
                        }
                        continue;
                    }
                    ClientEvent::Stopped(e) => {
                        if !take_back.should_retake(&e).await? {
                            return Err(explain(e));
                        }
                        (client, events) =
                            Client::start(transport.endpoint(&identity)?, identity.clone(), Backoff::default());
                        screen.say(TAKEN_BACK);
                        continue;
                    }
                    ClientEvent::Disconnected { .. } => continue,
                };
                let Some(LogEvent::Entry(event)) = log_event(&frame) else {
                    if peer_phone.is_empty() {
                        continue;
                    }
                    if let Some(line) = describe_ephemeral(&frame.body, Some(&peer_phone)) {
                        screen.say(&line);
                    }
                    continue;
                };
                let event = &*with_parts(&client, &crypto, event).await?;
                let group = match peer {
                    Peer::Group(g) => g,
                    Peer::Phone(_) => direct.unwrap_or(0),
                };
                // Shown already as history: handled, not shown twice.
                let quiet = shown_before.remove(&event.seq);
                match event.body.as_ref() {
                    Some(Body::Group(g)) if g.group == group => {
                        let from_here = matches!(&g.body, Some(v1::group_event::Body::Message(m))
                            if g.by == identity.account_id && m.sender_device == identity.device_id);
                        // Opened either way: commits change the keys.
                        let shown = crypto.open_event(event);
                        if !from_here {
                            if let Some(line) = crate::groups::describe_group(g, &identity, shown, peers.get(g.group))
                                && !quiet
                            {
                                screen.say(&line);
                            }
                            if let Ok(handle) = client.connected().await {
                                let _ = handle.mark_read(group, g.group_seq).await;
                            }
                        }
                    }
                    Some(Body::Receipt(r)) if group != 0 && r.peer == group => {
                        let mark = if r.kind == ReceiptKind::Read as i32 { "✓✓ (read by all)" } else { "✓✓" };
                        for (_, (text, state, row)) in mine.range_mut(..=r.up_to_seq) {
                            if *state != mark && *state != "✓✓ (read by all)" {
                                *state = mark;
                                *row = screen.replace(*row, &format!("  {mark} you: {text}"));
                            }
                        }
                    }
                    Some(Body::Message(m)) if !peer_phone.is_empty() && m.from_phone == peer_phone => {
                        let id = m.id.unwrap_or_default();
                        if !quiet && let Some(body) = message_text(&text(&m.payload), meta(m.edits, m.deletes, m.expires_at_ms, m.purged), id.sender, false) {
                            let tag = skylark_client::content::id_text(id.sender, id.seq);
                            screen.say(&format!("[{}] {}: {body}  (#{tag})", clock(m.sent_at_ms), m.from_phone));
                        }
                        // The chat is open, so the user sees it now: blue ticks.
                        if let (Some(id), Ok(handle)) = (m.id, client.connected().await) {
                            let _ = handle.mark_read(id.sender, id.seq).await;
                        }
                    }
                    // This window already showed what it sent ("✓ you: …") and
                    // marks what it shows as read; copies of those are noise here.
                    // (Messages sent from the account's other devices still show.)
                    Some(Body::Message(m))
                        if m.id.is_some_and(|id| id.sender == identity.account_id)
                            && m.sender_device == identity.device_id => {}
                    Some(Body::ReadSync(_)) => {}
                    Some(Body::Receipt(r)) if !peer_phone.is_empty() && r.peer_phone == peer_phone => {
                        let mark = if r.kind == ReceiptKind::Read as i32 { "✓✓ (read)" } else { "✓✓" };
                        for (_, (text, state, row)) in mine.range_mut(..=r.up_to_seq) {
                            if *state != mark && *state != "✓✓ (read)" {
                                *state = mark;
                                *row = screen.replace(*row, &format!("  {mark} you: {text}"));
                            }
                        }
                    }
                    _ => {
                        if let Some(line) = describe(event, &identity, Some(&peer), &peers, &|e| crypto.open_event(e))
                            && !quiet
                        {
                            screen.say(&line);
                        }
                    }
                }
                // A timer message (from either side, any device) sets the chat's timer.
                let said = match event.body.as_ref() {
                    Some(Body::Group(g)) if g.group == group => match crypto.recall(event) {
                        Some(skylark_client::e2ee::Shown::Encrypted(t) | skylark_client::e2ee::Shown::Plain(t)) => Some(t),
                        _ => None,
                    },
                    Some(Body::Message(m)) if !peer_phone.is_empty() && (m.from_phone == peer_phone || m.to_phone == peer_phone) => {
                        Some(text(&m.payload))
                    }
                    _ => None,
                };
                if let Some(skylark_client::content::Content::Timer { ms }) =
                    said.as_deref().map(skylark_client::content::Content::parse)
                {
                    timer = ms;
                }
                if let Ok(handle) = client.connected().await {
                    let _ = handle.ack(event.seq).await;
                }
            }
        }
    }
    client.stop().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A terminal that keeps what was written to it.
    #[derive(Clone, Default)]
    struct Tape(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Tape {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn screen(raw: bool, size: (u16, u16)) -> (Screen, Tape) {
        let tape = Tape::default();
        let screen = Screen { raw, typed: "draft".into(), out: Box::new(tape.clone()), rows: 0, size: Some(size) };
        (screen, tape)
    }

    fn written(tape: &Tape) -> String {
        String::from_utf8(std::mem::take(&mut *tape.0.lock().unwrap())).unwrap()
    }

    #[test]
    fn a_tick_change_rewrites_the_line_in_place_while_it_is_in_view() {
        let (mut s, tape) = screen(true, (40, 10));
        let row = s.say("  ✓ you: hello");
        s.say("[12:00] +1555: hi");
        s.say("[12:01] +1555: there");
        written(&tape);
        assert_eq!(s.replace(row, "  ✓✓ you: hello"), row);
        // Three rows up, the line rewritten, back down, the draft again; no new row.
        assert_eq!(written(&tape), "\r\x1b[2K\x1b[3A\r\x1b[2K  ✓✓ you: hello\x1b[3B\r> draft");
        assert_eq!(s.rows, 3);
    }

    #[test]
    fn a_line_out_of_view_or_too_wide_or_not_on_a_terminal_is_printed_anew() {
        let (mut s, tape) = screen(true, (40, 4));
        let row = s.say("  ✓ you: hello");
        for _ in 0..3 {
            s.say("[12:00] +1555: hi");
        }
        written(&tape);
        let again = s.replace(row, "  ✓✓ you: hello");
        assert!(written(&tape).ends_with("  ✓✓ you: hello\r\n> draft"), "scrolled away: a new line");
        assert_eq!(again, Some(4));

        let long = "x".repeat(50);
        let (mut s, _) = screen(true, (40, 10));
        assert_eq!(s.say(&long), None, "a wrapped line is not rewritten");
        assert_eq!(s.rows, 2);

        let (mut s, tape) = screen(false, (40, 10));
        let row = s.say("  ✓ you: hello");
        assert_eq!(row, None);
        s.replace(row, "  ✓✓ you: hello");
        assert_eq!(written(&tape), "  ✓ you: hello\n  ✓✓ you: hello\n");
    }
}
