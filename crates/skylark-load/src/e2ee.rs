//! An end-to-end encrypted group against a real server, every member a full
//! SDK device (`skylark_client::e2ee::Crypto`, its MLS state in its own
//! profile directory, written durably as the CLI writes it): what starting
//! the group's encryption, a message, a removal, and members' first posts
//! (each after a commit of the member's fresh keys) cost end to end, and
//! how large the removal's commit is before and after those first posts.

use crate::provision::Manifest;
use crate::scenarios::{Target, open};
use crate::stats::progress;
use serde::{Deserialize, Serialize};
use skylark_client::e2ee::{Crypto, Setup, Shown};
use skylark_client::session::{Event, LogEvent, SessionHandle, log_event};
use skylark_protocol::v1::{self, change_group::Change, event::Body, group_event::Body as GroupBody};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct E2eeGroupReport {
    pub scenario: String,
    pub members: usize,
    /// Connecting every device and publishing its key packages.
    pub setup_seconds: f64,
    /// The creator's start: claiming every device's key package and
    /// posting the commits that add them (32 per commit), Welcomes as blobs.
    pub start_seconds: f64,
    /// From the start's end until every member opened the creator's first
    /// message (each downloads its Welcome and applies the later commits).
    pub welcome_to_last_seconds: f64,
    /// A message from the creator, every member caught up: post to the last
    /// member that opened it.
    pub message_to_last_seconds: f64,
    /// Removing one device before any member posted: the commit's size as a
    /// member applies it, and from the removal to the last member that
    /// opened the next message.
    pub removal_before_bytes: usize,
    pub removal_before_seconds: f64,
    /// Members who then post for the first time, one after another (each
    /// commits fresh keys first): their commits' sizes, in order.
    pub first_posts: usize,
    /// Whether the posters were the first members (neighbours in the tree)
    /// rather than spread over the group.
    pub consecutive: bool,
    pub refresh_bytes: Vec<usize>,
    pub first_posts_seconds: f64,
    /// Removing another device after those first posts.
    pub removal_after_bytes: usize,
    pub removal_after_seconds: f64,
}

/// What every member task records.
struct Shared {
    /// Per marker text: how many members opened it.
    opened: Mutex<HashMap<String, usize>>,
    /// Per group sequence: the size of a commit as a member applied it.
    commits: Mutex<BTreeMap<u64, usize>>,
}

/// A member's task, told to post.
type Post = (String, oneshot::Sender<Result<(), String>>);

/// Runs the scenario: `members` devices (accounts 0.. of the manifest; 0
/// creates the group), `first_posts` of them posting once after the first
/// removal: spread evenly over the members (so over the tree), or the
/// first ones (`consecutive`: neighbours in the tree, the case where their
/// refreshes shrink others' commits least). Profiles go under `profiles`,
/// which should be empty.
pub async fn e2ee_group(
    target: &Target,
    manifest: &Manifest,
    members: usize,
    first_posts: usize,
    consecutive: bool,
    profiles: &Path,
) -> Result<E2eeGroupReport, String> {
    if members < 4 || first_posts + 3 > members {
        return Err(format!("{members} members leave no room for {first_posts} first posts and two removals"));
    }
    let setup = Instant::now();
    let mut devices = Vec::with_capacity(members);
    for m in 0..members {
        let (session, events) = open(target, manifest, m).await?;
        let identity = manifest.identity(m, &target.http_base);
        let crypto = Crypto::open(&profiles.join(format!("d{m}")), &identity).map_err(|e| e.to_string())?;
        crypto.replenish(&session.handle()).await.map_err(|e| format!("device {m} publishing keys: {e}"))?;
        devices.push((session, events, crypto));
        progress("e2ee-group (devices)", m as u64 + 1, members as u64);
    }
    let setup_seconds = setup.elapsed().as_secs_f64();

    let (admin_session, mut admin_events, admin) = devices.remove(0);
    let h = admin_session.handle();
    let phones: Vec<&str> = manifest.accounts[1..members].iter().map(|a| a.phone.as_str()).collect();
    let info = h.create_group("e2ee", &phones).await.map_err(|e| e.to_string())?;
    let group = info.id;
    let t = Instant::now();
    match admin.start_group(&h, &mut admin_events, &info).await.map_err(|e| format!("starting: {e}"))? {
        Setup::Encrypted => {}
        Setup::Plain { without_keys } => return Err(format!("devices without keys: {without_keys:?}")),
    }
    let start_seconds = t.elapsed().as_secs_f64();
    eprintln!("group {group}: encryption started for {members} devices in {start_seconds:.1} s");

    let shared = Arc::new(Shared { opened: Mutex::default(), commits: Mutex::default() });
    let mut posters = Vec::new();
    let mut tasks = Vec::new();
    for (i, (session, events, crypto)) in devices.into_iter().enumerate() {
        let me = manifest.accounts[i + 1].account_id;
        let (tx, rx) = mpsc::channel::<Post>(1);
        posters.push(tx);
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            let result = member(&session.handle(), events, &crypto, group, &shared, rx, me).await;
            drop(session);
            result.map_err(|e| {
                let e = format!("member {}: {e}", i + 1);
                eprintln!("{e}");
                e
            })
        }));
    }
    let mut everyone = members - 1;
    let mut a = Admin { crypto: admin, h, events: admin_events, group };

    let t = Instant::now();
    a.say("mark:first").await?;
    a.wait_opened(&shared, "mark:first", everyone).await?;
    let welcome_to_last_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    a.say("mark:hello").await?;
    a.wait_opened(&shared, "mark:hello", everyone).await?;
    let message_to_last_seconds = t.elapsed().as_secs_f64();

    // A removal before anyone else posted: the tree as the start left it.
    let (removal_before_bytes, removal_before_seconds) =
        a.remove(manifest, members - 1, &shared, &mut everyone).await?;

    // First posts, one after another; each commits fresh keys first.
    let before = last_seq(&shared);
    let t = Instant::now();
    // Members 1 to members - 3 may post (the last two are removed).
    let stride = if consecutive { 1 } else { ((members - 3) / first_posts.max(1)).max(1) };
    for (k, poster) in posters.iter().step_by(stride).enumerate().take(first_posts) {
        let (done, answer) = oneshot::channel();
        poster.send((format!("mark:first-post-{k}"), done)).await.map_err(|_| "a member task ended".to_owned())?;
        answer.await.map_err(|_| "a member task ended".to_owned())??;
        a.drain().await;
    }
    let last = format!("mark:first-post-{}", first_posts.saturating_sub(1));
    if first_posts > 0 {
        a.wait_opened(&shared, &last, everyone - 1).await?;
    }
    let first_posts_seconds = t.elapsed().as_secs_f64();
    let refresh_bytes: Vec<usize> = lock(&shared.commits).range(before + 1..).map(|(_, &n)| n).collect();

    let (removal_after_bytes, removal_after_seconds) = a.remove(manifest, members - 2, &shared, &mut everyone).await?;

    a.say("mark:end").await?;
    drop(posters);
    for task in tasks {
        task.await.map_err(|e| e.to_string())??;
    }
    Ok(E2eeGroupReport {
        scenario: "e2ee-group".into(),
        members,
        setup_seconds,
        start_seconds,
        welcome_to_last_seconds,
        message_to_last_seconds,
        removal_before_bytes,
        removal_before_seconds,
        first_posts,
        consecutive,
        refresh_bytes,
        first_posts_seconds,
        removal_after_bytes,
        removal_after_seconds,
    })
}

/// The group's creator, which posts the markers and makes the removals.
struct Admin {
    crypto: Crypto,
    h: SessionHandle,
    events: mpsc::Receiver<Event>,
    group: u64,
}

impl Admin {
    /// Posts `text` (encrypted) to the group.
    async fn say(&mut self, text: &str) -> Result<(), String> {
        let Admin { crypto, h, events, group } = self;
        crypto.post(h, events, *group, text, text).await.map(|_| ()).map_err(|e| format!("posting: {e}"))
    }

    /// Removes member `index` (from the group, then from its keys), posts a
    /// marker, and waits for every remaining member to open it: the
    /// commit's size and the time from the removal to the last member's open.
    async fn remove(
        &mut self,
        manifest: &Manifest,
        index: usize,
        shared: &Shared,
        everyone: &mut usize,
    ) -> Result<(usize, f64), String> {
        self.drain().await;
        let before = last_seq(shared);
        let t = Instant::now();
        let who = &manifest.accounts[index];
        self.h.change_group(self.group, Change::Remove(who.phone.clone())).await.map_err(|e| e.to_string())?;
        let Admin { crypto, h, events, group } = self;
        if !crypto.remove_accounts(h, events, *group, &[who.account_id]).await.map_err(|e| format!("removing: {e}"))? {
            return Err("the removal changed nothing".into());
        }
        *everyone -= 1;
        let text = format!("mark:after-removing-{index}");
        self.say(&text).await?;
        self.wait_opened(shared, &text, *everyone).await?;
        let seconds = t.elapsed().as_secs_f64();
        let bytes = lock(&shared.commits).range(before + 1..).map(|(_, &n)| n).next_back().unwrap_or(0);
        Ok((bytes, seconds))
    }

    /// Reads and opens what the creator's device was handed meanwhile
    /// (acknowledging it), so its state is current and the server's window
    /// to it stays open.
    async fn drain(&mut self) {
        while let Ok(Some(Event::Frame(frame))) =
            tokio::time::timeout(Duration::from_millis(5), self.events.recv()).await
        {
            self.open(&frame).await;
        }
    }

    async fn open(&self, frame: &skylark_protocol::ServerFrame) {
        if let Some(LogEvent::Entry(entry)) = log_event(frame) {
            if let Ok(entry) = self.crypto.fetch_parts(&self.h, entry).await {
                self.crypto.open_event(&entry);
            }
            let _ = self.h.ack(entry.seq).await;
        }
    }

    /// Waits until `count` members opened `text`, reading the creator's
    /// log meanwhile; gives up after ten minutes.
    async fn wait_opened(&mut self, shared: &Shared, text: &str, count: usize) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let seen = lock(&shared.opened).get(text).copied().unwrap_or(0);
            if seen >= count {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("{seen} of {count} members opened {text:?} in ten minutes"));
            }
            progress(&format!("e2ee-group ({text})"), seen as u64, count as u64);
            if let Ok(Some(Event::Frame(frame))) =
                tokio::time::timeout(Duration::from_millis(100), self.events.recv()).await
            {
                self.open(&frame).await;
            }
        }
    }
}

/// The lock's data, also after a panic elsewhere held it.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The newest commit's group sequence recorded so far (0 for none).
fn last_seq(shared: &Shared) -> u64 {
    lock(&shared.commits).keys().next_back().copied().unwrap_or(0)
}

/// A member: reads its log (opening every post of the group, downloading
/// the parts of commits kept as files), and posts when told. Ends at the
/// marker `mark:end`, or when it is removed.
async fn member(
    h: &SessionHandle,
    mut events: mpsc::Receiver<Event>,
    crypto: &Crypto,
    group: u64,
    shared: &Shared,
    mut posts: mpsc::Receiver<Post>,
    me: u64,
) -> Result<(), String> {
    let conversation = skylark_client::e2ee::group_conversation(group);
    let mut welcomed = false;
    loop {
        let frames = tokio::select! {
            Some((text, done)) = posts.recv() => {
                let posted = crypto.post(h, &mut events, group, &text.clone(), &text).await;
                let _ = done.send(posted.map(|_| ()).map_err(|e| e.to_string()));
                crypto.take_read()
            }
            event = events.recv() => match event {
                Some(Event::Frame(frame)) => vec![frame],
                Some(Event::Closed { reason, .. }) => return Err(format!("the session closed: {reason}")),
                None => return Err("the session ended".into()),
            },
        };
        for frame in frames {
            let Some(LogEvent::Entry(entry)) = log_event(&frame) else { continue };
            h.ack(entry.seq).await.map_err(|e| e.to_string())?;
            let Some(Body::Group(g)) = &entry.body else { continue };
            if g.group != group {
                continue;
            }
            // Taken out of the group: the server sends it nothing of the
            // group after this (its removal's commit included).
            if matches!(&g.body, Some(GroupBody::Removed(m)) if m.account == me) {
                return Ok(());
            }
            let entry = crypto.fetch_parts(h, entry).await.map_err(|e| e.to_string())?;
            // A post that moves this device's epoch on is a commit: its
            // size as this member applied it (a part kept as a file
            // downloaded and put in its place).
            let epoch = || crypto.with(|e| e.epoch(&conversation)).ok();
            let before = epoch();
            let shown = match crypto.recall(&entry) {
                Some(shown) => Some(shown),
                None => crypto.open_event(&entry),
            };
            if let Some(Body::Group(v1::GroupEvent { body: Some(GroupBody::Message(m)), group_seq, .. })) = &entry.body
                && epoch() > before
            {
                lock(&shared.commits).entry(*group_seq).or_insert(m.payload.len());
            }
            if let Some(Shown::Encrypted(text)) = shown
                && text.starts_with("mark:")
            {
                let mut opened = lock(&shared.opened);
                *opened.entry(text.clone()).or_insert(0) += 1;
                if text == "mark:end" {
                    return Ok(());
                }
            }
            let member_now = crypto.encrypts(group).map_err(|e| e.to_string())?;
            if welcomed && !member_now {
                return Ok(()); // removed
            }
            welcomed |= member_now;
        }
    }
}
