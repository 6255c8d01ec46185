//! What a message says, as Skylark's clients write it in the payload.
//!
//! The server never reads this: in an end-to-end encrypted conversation it
//! is the plaintext inside the ciphertext. A payload is either plain UTF-8
//! text (what every client has always sent) or [`MARK`] followed by one
//! JSON object tagged by `"t"`:
//!
//! | `t` | fields | meaning |
//! | --- | --- | --- |
//! | `text` | `text`, `reply`?, `fwd`? | a message, perhaps quoting another or forwarded |
//! | `react` | `to`, `emoji` | the sender's reaction to a message (`emoji` empty: taken back); one per person per message, the newest wins |
//! | `timer` | `ms` | the sender set the conversation's disappearing timer (0: off) |
//! | `delete` | — | the body of a deletion for everyone (the server's `deletes` names the message) |
//! | `file` | `file` (a [`FileRef`]), `text`?, `fwd`? | an attachment (photo, voice note, document) with an optional caption |
//!
//! A message is named by its id as `SENDER:SEQ` (its `MessageId`; for a
//! group post the sender is the group and the sequence the group's). An
//! edit is an ordinary `text` content sent with the server's `edits` set.
//! The web client (`web/app.js`) reads and writes the same format.

pub use crate::media::FileRef;
use serde::{Deserialize, Serialize};

/// The first character of a structured payload (never the start of a text
/// someone types; encrypted payloads start with a NUL byte).
pub const MARK: char = '\u{1}';

/// A message's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
pub enum Content {
    Text {
        text: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply: Option<Quote>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        fwd: bool,
    },
    React {
        to: String,
        emoji: String,
    },
    Timer {
        ms: u64,
    },
    Delete {},
    /// An attachment: where its encrypted bytes are and how to read them
    /// (the message's `attachments` names the same blob for the server).
    File {
        file: FileRef,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        text: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        fwd: bool,
    },
    /// A structured content this version does not know (from a newer client).
    #[serde(skip)]
    Unknown,
}

/// The message a reply quotes: its id and the start of its text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quote {
    pub id: String,
    pub quote: String,
}

/// The longest quote carried in a reply, in characters.
pub const QUOTE_CHARS: usize = 80;

impl Content {
    pub fn text(text: &str) -> Content {
        Content::Text { text: text.to_owned(), reply: None, fwd: false }
    }

    /// Reads a payload's text (decrypted, when it was encrypted).
    pub fn parse(payload: &str) -> Content {
        match payload.strip_prefix(MARK) {
            Some(json) => serde_json::from_str(json).unwrap_or(Content::Unknown),
            None => Content::text(payload),
        }
    }

    /// The payload's text: plain text as it is (readable by any client),
    /// anything else structured.
    pub fn encode(&self) -> String {
        match self {
            Content::Text { text, reply: None, fwd: false } if !text.starts_with(MARK) => text.clone(),
            other => format!("{MARK}{}", serde_json::to_string(other).unwrap_or_default()),
        }
    }

    /// A line for people: what this content says. Message ids it names are
    /// shown as `in_chat` says (say, the bare sequence for the chat's own
    /// group).
    pub fn describe(&self, in_chat: &dyn Fn(&str) -> String) -> String {
        match self {
            Content::Text { text, reply, fwd } => {
                let mut out = String::new();
                if let Some(q) = reply {
                    out.push_str(&format!("↪ replying to #{} \"{}\": ", in_chat(&q.id), q.quote));
                }
                if *fwd {
                    out.push_str("(forwarded) ");
                }
                out.push_str(text);
                out
            }
            Content::React { to, emoji } if emoji.is_empty() => {
                format!("took back the reaction to #{}", in_chat(to))
            }
            Content::React { to, emoji } => format!("reacted {emoji} to #{}", in_chat(to)),
            Content::Timer { ms: 0 } => "turned off disappearing messages".to_owned(),
            Content::Timer { ms } => format!("set disappearing messages to {}", timer_words(*ms)),
            Content::Delete {} => "deleted a message".to_owned(),
            Content::File { file, text, fwd } => {
                let mut out = String::new();
                if *fwd {
                    out.push_str("(forwarded) ");
                }
                if file.voice {
                    let secs = file.ms.unwrap_or(0).div_ceil(1000);
                    out.push_str(&format!("🎤 voice note ({}:{:02})", secs / 60, secs % 60));
                } else {
                    out.push_str(&format!("📎 {} ({})", file.name, crate::media::size_words(file.size)));
                }
                if !text.is_empty() {
                    out.push_str(": ");
                    out.push_str(text);
                }
                out
            }
            Content::Unknown => "[a kind of message this version cannot show; update skylark]".to_owned(),
        }
    }
}

/// The start of a text for a quote: at most [`QUOTE_CHARS`] characters.
pub fn quote_of(text: &str) -> String {
    let mut q: String = text.chars().take(QUOTE_CHARS).collect();
    if text.chars().count() > QUOTE_CHARS {
        q.push('…');
    }
    q
}

/// The disappearing timers the clients offer, as (ms, words).
pub const TIMERS: [(u64, &str); 4] =
    [(0, "off"), (86_400_000, "24 hours"), (7 * 86_400_000, "7 days"), (90 * 86_400_000, "90 days")];

/// A timer in words ("24 hours"; any other length in the largest whole unit).
pub fn timer_words(ms: u64) -> String {
    if let Some((_, words)) = TIMERS.iter().find(|(t, _)| *t == ms) {
        return (*words).to_owned();
    }
    let plural = |n: u64, unit: &str| format!("{n} {unit}{}", if n == 1 { "" } else { "s" });
    match ms {
        ms if ms % 86_400_000 == 0 => plural(ms / 86_400_000, "day"),
        ms if ms % 3_600_000 == 0 => plural(ms / 3_600_000, "hour"),
        ms if ms % 60_000 == 0 => plural(ms / 60_000, "minute"),
        ms => plural(ms.div_ceil(1000), "second"),
    }
}

/// Reads a timer as people write it: `off`, `24h`, `7d`, `90d`, or any
/// number with `s`, `m`, `h` or `d`.
pub fn parse_timer(text: &str) -> Option<u64> {
    let text = text.trim().to_ascii_lowercase();
    if text == "off" || text == "0" {
        return Some(0);
    }
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = number.parse().ok()?;
    let unit_ms = match unit {
        "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(unit_ms).filter(|ms| *ms > 0)
}

/// A message id as people and contents write it.
pub fn id_text(sender: u64, seq: u64) -> String {
    format!("{sender}:{seq}")
}

/// An id as shown in a chat whose own messages are `chat`'s: the bare
/// sequence for those, `SENDER:SEQ` for any other.
pub fn id_in_chat(id: &str, chat: u64) -> String {
    match parse_id(id) {
        Some((sender, seq)) if sender == chat => seq.to_string(),
        _ => id.to_owned(),
    }
}

/// Reads `SENDER:SEQ`.
pub fn parse_id(text: &str) -> Option<(u64, u64)> {
    let (sender, seq) = text.trim().trim_start_matches('#').split_once(':')?;
    Some((sender.parse().ok()?, seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_stays_plain_and_everything_round_trips() {
        assert_eq!(Content::text("hello").encode(), "hello", "any client can read a plain message");
        assert_eq!(Content::parse("hello"), Content::text("hello"));
        for c in [
            Content::Text {
                text: "yes".into(),
                reply: Some(Quote { id: "7:3".into(), quote: "lunch?".into() }),
                fwd: false,
            },
            Content::Text { text: "look".into(), reply: None, fwd: true },
            Content::React { to: "7:3".into(), emoji: "👍".into() },
            Content::React { to: "7:3".into(), emoji: String::new() },
            Content::Timer { ms: 86_400_000 },
            Content::Delete {},
            Content::File {
                file: crate::media::seal(b"x").reference("00112233445566778899aabbccddeeff", "a.txt", "text/plain", 1),
                text: "see".into(),
                fwd: false,
            },
            Content::text("\u{1}not json"),
        ] {
            let encoded = c.encode();
            assert_eq!(Content::parse(&encoded), c, "{encoded:?}");
        }
        assert_eq!(Content::parse("\u{1}{\"t\":\"poll\"}"), Content::Unknown);
    }

    #[test]
    fn timers_and_ids_read_as_people_write_them() {
        assert_eq!(parse_timer("24h"), Some(86_400_000));
        assert_eq!(parse_timer("7d"), Some(7 * 86_400_000));
        assert_eq!(parse_timer("off"), Some(0));
        assert_eq!(parse_timer("3s"), Some(3000));
        assert_eq!(parse_timer("soon"), None);
        assert_eq!(parse_timer("0d"), None);
        assert_eq!(timer_words(90 * 86_400_000), "90 days");
        assert_eq!(timer_words(3000), "3 seconds");
        assert_eq!(parse_id("#12:5"), Some((12, 5)));
        assert_eq!(parse_id("5"), None);
        assert_eq!(quote_of(&"x".repeat(100)).chars().count(), QUOTE_CHARS + 1);
    }
}
