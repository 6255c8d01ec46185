//! Cluster mode: many identical nodes sharing the PostgreSQL store, with
//! core NATS carrying mail between actors on different nodes.
//!
//! **Membership.** Every node writes a heartbeat to the store every
//! `beat_ms` with a lease of `lease_ms` (the database's clock); the live
//! nodes are those whose lease has not run out. A node that stops beating is
//! out of every other node's view within `lease_ms + beat_ms` (7 s by
//! default). A node that finds its own lease lapsed (it was paused or cut
//! off) hands every actor away before taking new ones.
//!
//! **Placement.** The owner of an actor (account or group) is the live,
//! non-draining node with the highest rendezvous score for it, so a join or
//! a departure moves only the actors of that node. Ownership itself is a
//! lease row in the store with an epoch: a node takes an actor over only
//! when it is free, released, or held by a node that is no longer live,
//! and every write of the actor carries its epoch, which the database
//! checks in the same transaction ([`skylark_store::LeaseStore`]). A former
//! owner that wakes up cannot write: its writes are refused, its actor
//! stops, and its successor reloads from the store.
//!
//! **Routing.** [`crate::registry::Registry::tell`] asks [`Cluster::owner`]
//! where an actor lives; mail for another node is encoded ([`wire`]) and
//! published to that node's subject, with a reply subject when an answer
//! is awaited. A connection attached to an actor elsewhere gets its events
//! on a stream subject of its own node, numbered so a gap ends the stream
//! (the device reconnects and resumes from its durable cursor). Nothing
//! rests on NATS delivering: a lost forward is retried by its outbox, a lost
//! request times out and the device resends with the same client id.

mod links;
mod sessions;
pub(crate) mod wire;

use crate::actor::{AttachMail, Ctx, DeliverMail, GroupMail, Msg, PostMail, SendMail};
use crate::lane;
use crate::messaging::{DeviceEvent, MessagingError};
use crate::presence::Presence;
use bytes::Bytes;
use futures_util::StreamExt;
use skylark_core::AccountId;
use skylark_store::{Acquired, Store, StoreError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wire::{Answer, Broadcast, Mail, StreamEvent};

/// Every node's presence notes (connections, typing), heard by all.
const PRESENCE_SUBJECT: &str = "skylark.presence";
/// Approvals of link codes: every node hears them, the one holding the
/// code answers.
const LINK_APPROVE_SUBJECT: &str = "skylark.links.approve";
/// The operator's questions about live sessions, to every node (`sessions`).
const SESSIONS_SUBJECT: &str = "skylark.sessions";
/// How long an asker waits for every node's answer about its sessions.
const SESSIONS_WAIT: Duration = Duration::from_secs(2);
/// How long an approval waits for the node holding its code.
const LINK_APPROVE_WAIT: Duration = Duration::from_secs(2);

fn links_subject(node: &str) -> String {
    format!("skylark.node.{node}.links")
}

/// `[cluster]` in the configuration file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's name: unique in the cluster, letters, digits, `-` and `_`.
    pub node: String,
    /// NATS servers (`nats://host:port`); the client fails over between them.
    pub nats: Vec<String>,
    /// Where devices reach this node (`host:port` of its HTTP listener): shown
    /// to operators, and listed to clients at `GET /v1/nodes`.
    pub advertise: String,
    /// How long a heartbeat keeps a node live.
    pub lease_ms: u64,
    /// How often a node beats (and re-reads the membership).
    pub beat_ms: u64,
    /// How long a request to another node may take before it is answered
    /// "unreachable" (the device retries).
    pub request_timeout_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            node: String::new(),
            nats: vec!["nats://127.0.0.1:4222".into()],
            advertise: String::new(),
            lease_ms: 6_000,
            beat_ms: 1_000,
            request_timeout_ms: 5_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "the node name {0:?} is not usable: give each node a name of 1 to 64 letters, digits, '-' or '_' (--cluster-node)"
    )]
    BadNodeName(String),
    #[error("the heartbeat lease ({lease_ms} ms) must be at least twice the beat interval ({beat_ms} ms)")]
    BadTiming { lease_ms: u64, beat_ms: u64 },
    #[error("no NATS server is configured: give at least one with --nats nats://HOST:PORT")]
    NoNats,
    #[error("the NATS address {0:?} is not a NATS URL (nats://HOST:PORT)")]
    BadNatsUrl(String),
    #[error("could not reach NATS at {urls}: {reason}. Start nats-server, or point --nats at a running one.")]
    Nats { urls: String, reason: String },
    #[error("could not join the cluster: {0}")]
    Store(#[from] StoreError),
}

/// The membership as of the last heartbeat.
#[derive(Debug, Default)]
struct View {
    /// Every live node (draining ones included): a takeover may not take
    /// an actor from any of them.
    live: Vec<String>,
    /// Live nodes that take actors, with their rendezvous seeds.
    placement: Vec<(String, u64)>,
    /// The advertised address of each node in `placement` (same order):
    /// where devices can reach it.
    addresses: Vec<String>,
}

/// A connection of this node attached to an actor on another node.
struct RemoteStream {
    node: String,
    next: u64,
    events: lane::Sender<DeviceEvent>,
}

pub struct Cluster {
    config: ClusterConfig,
    store: Arc<dyn Store>,
    nats: async_nats::Client,
    view: RwLock<Arc<View>>,
    /// Set when this node is draining (by an operator, or before it stops).
    draining: watch::Sender<bool>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Bytes>>>,
    next_request: AtomicU64,
    streams: Mutex<HashMap<u64, RemoteStream>>,
    ctx: Weak<crate::actor::Context>,
    /// This node's presence notes and hellos, on their way to the bus.
    presence: std::sync::OnceLock<(Weak<Presence>, tokio::sync::mpsc::UnboundedSender<Broadcast>)>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("node", &self.config.node).finish_non_exhaustive()
    }
}

fn valid_node_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A fixed 64-bit mix (splitmix64's finaliser).
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A node name's rendezvous seed (FNV-1a, then mixed).
fn seed(node: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in node.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

/// The node with the highest score for `actor` (ties by name).
fn rendezvous(placement: &[(String, u64)], actor: AccountId) -> Option<&str> {
    placement
        .iter()
        .max_by_key(|(name, seed)| (mix(seed ^ mix(actor.0)), std::cmp::Reverse(name.as_str())))
        .map(|(name, _)| name.as_str())
}

/// Where `account`'s actor lives when exactly the nodes named in `nodes`
/// are live and none is draining (for tools and tests that must know
/// which node to stop).
pub fn home_node<'a>(nodes: &[&'a str], account: AccountId) -> Option<&'a str> {
    let placement: Vec<(String, u64)> = nodes.iter().map(|n| ((*n).to_owned(), seed(n))).collect();
    let home = rendezvous(&placement, account)?;
    nodes.iter().copied().find(|n| *n == home)
}

fn mail_subject(node: &str) -> String {
    format!("skylark.node.{node}.mail")
}

fn reply_subject(node: &str, id: u64) -> String {
    format!("skylark.node.{node}.reply.{id}")
}

fn stream_subject(node: &str, connection: u64) -> String {
    format!("skylark.node.{node}.stream.{connection}")
}

/// The number at the end of a subject (`….reply.7` → 7).
fn last_number(subject: &str) -> Option<u64> {
    subject.rsplit('.').next()?.parse().ok()
}

/// The answer of the kind `pick` takes, or the error it carries.
fn answer_as<T>(answer: Result<Answer, MessagingError>, pick: fn(Answer) -> Option<T>) -> Result<T, MessagingError> {
    pick(answer?).ok_or(MessagingError::Internal("an answer of the wrong kind from another node"))
}

fn unreachable() -> MessagingError {
    MessagingError::NodeUnreachable
}

impl Cluster {
    /// Connects to NATS, joins the membership and starts routing for `ctx`'s
    /// actors. Fails in words when NATS or the store cannot be reached.
    pub(crate) async fn start(
        config: ClusterConfig,
        store: Arc<dyn Store>,
        ctx: &Ctx,
    ) -> Result<Arc<Self>, ClusterError> {
        if !valid_node_name(&config.node) {
            return Err(ClusterError::BadNodeName(config.node));
        }
        if config.lease_ms < 2 * config.beat_ms || config.beat_ms == 0 {
            return Err(ClusterError::BadTiming { lease_ms: config.lease_ms, beat_ms: config.beat_ms });
        }
        if config.nats.is_empty() {
            return Err(ClusterError::NoNats);
        }
        let mut addrs = Vec::new();
        for url in &config.nats {
            addrs.push(url.parse::<async_nats::ServerAddr>().map_err(|_| ClusterError::BadNatsUrl(url.clone()))?);
        }
        let urls = config.nats.join(", ");
        let (lost_tx, mut lost_rx) = tokio::sync::mpsc::unbounded_channel();
        let options = async_nats::ConnectOptions::new()
            .name(format!("skylark-{}", config.node))
            .connection_timeout(Duration::from_secs(3))
            .subscription_capacity(64 * 1024)
            .event_callback(move |event| {
                let lost = lost_tx.clone();
                async move {
                    match event {
                        async_nats::Event::Disconnected => drop(lost.send(false)),
                        async_nats::Event::Connected => drop(lost.send(true)),
                        _ => {}
                    }
                }
            });
        let nats = tokio::time::timeout(Duration::from_secs(5), options.connect(addrs))
            .await
            .map_err(|_| ClusterError::Nats { urls: urls.clone(), reason: "no answer within 5 s".into() })?
            .map_err(|e| ClusterError::Nats { urls: urls.clone(), reason: e.to_string() })?;
        // A clean start clears a drain flag left by an earlier run.
        store.beat(&config.node, &config.advertise, config.lease_ms).await?;
        store.set_draining(&config.node, false).await?;
        let cluster = Arc::new(Self {
            store,
            nats,
            view: RwLock::new(Arc::new(View::default())),
            draining: watch::channel(false).0,
            pending: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            streams: Mutex::new(HashMap::new()),
            ctx: Arc::downgrade(ctx),
            presence: std::sync::OnceLock::new(),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            config,
        });
        cluster.beat().await?;
        let subscribe = |subject: String| {
            let nats = cluster.nats.clone();
            async move { nats.subscribe(subject).await }
        };
        let nats_error =
            |e: async_nats::SubscribeError| ClusterError::Nats { urls: urls.clone(), reason: e.to_string() };
        let me = cluster.config.node.clone();
        let mail = subscribe(mail_subject(&me)).await.map_err(nats_error)?;
        let replies = subscribe(format!("skylark.node.{me}.reply.*")).await.map_err(nats_error)?;
        let streams = subscribe(format!("skylark.node.{me}.stream.*")).await.map_err(nats_error)?;
        cluster.nats.flush().await.map_err(|e| ClusterError::Nats { urls, reason: e.to_string() })?;
        let c = cluster.clone();
        cluster.tracker.spawn(async move { c.beat_loop().await });
        let c = cluster.clone();
        cluster.tracker.spawn(async move { c.mail_loop(mail).await });
        let c = cluster.clone();
        cluster.tracker.spawn(async move { c.reply_loop(replies).await });
        let c = cluster.clone();
        cluster.tracker.spawn(async move { c.stream_loop(streams).await });
        let c = cluster.clone();
        cluster.tracker.spawn(async move {
            loop {
                let reconnected = tokio::select! {
                    _ = c.shutdown.cancelled() => return,
                    event = lost_rx.recv() => match event { Some(e) => e, None => return },
                };
                if reconnected {
                    // Presence notes may have been missed: forget what the
                    // others said and ask them again.
                    c.relearn_presence().await;
                    continue;
                }
                // Events may have been lost in the gap: every stream from
                // another node ends, and its device reconnects.
                tracing::warn!("lost the connection to NATS; remote device streams restart");
                c.end_streams(|_| true);
            }
        });
        tracing::info!(node = %cluster.config.node, "joined the cluster");
        Ok(cluster)
    }

    pub fn node(&self) -> &str {
        &self.config.node
    }

    /// The live nodes that take actors, as this node sees them.
    pub fn placement(&self) -> Vec<String> {
        self.current().placement.iter().map(|(n, _)| n.clone()).collect()
    }

    /// The live, non-draining nodes with the addresses they advertise
    /// (`[cluster] advertise`), as this node sees them: what a client that
    /// fails over by itself (the web client) may try.
    pub fn serving(&self) -> Vec<(String, String)> {
        let view = self.current();
        view.placement.iter().map(|(n, _)| n.clone()).zip(view.addresses.iter().cloned()).collect()
    }

    fn current(&self) -> Arc<View> {
        self.view.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The node that should own `actor`, if it is not this one.
    pub(crate) fn remote_owner(&self, actor: AccountId) -> Option<String> {
        let view = self.current();
        match rendezvous(&view.placement, actor) {
            Some(owner) if owner != self.config.node => Some(owner.to_string()),
            _ => None,
        }
    }

    /// True once an operator asked this node to drain.
    pub fn draining(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// One heartbeat: renews this node's lease and reads the membership.
    async fn beat(&self) -> Result<(), StoreError> {
        let beat = self.store.beat(&self.config.node, &self.config.advertise, self.config.lease_ms).await?;
        let live: Vec<String> = beat.live.iter().map(|n| n.id.clone()).collect();
        let draining = beat.draining || self.shutdown.is_cancelled();
        let serving = || beat.live.iter().filter(|n| !(n.draining || (n.id == self.config.node && draining)));
        let placement: Vec<(String, u64)> = serving().map(|n| (n.id.clone(), seed(&n.id))).collect();
        let addresses: Vec<String> = serving().map(|n| n.address.clone()).collect();
        metrics::gauge!("skylark_cluster_members").set(placement.len() as f64);
        let (changed, gone) = {
            let mut view = self.view.write().unwrap_or_else(PoisonError::into_inner);
            let changed = view.placement != placement;
            let gone: Vec<String> = view.live.iter().filter(|n| !live.contains(n)).cloned().collect();
            *view = Arc::new(View { live, placement, addresses });
            (changed, gone)
        };
        // Off the heartbeat's path: telling watchers can take a while, and a
        // late heartbeat is a lapsed lease.
        if let (Some(presence), false) = (self.presence.get().and_then(|(p, _)| p.upgrade()), gone.is_empty()) {
            self.tracker.spawn(async move {
                for node in gone {
                    presence.forget_node(&node).await;
                }
            });
        }
        if beat.draining && !*self.draining.borrow() {
            tracing::info!(node = %self.config.node, "draining: handing every actor to the other nodes");
            self.draining.send_replace(true);
        }
        if beat.lapsed {
            tracing::warn!(
                node = %self.config.node,
                "this node's lease had lapsed (it was paused or cut off); the others may own its actors now"
            );
        }
        if changed || beat.lapsed {
            self.rebalance(beat.lapsed);
        }
        Ok(())
    }

    async fn beat_loop(self: Arc<Self>) {
        let every = Duration::from_millis(self.config.beat_ms);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.beat().await {
                tracing::warn!(error = %e, "cluster heartbeat failed; retrying");
            }
        }
    }

    /// After a change of the membership: actors this node should no longer
    /// own are handed away (all of them if its lease lapsed), and streams
    /// from nodes that left or no longer own their account end.
    fn rebalance(&self, lapsed: bool) {
        let Some(ctx) = self.ctx.upgrade() else { return };
        let moved = ctx.registry.hand_off(|actor| lapsed || self.remote_owner(actor).is_some());
        if moved > 0 {
            tracing::info!(actors = moved, "handing actors to their new owners");
        }
        let live = self.current().live.clone();
        self.end_streams(|stream| !live.contains(&stream.node));
        // Actors this node now owns may have forwards pending (their node
        // left or crashed): they resume here, not at their next mail.
        self.tracker.spawn(async move {
            match ctx.registry.resume_forwards(&ctx).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(actors = n, "resumed pending forwards after the placement changed"),
                Err(e) => tracing::warn!(error = %e, "could not list the pending forwards to resume"),
            }
        });
    }

    fn end_streams(&self, which: impl Fn(&RemoteStream) -> bool) {
        let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        streams.retain(|_, stream| !which(stream));
    }

    /// Takes ownership of `actor` for this node, waiting while another live
    /// node still holds it (it lets go when it sees the new membership).
    pub(crate) async fn acquire(&self, actor: AccountId) -> Result<u64, MessagingError> {
        let give_up = tokio::time::Instant::now() + Duration::from_millis(self.config.lease_ms + self.config.beat_ms);
        loop {
            if self.remote_owner(actor).is_some() {
                return Err(MessagingError::Restarted);
            }
            let live = self.current().live.clone();
            match self.store.acquire(actor, &self.config.node, &live).await? {
                Acquired::Owned(epoch) => return Ok(epoch),
                Acquired::HeldBy(holder) => {
                    if tokio::time::Instant::now() >= give_up {
                        tracing::warn!(%actor, %holder, "the actor's previous owner has not let it go");
                        return Err(MessagingError::Restarted);
                    }
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return Err(MessagingError::ShuttingDown),
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
            }
        }
    }

    /// Gives an actor's ownership back (its last write is durable).
    pub(crate) async fn release(&self, actor: AccountId, epoch: u64) {
        if let Err(e) = self.store.release(actor, epoch).await {
            tracing::debug!(%actor, error = %e, "could not release an actor; it lapses with this node");
        }
    }

    async fn publish(&self, subject: String, payload: Vec<u8>) -> Result<(), MessagingError> {
        self.nats.publish(subject, payload.into()).await.map_err(|e| {
            tracing::debug!(error = %e, "publishing to NATS failed");
            unreachable()
        })
    }

    /// Sends `mail` to `node` and calls `done` with its answer (or with
    /// "unreachable" after the request timeout).
    async fn ask(
        self: &Arc<Self>,
        node: &str,
        mail: Mail,
        done: impl FnOnce(Result<Answer, MessagingError>) + Send + 'static,
    ) -> Result<(), MessagingError> {
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).insert(id, tx);
        let sent = self
            .nats
            .publish_with_reply(mail_subject(node), reply_subject(&self.config.node, id), mail.encode().into())
            .await;
        if sent.is_err() {
            self.pending.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
            return Err(unreachable());
        }
        let timeout = Duration::from_millis(self.config.request_timeout_ms);
        let pending = Arc::downgrade(self);
        self.tracker.spawn(async move {
            let answer = match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(bytes)) => wire::decode_answer(&bytes).unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "an answer from another node could not be read");
                    Err(MessagingError::Internal("an unreadable answer from another node"))
                }),
                _ => {
                    if let Some(pending) = pending.upgrade() {
                        pending.forget(id);
                    }
                    Err(unreachable())
                }
            };
            done(answer);
        });
        Ok(())
    }

    fn forget(&self, id: u64) {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
    }

    /// Mail for an actor owned by `node`. Returns once the mail is on its
    /// way (mail of one connection keeps its order: one NATS connection,
    /// one subject, handled in order at the other end).
    pub(crate) async fn tell(self: &Arc<Self>, node: &str, account: AccountId, msg: Msg) -> Result<(), MessagingError> {
        match msg {
            Msg::Send(mail) => {
                let SendMail { device, client_id, to, payload, meta, reply, .. } = *mail;
                let mail = Mail::Send { account, device, client_id, to, payload, meta };
                self.ask(node, mail, move |a| {
                    let _ = reply.send(answer_as(a, Answer::into_send));
                })
                .await
            }
            Msg::Post(mail) => {
                let PostMail { author, device, client_id, payload, commit_epoch, message_epoch, meta, reply, .. } =
                    *mail;
                let mail = Mail::Post {
                    group: account,
                    author,
                    device,
                    client_id,
                    payload,
                    commit_epoch,
                    message_epoch,
                    meta,
                };
                self.ask(node, mail, move |a| {
                    let _ = reply.send(answer_as(a, Answer::into_send));
                })
                .await
            }
            Msg::Group(mail) => {
                let GroupMail { from, request, reply } = *mail;
                self.ask(node, Mail::Group { group: account, from, request }, move |a| {
                    let _ = reply.send(answer_as(a, Answer::into_group));
                })
                .await
            }
            Msg::Deliver(mail) => {
                let DeliverMail { from, items, reply } = *mail;
                let items = items.iter().cloned().collect();
                self.ask(node, Mail::Deliver { to: account, from, items }, move |a| {
                    let _ = reply.send(answer_as(a, Answer::into_deliver));
                })
                .await
            }
            Msg::Attach(mail) => {
                let AttachMail { device, connection, events, reply } = *mail;
                let stream = RemoteStream { node: node.to_string(), next: 0, events };
                self.streams.lock().unwrap_or_else(PoisonError::into_inner).insert(connection, stream);
                let origin = self.config.node.clone();
                let me = Arc::downgrade(self);
                let sent = self
                    .ask(node, Mail::Attach { account, device, connection, origin }, move |a| {
                        if a.is_err()
                            && let Some(me) = me.upgrade()
                        {
                            me.streams.lock().unwrap_or_else(PoisonError::into_inner).remove(&connection);
                        }
                        let _ = reply.send(answer_as(a, Answer::into_done));
                    })
                    .await;
                if sent.is_err() {
                    self.streams.lock().unwrap_or_else(PoisonError::into_inner).remove(&connection);
                }
                sent
            }
            Msg::Detach { device, connection } => {
                self.streams.lock().unwrap_or_else(PoisonError::into_inner).remove(&connection);
                self.publish(mail_subject(node), Mail::Detach { account, device, connection }.encode()).await
            }
            Msg::Ack { device, connection, up_to } => {
                self.publish(mail_subject(node), Mail::Ack { account, device, connection, up_to }.encode()).await
            }
            Msg::MarkRead { peer, up_to, reply } => {
                self.ask(node, Mail::MarkRead { account, peer, up_to }, move |a| {
                    let _ = reply.send(answer_as(a, Answer::into_done));
                })
                .await
            }
            Msg::DeviceChange { change, reply } => {
                self.ask(node, Mail::DeviceChange { account, change: *change }, move |a| {
                    let _ = reply.send(answer_as(a, Answer::into_done));
                })
                .await
            }
            Msg::Block { peer, blocked, reply } => {
                self.ask(node, Mail::Block { account, peer, blocked }, move |a| {
                    let _ = reply.send(answer_as(a, Answer::into_done));
                })
                .await
            }
            Msg::ContactName { change, reply } => {
                let (peer, name) = *change;
                self.ask(node, Mail::ContactName { account, peer, name }, move |a| {
                    let _ = reply.send(answer_as(a, Answer::into_done));
                })
                .await
            }
            Msg::Deleted { reply } => {
                self.ask(node, Mail::Deleted { account }, move |a| {
                    let _ = reply.send(answer_as(a, Answer::into_done));
                })
                .await
            }
            // A forward's confirmation goes to its own actor's mailbox,
            // which is always on this node.
            Msg::Forwarded { .. } => Err(MessagingError::Internal("a forward confirmation for another node")),
            // The owner wakes the actors it owns itself, when it sees the
            // placement that gave them to it.
            Msg::Wake => Ok(()),
        }
    }

    /// Mail from other nodes, handled in arrival order: each is queued to
    /// the local actor (never routed on: a node that disagrees about the
    /// placement gets an answer, not a loop), and its answer is published
    /// when the actor gives it.
    async fn mail_loop(self: Arc<Self>, mut subscription: async_nats::Subscriber) {
        loop {
            let Some(message) = self.next_message(&mut subscription).await else { return };
            let Some(ctx) = self.ctx.upgrade() else { return };
            let mail = match Mail::decode(&message.payload) {
                Ok(mail) => mail,
                Err(e) => {
                    tracing::warn!(error = %e, "mail from another node could not be read; dropped");
                    continue;
                }
            };
            let reply = message.reply.map(|s| s.to_string());
            self.deliver_here(&ctx, mail, reply).await;
        }
    }

    async fn deliver_here(self: &Arc<Self>, ctx: &Ctx, mail: Mail, reply: Option<String>) {
        let account = mail.actor();
        let span = tracing::Span::none();
        let (msg, answer): (Msg, Option<oneshot::Receiver<Result<Answer, MessagingError>>>) = match mail {
            Mail::Send { device, client_id, to, payload, meta, .. } => {
                let (tx, rx) = oneshot::channel();
                let msg = Msg::Send(Box::new(SendMail { device, client_id, to, payload, meta, reply: tx, span }));
                (msg, Some(self.relay(rx, Answer::Send)))
            }
            Mail::Post { author, device, client_id, payload, commit_epoch, message_epoch, meta, .. } => {
                let (tx, rx) = oneshot::channel();
                let post =
                    PostMail { author, device, client_id, payload, commit_epoch, message_epoch, meta, reply: tx, span };
                let msg = Msg::Post(Box::new(post));
                (msg, Some(self.relay(rx, Answer::Send)))
            }
            Mail::Group { from, request, .. } => {
                let (tx, rx) = oneshot::channel();
                (Msg::Group(Box::new(GroupMail { from, request, reply: tx })), Some(self.relay(rx, Answer::Group)))
            }
            Mail::Deliver { from, items, .. } => {
                let (tx, rx) = oneshot::channel();
                let msg = Msg::Deliver(Box::new(DeliverMail { from, items: items.into(), reply: tx }));
                (msg, Some(self.relay(rx, Answer::Deliver)))
            }
            Mail::Attach { device, connection, origin, .. } => {
                let (events, stream) = lane::channel(ctx.config.device_window + 4);
                let (tx, rx) = oneshot::channel();
                let me = self.clone();
                self.tracker.spawn(async move { me.pump(origin, connection, stream).await });
                let msg = Msg::Attach(Box::new(AttachMail { device, connection, events, reply: tx }));
                (msg, Some(self.relay(rx, |()| Answer::Done)))
            }
            Mail::Detach { device, connection, .. } => (Msg::Detach { device, connection }, None),
            Mail::Ack { device, connection, up_to, .. } => (Msg::Ack { device, connection, up_to }, None),
            Mail::MarkRead { peer, up_to, .. } => {
                let (tx, rx) = oneshot::channel();
                (Msg::MarkRead { peer, up_to, reply: tx }, Some(self.relay(rx, |()| Answer::Done)))
            }
            Mail::DeviceChange { change, .. } => {
                let (tx, rx) = oneshot::channel();
                (Msg::DeviceChange { change: Box::new(change), reply: tx }, Some(self.relay(rx, |()| Answer::Done)))
            }
            Mail::Block { peer, blocked, .. } => {
                let (tx, rx) = oneshot::channel();
                (Msg::Block { peer, blocked, reply: tx }, Some(self.relay(rx, |()| Answer::Done)))
            }
            Mail::ContactName { peer, name, .. } => {
                let (tx, rx) = oneshot::channel();
                (
                    Msg::ContactName { change: Box::new((peer, name)), reply: tx },
                    Some(self.relay(rx, |()| Answer::Done)),
                )
            }
            Mail::Deleted { .. } => {
                let (tx, rx) = oneshot::channel();
                (Msg::Deleted { reply: tx }, Some(self.relay(rx, |()| Answer::Done)))
            }
        };
        let queued = ctx.registry.tell_here(ctx, account, msg).await;
        let (Some(reply), Some(answer)) = (reply, answer) else { return };
        let me = self.clone();
        self.tracker.spawn(async move {
            let answer = match queued {
                Ok(()) => answer.await.unwrap_or(Err(MessagingError::Restarted)),
                Err(e) => Err(e),
            };
            let _ = me.nats.publish(reply, wire::encode_answer(&answer).into()).await;
        });
    }

    /// Turns an actor's typed answer into the bus's [`Answer`].
    fn relay<T: Send + 'static>(
        &self,
        rx: oneshot::Receiver<Result<T, MessagingError>>,
        wrap: impl FnOnce(T) -> Answer + Send + 'static,
    ) -> oneshot::Receiver<Result<Answer, MessagingError>> {
        let (tx, out) = oneshot::channel();
        self.tracker.spawn(async move {
            let answer = rx.await.unwrap_or(Err(MessagingError::Restarted)).map(wrap);
            let _ = tx.send(answer);
        });
        out
    }

    /// Publishes the events of a local actor to a connection on `origin`.
    async fn pump(self: Arc<Self>, origin: String, connection: u64, mut events: lane::Receiver<DeviceEvent>) {
        let subject = stream_subject(&origin, connection);
        let mut number = 0u64;
        loop {
            let event = tokio::select! {
                _ = self.shutdown.cancelled() => None,
                e = events.recv() => e,
            };
            let event = match event {
                Some(e) => StreamEvent::Event(e),
                None => StreamEvent::End,
            };
            let end = matches!(event, StreamEvent::End);
            if self.nats.publish(subject.clone(), wire::encode_event(number, &event).into()).await.is_err() || end {
                return;
            }
            number += 1;
        }
    }

    /// The next message of `subscription`; `None` at shutdown or when the
    /// subscription ends.
    async fn next_message(&self, subscription: &mut async_nats::Subscriber) -> Option<async_nats::Message> {
        tokio::select! {
            _ = self.shutdown.cancelled() => None,
            m = subscription.next() => m,
        }
    }

    /// Answers from other nodes, matched to their requests.
    async fn reply_loop(self: Arc<Self>, mut subscription: async_nats::Subscriber) {
        loop {
            let Some(message) = self.next_message(&mut subscription).await else { return };
            let Some(id) = last_number(&message.subject) else { continue };
            let waiter = self.pending.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
            // A status instead of an answer ("no responders": the node has
            // gone and nobody reads its mail): the waiter is dropped, which
            // its request takes as "unreachable" at once, not at the timeout.
            if let (Some(waiter), None) = (waiter, message.status) {
                let _ = waiter.send(message.payload);
            }
        }
    }

    /// Events for this node's connections attached to actors elsewhere.
    async fn stream_loop(self: Arc<Self>, mut subscription: async_nats::Subscriber) {
        loop {
            let Some(message) = self.next_message(&mut subscription).await else { return };
            let Some(connection) = last_number(&message.subject) else { continue };
            let decoded = wire::decode_event(&message.payload);
            let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(stream) = streams.get_mut(&connection) else { continue };
            let keep = match decoded {
                Ok((number, StreamEvent::Event(event))) if number == stream.next => {
                    stream.next += 1;
                    // The lane has room for a full window: full means the
                    // connection is not reading, and it starts over.
                    stream.events.try_send(event).is_ok()
                }
                Ok((number, _)) if number != stream.next => {
                    tracing::debug!(connection, "a device stream from another node had a gap; it restarts");
                    false
                }
                Ok(_) => false,
                Err(e) => {
                    tracing::warn!(error = %e, "a stream event from another node could not be read");
                    false
                }
            };
            if !keep {
                streams.remove(&connection);
            }
        }
    }

    /// Carries `presence` across the cluster: this node's connections and
    /// typing go to every node, and theirs come here. Asks the others for
    /// their connections at once.
    pub async fn carry_presence(self: &Arc<Self>, presence: &Arc<Presence>) -> Result<(), ClusterError> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Broadcast>();
        let notes = tx.clone();
        presence.on_note(Arc::new(move |note| drop(notes.send(Broadcast::Note(note)))));
        let mut subscription = self
            .nats
            .subscribe(PRESENCE_SUBJECT)
            .await
            .map_err(|e| ClusterError::Nats { urls: self.config.nats.join(", "), reason: e.to_string() })?;
        let _ = self.presence.set((Arc::downgrade(presence), tx.clone()));
        let me = self.clone();
        self.tracker.spawn(async move {
            loop {
                let broadcast = tokio::select! {
                    _ = me.shutdown.cancelled() => return,
                    b = rx.recv() => match b { Some(b) => b, None => return },
                };
                let bytes = wire::encode_broadcast(&me.config.node, &broadcast);
                if me.nats.publish(PRESENCE_SUBJECT, bytes.into()).await.is_err() {
                    tracing::debug!("a presence note could not be published");
                }
            }
        });
        let me = self.clone();
        let weak = Arc::downgrade(presence);
        self.tracker.spawn(async move {
            loop {
                let Some(message) = me.next_message(&mut subscription).await else { return };
                let Some(presence) = weak.upgrade() else { return };
                match wire::decode_broadcast(&message.payload) {
                    Ok((node, _)) if node == me.config.node => {}
                    Ok((_, Broadcast::Hello)) => {
                        for (account, device) in presence.local_devices() {
                            let note = crate::presence::PresenceNote::Connected { account, device };
                            let _ = tx.send(Broadcast::Note(note));
                        }
                    }
                    Ok((node, Broadcast::Note(note))) => presence.apply_note(&node, note).await,
                    Err(e) => tracing::warn!(error = %e, "a presence note from another node could not be read"),
                }
            }
        });
        self.say_hello();
        Ok(())
    }

    fn say_hello(&self) {
        if let Some((_, tx)) = self.presence.get() {
            let _ = tx.send(Broadcast::Hello);
        }
    }

    /// After a gap on the bus: drop every other node's presence notes and
    /// ask for them again.
    async fn relearn_presence(&self) {
        let Some(presence) = self.presence.get().and_then(|(p, _)| p.upgrade()) else { return };
        for node in self.current().live.iter().filter(|n| **n != self.config.node) {
            presence.forget_node(node).await;
        }
        self.say_hello();
    }

    /// Carries device links across the cluster: a code made on one node
    /// can be approved on any other, and the new device can wait on any.
    pub async fn carry_links(self: &Arc<Self>, devices: &Arc<crate::devices::Devices>) -> Result<(), ClusterError> {
        let nats_error = |e: async_nats::SubscribeError| ClusterError::Nats {
            urls: self.config.nats.join(", "),
            reason: e.to_string(),
        };
        let approvals = self.nats.subscribe(LINK_APPROVE_SUBJECT).await.map_err(nats_error)?;
        let waits = self.nats.subscribe(links_subject(&self.config.node)).await.map_err(nats_error)?;
        devices.on_peers(Arc::new(links::Peers { cluster: Arc::downgrade(self), node: self.config.node.clone() }));
        for subscription in [approvals, waits] {
            self.tracker.spawn(self.clone().link_loop(subscription, Arc::downgrade(devices)));
        }
        Ok(())
    }

    /// Serves other nodes' link requests; each is answered when done (a
    /// wait can take a while), and not at all when this node has no say.
    async fn link_loop(
        self: Arc<Self>,
        mut subscription: async_nats::Subscriber,
        devices: Weak<crate::devices::Devices>,
    ) {
        loop {
            let Some(message) = self.next_message(&mut subscription).await else { return };
            let (Some(devices), Some(reply)) = (devices.upgrade(), message.reply) else { continue };
            let nats = self.nats.clone();
            self.tracker.spawn(async move {
                if let Some(answer) = links::serve(&devices, &message.payload).await {
                    let _ = nats.publish(reply, answer.into()).await;
                }
            });
        }
    }

    /// Leaves the cluster: stops routing and removes this node from the
    /// membership, so the others take its actors at once. Call after the
    /// actors stopped (their leases are released).
    /// Each step is bounded: with NATS or PostgreSQL down, stopping must
    /// not wait for them (the lease then lapses by itself).
    pub async fn leave(&self) {
        const STEP: Duration = Duration::from_secs(3);
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(STEP, self.tracker.wait()).await.is_err() {
            tracing::warn!("requests to other nodes were still running at shutdown; left unanswered");
        }
        match tokio::time::timeout(STEP, self.store.leave(&self.config.node)).await {
            Ok(Ok(())) => {}
            _ => tracing::warn!("could not leave the membership; the others take over when the lease lapses"),
        }
        let _ = tokio::time::timeout(STEP, self.nats.flush()).await;
    }

    /// Stops taking actors: the membership is told this node is draining,
    /// and the actors move to the others at the next heartbeat.
    pub async fn drain(&self) -> Result<(), StoreError> {
        self.store.set_draining(&self.config.node, true).await?;
        self.beat().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement(names: &[&str]) -> Vec<(String, u64)> {
        names.iter().map(|n| (n.to_string(), seed(n))).collect()
    }

    #[test]
    fn rendezvous_moves_only_the_actors_of_the_node_that_left() {
        let three = placement(&["n1", "n2", "n3"]);
        let two = placement(&["n1", "n3"]);
        let mut per_node: HashMap<&str, usize> = HashMap::new();
        for id in 1..3_000u64 {
            let before = rendezvous(&three, AccountId(id)).unwrap();
            *per_node.entry(before).or_default() += 1;
            let after = rendezvous(&two, AccountId(id)).unwrap();
            if before != "n2" {
                assert_eq!(before, after, "account {id} stayed where it was");
            }
        }
        for (node, n) in per_node {
            assert!((800..1200).contains(&n), "{node} owns {n} of 3000");
        }
        assert_eq!(rendezvous(&[], AccountId(1)), None);
    }

    #[test]
    fn node_names_are_subject_safe() {
        assert!(valid_node_name("node-1_a"));
        for bad in ["", "a.b", "a b", "*", ">", &"x".repeat(65)] {
            assert!(!valid_node_name(bad), "{bad:?}");
        }
    }
}
