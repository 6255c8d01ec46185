//! Handshakes too large for one post, kept "out of line".
//!
//! A commit with its Welcome can outgrow the server's payload limit
//! (`messaging.max_payload_bytes`, 64 KiB by default, which the server
//! states when a device connects): a Welcome carries the group's ratchet
//! tree, about 330 bytes a device, and a commit in a large group an
//! encrypted path secret for each subtree. The device that made it then
//! uploads the Welcome as a blob (the attachments' path), and the commit
//! too when it does not fit in a post by itself ([`Commit::to_upload`]),
//! and posts in their place a short reference that names the blobs and
//! carries the commit when it fits, with the blobs as the post's
//! attachments so that every member may fetch them. Each device downloads
//! only what it needs ([`Engine::parts_needed`]): a member the commit if it
//! is a blob (nothing when the commit came inline, as when one device is
//! added to a large group), a device being added the Welcome; so a Welcome
//! for a few new devices is not carried to every member. A blob holds
//! exactly what the post would have held (MLS messages, with their own
//! encryption and signatures); the reference adds its length and SHA-256,
//! checked before it is opened ([`inline`]).
//!
//! The reference: [`OUT_OF_LINE_MAGIC`], the conversation (1 byte of
//! length, then its id), the number of parts (1 byte), then per part: its
//! kind (1 byte: 1 the commit, 2 the Welcome), where it is (1 byte: 0 in
//! the reference, 1 a blob), its length (4 bytes, big-endian), then the
//! part itself, or its SHA-256 (32 bytes) and blob id (1 byte of length,
//! then ASCII).

use crate::{Commit, E2eeError, Engine};
use sha2::{Digest, Sha256};

/// The first bytes of a post that names its handshake's parts instead of
/// carrying them.
pub const OUT_OF_LINE_MAGIC: &[u8] = b"\0SKMLSO";

/// What a reference takes besides an inline commit: its header and a
/// Welcome's blob, with room to spare.
const REFERENCE_BYTES: usize = 512;

/// Which message a part holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartKind {
    Commit,
    Welcome,
}

impl PartKind {
    fn byte(self) -> u8 {
        match self {
            PartKind::Commit => 1,
            PartKind::Welcome => 2,
        }
    }
}

/// A part of an out-of-line post kept as a blob, as the reference names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub kind: PartKind,
    /// The blob to download (`GET /v1/blobs/{id}`).
    pub id: String,
    pub len: u32,
    pub sha256: [u8; 32],
}

impl Commit {
    /// What to upload when [`Commit::payload`] is larger than `max_post`
    /// (the server's payload limit): its Welcome, and the commit too when
    /// it does not fit in a post by itself; each a payload of its own.
    pub fn to_upload(&self, max_post: usize) -> Vec<(PartKind, &[u8])> {
        let mut parts = Vec::with_capacity(2);
        if self.commit.len() + REFERENCE_BYTES > max_post {
            parts.push((PartKind::Commit, self.commit.as_slice()));
        }
        if let Some(welcome) = &self.welcome {
            parts.push((PartKind::Welcome, welcome.as_slice()));
        }
        parts
    }
}

/// The post that stands for commit `c` of `conversation` once the parts
/// [`Commit::to_upload`] listed are uploaded: `uploaded` names each blob
/// by its part's kind. A commit not among them goes in the post.
pub fn out_of_line(conversation: &[u8], c: &Commit, uploaded: &[(PartKind, String)]) -> Result<Vec<u8>, E2eeError> {
    let bad = |what: &str| Err(E2eeError::Malformed(format!("cannot name that commit's parts: {what}")));
    let Ok(conversation_len) = u8::try_from(conversation.len()) else {
        return bad("the conversation's id is too long");
    };
    let blob = |kind| uploaded.iter().find(|(k, _)| *k == kind).map(|(_, id)| id.as_str());
    let mut parts = vec![(PartKind::Commit, c.commit.as_slice(), blob(PartKind::Commit))];
    match (&c.welcome, blob(PartKind::Welcome)) {
        (Some(welcome), Some(id)) => parts.push((PartKind::Welcome, welcome.as_slice(), Some(id))),
        (None, None) => {}
        _ => return bad("a Welcome goes as a blob"),
    }
    let mut out = OUT_OF_LINE_MAGIC.to_vec();
    out.push(conversation_len);
    out.extend_from_slice(conversation);
    out.push(parts.len() as u8);
    for (kind, bytes, id) in parts {
        let Ok(len) = u32::try_from(bytes.len()) else { return bad("a part is over 4 GiB") };
        out.push(kind.byte());
        out.push(u8::from(id.is_some()));
        out.extend_from_slice(&len.to_be_bytes());
        match id {
            None => out.extend_from_slice(bytes),
            Some(id) => {
                let Ok(id_len) = u8::try_from(id.len()) else { return bad("a blob id is too long") };
                if !id.is_ascii() {
                    return bad("a blob id is not ASCII");
                }
                out.extend_from_slice(&Sha256::digest(bytes));
                out.push(id_len);
                out.extend_from_slice(id.as_bytes());
            }
        }
    }
    Ok(out)
}

/// Where a part is.
enum Placed<'a> {
    Inline(&'a [u8]),
    Blob(Part),
}

/// What a reference names: the conversation, and the parts.
struct Named<'a> {
    conversation: &'a [u8],
    parts: Vec<(PartKind, Placed<'a>)>,
}

/// Reads a reference; `None` when `payload` is not one.
fn parse(payload: &[u8]) -> Option<Result<Named<'_>, E2eeError>> {
    let rest = payload.strip_prefix(OUT_OF_LINE_MAGIC)?;
    Some(parse_body(rest).ok_or_else(|| E2eeError::Malformed("a cut-off or damaged list of a commit's parts".into())))
}

fn parse_body(rest: &[u8]) -> Option<Named<'_>> {
    let mut at = 0;
    let mut take = |n: usize| {
        let slice = rest.get(at..at + n)?;
        at += n;
        Some(slice)
    };
    let conversation_len = take(1)?[0] as usize;
    let conversation = take(conversation_len)?;
    let count = take(1)?[0];
    let mut parts = Vec::with_capacity(2);
    for _ in 0..count.min(2) {
        let kind = match take(1)?[0] {
            1 => PartKind::Commit,
            2 => PartKind::Welcome,
            _ => return None,
        };
        let blob = take(1)?[0];
        let len = u32::from_be_bytes(take(4)?.try_into().ok()?);
        let placed = match blob {
            0 => Placed::Inline(take(len as usize)?),
            1 => {
                let sha256: [u8; 32] = take(32)?.try_into().ok()?;
                let id_len = take(1)?[0] as usize;
                let id = std::str::from_utf8(take(id_len)?).ok()?.to_owned();
                Placed::Blob(Part { kind, id, len, sha256 })
            }
            _ => return None,
        };
        parts.push((kind, placed));
    }
    (count <= 2 && at == rest.len()).then_some(Named { conversation, parts })
}

impl Engine {
    /// The parts of an out-of-line post this device must download before
    /// opening it, in order; `None` when `payload` is not one. `from_me`:
    /// this device posted it (its own commit, back from the log), and
    /// needs the commit only. A device that is an active member of the
    /// conversation needs the commit, and the Welcome as well when it is
    /// alone in a group of its own (it started the conversation at the
    /// same time as another device, whose start came first: that commit
    /// is not for its group, the Welcome is). Any other device needs the
    /// Welcome, if there is one: nothing at all is for it otherwise. A
    /// part that came in the post is not listed.
    pub fn parts_needed(&self, payload: &[u8], from_me: bool) -> Result<Option<Vec<Part>>, E2eeError> {
        let Some(parsed) = parse(payload) else { return Ok(None) };
        let Named { conversation, parts } = parsed?;
        let alone = self.look(conversation, |g| g.is_active().then(|| g.members().count() == 1)).ok().flatten();
        let wanted = |kind| match alone {
            _ if from_me => kind == PartKind::Commit,
            Some(false) => kind == PartKind::Commit,
            Some(true) => true,
            None => kind == PartKind::Welcome,
        };
        Ok(Some(
            parts
                .into_iter()
                .filter_map(|(kind, placed)| match placed {
                    Placed::Blob(part) if wanted(kind) => Some(part),
                    _ => None,
                })
                .collect(),
        ))
    }
}

/// The payload to open in place of an out-of-line post (`payload`), from
/// the commit it carries and the parts downloaded (those
/// [`Engine::parts_needed`] listed), each checked against the length and
/// digest the post gave it: the commit with its Welcome as the bundle
/// [`Commit::payload`] would have posted, or the one of them there is.
/// Empty when there is neither (nothing of it is for this device).
pub fn inline(payload: &[u8], fetched: &[(Part, Vec<u8>)]) -> Result<Vec<u8>, E2eeError> {
    let Some(parsed) = parse(payload) else { return Ok(payload.to_vec()) };
    let Named { parts, .. } = parsed?;
    for (part, bytes) in fetched {
        if bytes.len() != part.len as usize || Sha256::digest(bytes).as_slice() != part.sha256 {
            return Err(E2eeError::Malformed(format!(
                "the downloaded {} does not match the one its post names (altered or damaged on the way)",
                match part.kind {
                    PartKind::Commit => "encryption change",
                    PartKind::Welcome => "invitation to the conversation's encryption",
                }
            )));
        }
    }
    let find = |kind| {
        parts.iter().find_map(|(k, placed)| match placed {
            Placed::Inline(bytes) if *k == kind => Some(bytes.to_vec()),
            Placed::Blob(part) if *k == kind => {
                fetched.iter().find(|(p, _)| p.id == part.id).map(|(_, bytes)| bytes.clone())
            }
            _ => None,
        })
    };
    Ok(match (find(PartKind::Commit), find(PartKind::Welcome)) {
        (Some(commit), welcome) => Commit { epoch: 0, commit, welcome }.payload(),
        (None, Some(welcome)) => welcome,
        (None, None) => Vec::new(),
    })
}
