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
use skylark_client::session::{LogEvent, SessionHandle, log_event};
use skylark_client::{Client, ClientError, Identity, Session};
use skylark_core::PhoneNumber;
use skylark_protocol::v1::{self, ReceiptKind, event::Body};
use std::collections::BTreeMap;
use std::path::Path;
use tokio::io::{AsyncBufReadExt, BufReader};

/// A fresh client message id.
fn client_id() -> String {
    let mut bytes = [0u8; 12];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `HH:MM:SS` (UTC) of a server timestamp.
fn clock(ms: u64) -> String {
    let secs = (ms / 1000) % 86_400;
    format!("{:02}:{:02}:{:02}", secs / 3600, (secs / 60) % 60, secs % 60)
}

fn text(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload).into_owned()
}

fn kind_word(kind: i32) -> &'static str {
    if kind == ReceiptKind::Read as i32 { "read" } else { "delivered" }
}

fn normalise(number: &str) -> Result<String> {
    Ok(PhoneNumber::parse(number).with_context(|| format!("{number:?} is not a phone number"))?.to_string())
}

pub async fn send(profile: &Path, transport: &TransportArgs, to: &str, message: &str) -> Result<()> {
    let identity = Identity::load(profile)?;
    let to = normalise(to)?;
    let (session, _events) = Session::open(&transport.endpoint(&identity), &identity).await.map_err(explain)?;
    let ack = session.handle().send(&to, &client_id(), message.as_bytes().to_vec()).await.map_err(explain)?;
    let id = ack.id.unwrap_or_default();
    println!("✓ sent to {to} at {} (message {}:{})", clock(ack.sent_at_ms), id.sender, id.seq);
    session.close().await;
    Ok(())
}

/// Prints one log event; `only` limits it to one conversation.
fn describe(event: &v1::Event, me: &Identity, only: Option<&str>) -> Option<String> {
    match event.body.as_ref()? {
        Body::Message(m) => {
            let mine = m.id.is_some_and(|id| id.sender == me.account_id);
            let peer = if mine { &m.to_phone } else { &m.from_phone };
            if only.is_some_and(|o| o != peer) {
                return None;
            }
            Some(if mine {
                format!("[{}] you → {}: {}", clock(m.sent_at_ms), m.to_phone, text(&m.payload))
            } else {
                format!("[{}] {}: {}", clock(m.sent_at_ms), m.from_phone, text(&m.payload))
            })
        }
        Body::Receipt(r) => {
            if only.is_some_and(|o| o != r.peer_phone) {
                return None;
            }
            Some(format!("✓✓ {} {} your messages up to #{}", r.peer_phone, kind_word(r.kind), r.up_to_seq))
        }
        Body::ReadSync(r) => {
            if only.is_some_and(|o| o != r.peer_phone) {
                return None;
            }
            Some(format!("(read {}'s messages up to #{} on one of your devices)", r.peer_phone, r.up_to_seq))
        }
        Body::DeviceChange(change) => {
            use v1::device_change::Change;
            Some(match change.change.as_ref()? {
                Change::Linked(d) => format!("(device {} \"{}\" was linked to your account)", d.id, d.name),
                Change::Renamed(d) => format!("(device {} was renamed \"{}\")", d.id, d.name),
                Change::Removed(id) => format!("(device {id} was removed from your account)"),
            })
        }
    }
}

fn start_client(
    profile: &Path,
    transport: &TransportArgs,
) -> Result<(Identity, Client, tokio::sync::mpsc::Receiver<ClientEvent>)> {
    let identity = Identity::load(profile)?;
    let (client, events) = Client::start(transport.endpoint(&identity), identity.clone(), Backoff::default());
    Ok((identity, client, events))
}

pub async fn listen(profile: &Path, transport: &TransportArgs) -> Result<()> {
    let (identity, client, mut events) = start_client(profile, transport)?;
    println!("Listening as {} (Ctrl-C stops).", identity.phone);
    while let Some(event) = events.recv().await {
        match event {
            ClientEvent::Connected(_) => println!("— connected —"),
            ClientEvent::Disconnected { reason, .. } => println!("— disconnected ({reason}); reconnecting —"),
            ClientEvent::Stopped(e) => return Err(explain(e)),
            ClientEvent::Frame(frame) => match log_event(&frame) {
                Some(LogEvent::Entry(event)) => {
                    if let Some(line) = describe(event, &identity, None) {
                        println!("{line}");
                    }
                    if let Ok(handle) = client.connected().await {
                        let _ = handle.ack(event.seq).await;
                    }
                }
                Some(LogEvent::CaughtUp(_)) => println!("— caught up —"),
                None => {}
            },
        }
    }
    Ok(())
}

/// Sends with the same client id until the server acknowledges it, across
/// reconnects (the server drops the duplicates).
async fn send_reliably(client: &Client, to: &str, payload: Vec<u8>) -> Result<v1::SendAck> {
    let id = client_id();
    for _ in 0..10 {
        let handle: SessionHandle = client.connected().await.map_err(explain)?;
        match handle.send(to, &id, payload.clone()).await {
            Ok(ack) => return Ok(ack),
            Err(e @ ClientError::Refused { .. }) => return Err(explain(e)),
            Err(_) => continue,
        }
    }
    bail!("could not send after several reconnects")
}

pub async fn chat(profile: &Path, transport: &TransportArgs, with: &str) -> Result<()> {
    let peer_phone = normalise(with)?;
    let (identity, client, mut events) = start_client(profile, transport)?;
    println!("Chat with {peer_phone}. Type a message and press Enter; Ctrl-D leaves.");
    // My messages in this chat by sequence, for showing ticks as they change.
    let mut mine: BTreeMap<u64, (String, &'static str)> = BTreeMap::new();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                if line.trim().is_empty() {
                    continue;
                }
                let ack = send_reliably(&client, &peer_phone, line.clone().into_bytes()).await?;
                let seq = ack.id.unwrap_or_default().seq;
                println!("  ✓ you: {line}");
                mine.insert(seq, (line, "✓"));
            }
            event = events.recv() => {
                let Some(event) = event else { break };
                let ClientEvent::Frame(frame) = event else {
                    if let ClientEvent::Stopped(e) = event {
                        return Err(explain(e));
                    }
                    continue;
                };
                let Some(LogEvent::Entry(event)) = log_event(&frame) else { continue };
                match event.body.as_ref() {
                    Some(Body::Message(m)) if m.from_phone == peer_phone => {
                        println!("[{}] {}: {}", clock(m.sent_at_ms), m.from_phone, text(&m.payload));
                        // The chat is open, so the user sees it now: blue ticks.
                        if let (Some(id), Ok(handle)) = (m.id, client.connected().await) {
                            let _ = handle.mark_read(id.sender, id.seq).await;
                        }
                    }
                    Some(Body::Receipt(r)) if r.peer_phone == peer_phone => {
                        let mark = if r.kind == ReceiptKind::Read as i32 { "✓✓ (read)" } else { "✓✓" };
                        for (_, (text, state)) in mine.range_mut(..=r.up_to_seq) {
                            if *state != mark && *state != "✓✓ (read)" {
                                *state = mark;
                                println!("  {mark} you: {text}");
                            }
                        }
                    }
                    _ => {
                        if let Some(line) = describe(event, &identity, Some(&peer_phone)) {
                            println!("{line}");
                        }
                    }
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
