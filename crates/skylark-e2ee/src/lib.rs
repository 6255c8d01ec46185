//! End-to-end encryption for Skylark's clients: MLS (RFC 9420) on OpenMLS.
//!
//! Every device is an MLS member with its own leaf. A conversation is an
//! MLS group whose members are all devices of all its participants; the
//! server is the delivery service (it orders commits, stores and forwards
//! ciphertext) and the key-package directory, and never holds a key that
//! opens a message.
//!
//! This crate is the whole client side of that, without IO: an [`Engine`]
//! per device turns plaintext into payloads and payloads back into
//! plaintext, makes the commits that add and remove devices, and can be
//! written out ([`Engine::export`]) and read back ([`Engine::import`]) as
//! one byte string, which the CLI keeps in its profile directory and the
//! web client in IndexedDB. Both clients run this same code (the web
//! client as WebAssembly).
//!
//! **Identity.** A device's MLS signature key is its own Ed25519 key,
//! separate from the device key that authenticates it to the server
//! (browsers keep that one non-extractable), and bound to it: the MLS
//! credential names the account and device and carries the device key's
//! signature over [`binding_transcript`]. [`verify_binding`] checks it
//! against a device key from the server's device list; the safety number
//! ([`safety_number`]) lets two people check those device keys themselves.
//!
//! **Payloads.** An encrypted payload starts with [`MAGIC`] (a NUL byte
//! never starts a text message) followed by one serialized `MLSMessage`:
//! a Welcome, or a commit or application message as `PrivateMessage`.
//! A commit too large for one post travels as blobs, and its post names
//! them ([`out_of_line`]; the module `parts` says how).

use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::signatures::{Signer, SignerError};
use sha2::{Digest, Sha512};

mod parts;
pub use parts::{OUT_OF_LINE_MAGIC, Part, PartKind, inline, out_of_line};

/// X25519, AES-128-GCM, SHA-256, Ed25519: MLS's mandatory suite.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// The first bytes of every end-to-end encrypted payload but bundles.
pub const MAGIC: &[u8] = b"\0SKMLS1";

/// The first bytes of a commit bundled with its Welcome ([`Commit::payload`]):
/// then the commit's length (4 bytes, big-endian), the commit and the
/// Welcome, each a payload starting with [`MAGIC`].
pub const BUNDLE_MAGIC: &[u8] = b"\0SKMLSB";

/// How many past epochs a device keeps the keys of: none. The server takes
/// an application message only in the epoch its group is in (the sender
/// names it; one made before a commit is refused, and made again), and a
/// device reads its conversation in the log's order, applying even its own
/// commits when they come back in the log: so every message is opened in
/// the epoch it was made in. Keeping past epochs cost the most of all at
/// scale: OpenMLS rewrites them, each with its member list, after every
/// message (docs/BENCHMARKS.md, "No past epochs").
const PAST_EPOCHS: usize = 0;

/// Ciphertexts are padded to a multiple of this many bytes.
const PADDING: usize = 32;

/// The version of [`Engine::export`]'s format (3: with when this device
/// last refreshed its keys in each conversation; 2: with the state's
/// generation, [`Engine::take_state_changes`]); 1 and 2 are still read.
const STATE_VERSION: u8 = 3;

/// A device refreshes its keys in a conversation before it posts when its
/// last commit there is at least this old ([`Engine::wants_update`]): a
/// week, so that keys stolen from a device stop opening what it is sent
/// within a week of its next post (post-compromise security).
pub const KEYS_REFRESH_AFTER_SECS: u64 = 7 * 24 * 3600;

/// A device refreshes its keys in a conversation even when it does not
/// post, once they are this old ([`Engine::stale_conversations`]): a month,
/// so that keys stolen from a device that only reads stop opening the
/// conversation too.
pub const KEYS_REFRESH_IDLE_AFTER_SECS: u64 = 30 * 24 * 3600;

/// Seconds since the Unix epoch, from the system's clock; WebAssembly in a
/// browser has none, and its binding sets one ([`Engine::set_clock`]).
fn system_clock() -> u64 {
    #[cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]
    return std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    return 0;
}

/// The first bytes of a record of [`Engine::take_state_changes`].
const CHANGES_MAGIC: &[u8] = b"SKSTCH1";
const STATE_MAGIC: &[u8] = b"SKYLARK-E2EE";

/// The MLS group id of a Skylark group's conversation (1:1 conversations
/// are groups too, opened with `OpenDirect`).
pub fn group_conversation(group: u64) -> Vec<u8> {
    format!("skylark-group:{group}").into_bytes()
}

/// The Skylark group a conversation belongs to ([`group_conversation`]).
pub fn conversation_group(conversation: &[u8]) -> Option<u64> {
    std::str::from_utf8(conversation).ok()?.strip_prefix("skylark-group:")?.parse().ok()
}

/// A member of a conversation: one device of one account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceRef {
    pub account: u64,
    pub device: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum E2eeError {
    #[error(
        "this device does not have the keys of that conversation (it was added after the message was sent, \
         or the account's other devices have not added it yet)"
    )]
    UnknownConversation,
    #[error("the encryption group for that conversation already exists on this device")]
    AlreadyExists,
    #[error("a key package from the server is invalid ({0}); that device cannot be added")]
    BadKeyPackage(String),
    #[error("a key package claims to be device {got:?} but was listed for device {expected:?}")]
    WrongDevice { expected: DeviceRef, got: DeviceRef },
    #[error(
        "the encryption key of device {} of account {} is not signed by the device key the server lists for it; \
         that device was not added",
        .0.device, .0.account
    )]
    Unbound(DeviceRef),
    #[error("this device has a change to that conversation waiting for the server's answer")]
    PendingCommit,
    #[error("this device was removed from that conversation's encryption group")]
    Removed,
    #[error("the payload is not an end-to-end encrypted message")]
    NotEncrypted,
    #[error("the encrypted message is malformed: {0}")]
    Malformed(String),
    #[error("the encryption state is damaged: {0}")]
    State(String),
    #[error(
        "it was encrypted with the conversation's keys from before this device joined it (or before a change this \
         device has applied since), which this device does not have"
    )]
    EarlierKeys,
    #[error("it was encrypted with keys from a change to the conversation that this device has not read yet")]
    LaterKeys,
    #[error(
        "it is a change to the conversation's encryption too large for one message, kept as a download, which \
         this device could not download"
    )]
    NotDownloaded,
    #[error("encryption failed: {0}")]
    Mls(String),
}

fn mls<E: std::fmt::Display>(e: E) -> E2eeError {
    E2eeError::Mls(e.to_string())
}

/// What a device signs with its device key to bind its MLS key to itself.
pub fn binding_transcript(member: DeviceRef, mls_key: &[u8]) -> Vec<u8> {
    let mut t = b"skylark mls binding v1\0".to_vec();
    t.extend_from_slice(&member.account.to_be_bytes());
    t.extend_from_slice(&member.device.to_be_bytes());
    t.extend_from_slice(mls_key);
    t
}

/// A credential's identity: account, device, and the binding signature.
fn identity_bytes(member: DeviceRef, binding: &[u8]) -> Vec<u8> {
    let mut id = Vec::with_capacity(16 + binding.len());
    id.extend_from_slice(&member.account.to_be_bytes());
    id.extend_from_slice(&member.device.to_be_bytes());
    id.extend_from_slice(binding);
    id
}

fn parse_identity(credential: &Credential) -> Option<(DeviceRef, Vec<u8>)> {
    let basic = BasicCredential::try_from(credential.clone()).ok()?;
    let id = basic.identity();
    if id.len() < 16 {
        return None;
    }
    let account = u64::from_be_bytes(id[..8].try_into().ok()?);
    let device = u64::from_be_bytes(id[8..16].try_into().ok()?);
    Some((DeviceRef { account, device }, id[16..].to_vec()))
}

/// Whether `member`'s MLS key (`mls_key`, from its leaf or key package) was
/// bound to it by its device key `device_key` (32 bytes, Ed25519).
pub fn verify_binding(member: DeviceRef, mls_key: &[u8], binding: &[u8], device_key: &[u8]) -> bool {
    let Ok(key) = <[u8; 32]>::try_from(device_key) else { return false };
    let Ok(key) = VerifyingKey::from_bytes(&key) else { return false };
    let Ok(sig) = ed25519_dalek::Signature::from_slice(binding) else { return false };
    key.verify(&binding_transcript(member, mls_key), &sig).is_ok()
}

/// Checks that a key package is `member`'s and that its MLS key is bound
/// to `device_key` (the device key the server lists for it): the package's
/// own signature, the credential's identity, and the binding signature.
pub fn check_package(member: DeviceRef, package: &[u8], device_key: &[u8]) -> Result<(), E2eeError> {
    let crypto = OpenMlsRustCrypto::default();
    let package = KeyPackageIn::tls_deserialize_exact(package)
        .map_err(|e| E2eeError::BadKeyPackage(e.to_string()))?
        .validate(crypto.crypto(), ProtocolVersion::Mls10)
        .map_err(|e| E2eeError::BadKeyPackage(e.to_string()))?;
    let leaf = package.leaf_node();
    let (got, binding) =
        parse_identity(leaf.credential()).ok_or_else(|| E2eeError::BadKeyPackage("not a Skylark credential".into()))?;
    if got != member {
        return Err(E2eeError::WrongDevice { expected: member, got });
    }
    if !verify_binding(member, leaf.signature_key().as_slice(), &binding, device_key) {
        return Err(E2eeError::Unbound(member));
    }
    Ok(())
}

/// The MLS signing key of a device.
struct MlsKey(SigningKey);

impl Signer for MlsKey {
    fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, SignerError> {
        Ok(self.0.sign(payload).to_bytes().to_vec())
    }

    fn signature_scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

impl Commit {
    /// The post: the commit, bundled with its Welcome when there is one.
    pub fn payload(&self) -> Vec<u8> {
        match &self.welcome {
            None => self.commit.clone(),
            Some(welcome) => {
                let mut out = BUNDLE_MAGIC.to_vec();
                out.extend_from_slice(&(self.commit.len() as u32).to_be_bytes());
                out.extend_from_slice(&self.commit);
                out.extend_from_slice(welcome);
                out
            }
        }
    }
}

fn split_bundle(payload: &[u8]) -> Option<(&[u8], &[u8])> {
    let rest = payload.strip_prefix(BUNDLE_MAGIC)?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let commit = rest.get(4..4 + len)?;
    Some((commit, &rest[4 + len..]))
}

/// A member's MLS key, and its device key's signature binding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberKey {
    pub member: DeviceRef,
    pub mls_key: Vec<u8>,
    pub binding: Vec<u8>,
}

/// A handshake this device made: post [`Commit::payload`] to the
/// conversation as a commit for `epoch`. It carries the Welcome of the
/// devices it adds in the same post, so nothing can be ordered between the
/// commit and the Welcome (a message the new devices could not read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub epoch: u64,
    pub commit: Vec<u8>,
    pub welcome: Option<Vec<u8>>,
}

/// What a received payload was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A message, decrypted.
    Message { conversation: Vec<u8>, from: DeviceRef, plaintext: Vec<u8> },
    /// This device joined a conversation (from a Welcome).
    Joined { conversation: Vec<u8>, epoch: u64 },
    /// The conversation's membership or keys changed; `removed` says this
    /// device is no longer a member (it reads nothing sent after).
    Committed { conversation: Vec<u8>, epoch: u64, by: DeviceRef, removed: bool },
    /// A Welcome for other devices, or a message for a conversation this
    /// device is not (yet) in, or one it already processed.
    NotForMe,
}

/// A commit this device made and has not finished sending: kept in the
/// state, so a client that dies before the server's answer (or before
/// sending the Welcome) sends both again after a restart, with the same
/// client id (the server answers a resend as a duplicate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub conversation: Vec<u8>,
    pub client_id: String,
    pub commit: Commit,
}

/// What one entry of a conversation's log turned out to be, remembered by
/// the entry's key ([`Engine::open_once`]): MLS keys are used once, so a
/// message read again (a redelivery, a page of history) is answered from
/// here, never decrypted twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    Message {
        conversation: Vec<u8>,
        from: DeviceRef,
        plaintext: Vec<u8>,
    },
    /// A Welcome, a commit, or something not for this device: nothing to show.
    Control,
    /// A commit that changed which devices are in the conversation, after
    /// its first: worth showing (the safety number changed).
    DevicesChanged {
        conversation: Vec<u8>,
        epoch: u64,
    },
    /// It could not be opened (the reason, for the user).
    Failed(String),
    /// Another device of this account sent this one the conversation's
    /// history ([`Engine::seal_history`]): `entries` messages from before
    /// this device joined can be shown now. Nothing to show itself.
    History {
        conversation: Vec<u8>,
        entries: u64,
    },
}

/// Entries [`Engine::open_once`] remembers (the oldest are forgotten first).
const JOURNAL_ENTRIES: usize = 50_000;

/// How an application message that carries a conversation's history to a
/// newly added device of the sender's account starts ([`Engine::seal_history`]).
const HISTORY_MAGIC: &[u8] = b"\0SKHIST1";

/// At most this many bytes of history go in one message (the server's
/// default payload limit is 64 KiB, and encryption adds a little).
pub const HISTORY_BYTES: usize = 48 * 1024;

/// At most this many history messages per conversation for a new device
/// (1.5 MiB: some 15,000 short messages).
pub const HISTORY_CHUNKS: usize = 32;

/// One device's MLS state.
pub struct Engine {
    provider: OpenMlsRustCrypto,
    key: MlsKey,
    me: DeviceRef,
    binding: Vec<u8>,
    outgoing: Vec<Outgoing>,
    journal: std::collections::HashMap<String, Opened>,
    journal_order: std::collections::VecDeque<String>,
    /// Journal keys changed (added, changed or dropped) since the journal
    /// was last saved ([`Engine::take_journal_changes`], or a whole
    /// [`Engine::export`]).
    journal_changed: std::cell::RefCell<Vec<String>>,
    /// A message's text was forgotten since the journal was last saved: a
    /// journal file that still holds it must be written afresh.
    journal_forgot: std::cell::Cell<bool>,
    /// The conversations this device created or joined.
    conversations: std::collections::BTreeSet<Vec<u8>>,
    /// When (seconds since the Unix epoch) this device's own keys in each
    /// conversation date from: it created the group, joined it from a
    /// Welcome, or had a commit of its own accepted (every commit of
    /// Skylark's clients carries the committer's new path keys). Absent in
    /// a state saved before this was kept.
    refreshed: std::collections::BTreeMap<Vec<u8>, u64>,
    /// Where the time comes from ([`Engine::set_clock`]).
    clock: fn() -> u64,
    /// Groups already read from `provider`'s storage. OpenMLS writes every
    /// change of a group through to the storage, so a kept group stays what
    /// loading it again would give; reading a large group's state back for
    /// each message was most of a message's cost. A group is taken out
    /// while an operation changes it and put back only when that operation
    /// succeeds, so a failed one leaves the next to load it afresh.
    groups: std::cell::RefCell<std::collections::HashMap<Vec<u8>, MlsGroup>>,
    /// How many times a group was read from the storage (for the tests).
    loads: std::cell::Cell<u64>,
    /// The MLS storage as last saved: written whole ([`Engine::save_whole`],
    /// or as read), or its changes taken since
    /// ([`Engine::take_state_changes`]), which are what differs from this.
    saved: std::cell::RefCell<std::collections::HashMap<Vec<u8>, Vec<u8>>>,
    /// The rest of the state (commits on their way, conversations) as last
    /// saved, encoded.
    saved_rest: std::cell::RefCell<Vec<u8>>,
    /// Which whole save this state is: changes apply only to the state they
    /// were taken after, so changes left behind a later save are ignored.
    generation: std::cell::Cell<u64>,
}

/// At most this many groups are kept read ([`Engine::groups`]).
const GROUPS_KEPT: usize = 64;

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("me", &self.me).finish_non_exhaustive()
    }
}

fn group_id(conversation: &[u8]) -> GroupId {
    GroupId::from_slice(conversation)
}

impl Engine {
    /// A new device engine with a fresh MLS key; `bind` signs the
    /// [`binding_transcript`] with the device's key and returns the
    /// 64-byte signature.
    pub fn new(me: DeviceRef, bind: impl FnOnce(&[u8]) -> Vec<u8>) -> Engine {
        let mut engine = Engine::unbound(me);
        engine.binding = bind(&engine.binding_request());
        engine
    }

    /// A new device engine whose MLS key is not bound yet, for a device
    /// key that signs asynchronously (WebCrypto in the browser): sign
    /// [`Engine::binding_request`] with the device key and pass the
    /// signature to [`Engine::bind`] before making any key package.
    pub fn unbound(me: DeviceRef) -> Engine {
        let mut seed = [0u8; 32];
        getrandom(&mut seed);
        Engine {
            provider: OpenMlsRustCrypto::default(),
            key: MlsKey(SigningKey::from_bytes(&seed)),
            me,
            binding: Vec::new(),
            outgoing: Vec::new(),
            journal: Default::default(),
            journal_order: Default::default(),
            journal_changed: Default::default(),
            journal_forgot: Default::default(),
            conversations: Default::default(),
            refreshed: Default::default(),
            clock: system_clock,
            groups: Default::default(),
            loads: Default::default(),
            saved: Default::default(),
            saved_rest: Default::default(),
            generation: Default::default(),
        }
    }

    /// Sets where the engine reads the time (seconds since the Unix epoch):
    /// the system's clock unless set; the browser's binding sets its own,
    /// since WebAssembly has none.
    pub fn set_clock(&mut self, clock: fn() -> u64) {
        self.clock = clock;
    }

    /// This device renewed its keys in the conversation just now.
    fn note_refreshed(&mut self, conversation: &[u8]) {
        self.refreshed.insert(conversation.to_vec(), (self.clock)());
    }

    /// What the device key signs to bind this engine's MLS key to it
    /// ([`binding_transcript`]).
    pub fn binding_request(&self) -> Vec<u8> {
        binding_transcript(self.me, self.key.0.verifying_key().as_bytes())
    }

    /// Sets the device key's signature over [`Engine::binding_request`].
    pub fn bind(&mut self, signature: Vec<u8>) {
        self.binding = signature;
    }

    /// Whether [`Engine::bind`] was given a signature.
    pub fn is_bound(&self) -> bool {
        !self.binding.is_empty()
    }

    pub fn me(&self) -> DeviceRef {
        self.me
    }

    /// This device's MLS public key (32 bytes, Ed25519).
    pub fn mls_public_key(&self) -> [u8; 32] {
        self.key.0.verifying_key().to_bytes()
    }

    fn credential(&self) -> CredentialWithKey {
        CredentialWithKey {
            credential: BasicCredential::new(identity_bytes(self.me, &self.binding)).into(),
            signature_key: self.key.0.verifying_key().as_bytes().to_vec().into(),
        }
    }

    fn package(&self, last_resort: bool) -> Result<Vec<u8>, E2eeError> {
        if !self.is_bound() {
            return Err(E2eeError::State("this device's encryption key is not signed by its device key yet".into()));
        }
        let mut builder = KeyPackage::builder();
        if last_resort {
            builder = builder.mark_as_last_resort();
        }
        let bundle = builder.build(CIPHERSUITE, &self.provider, &self.key, self.credential()).map_err(mls)?;
        bundle.key_package().tls_serialize_detached().map_err(mls)
    }

    /// `n` one-time key packages for the server's directory.
    pub fn key_packages(&mut self, n: usize) -> Result<Vec<Vec<u8>>, E2eeError> {
        (0..n).map(|_| self.package(false)).collect()
    }

    /// A last-resort key package (reusable until replaced).
    pub fn last_resort_package(&mut self) -> Result<Vec<u8>, E2eeError> {
        self.package(true)
    }

    fn create_config() -> MlsGroupCreateConfig {
        MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .use_ratchet_tree_extension(true)
            .max_past_epochs(PAST_EPOCHS)
            .padding_size(PADDING)
            .build()
    }

    fn join_config() -> MlsGroupJoinConfig {
        MlsGroupJoinConfig::builder()
            .use_ratchet_tree_extension(true)
            .max_past_epochs(PAST_EPOCHS)
            .padding_size(PADDING)
            .build()
    }

    /// Takes the conversation's group out of [`Engine::groups`] (or reads
    /// it from the storage) for an operation that may change it; give it
    /// back with [`Engine::keep`] when the operation succeeds.
    fn group(&self, conversation: &[u8]) -> Result<MlsGroup, E2eeError> {
        if let Some(group) = self.groups.borrow_mut().remove(conversation) {
            return Ok(group);
        }
        self.loads.set(self.loads.get() + 1);
        let mut group = MlsGroup::load(self.provider.storage(), &group_id(conversation))
            .map_err(|e| E2eeError::State(e.to_string()))?
            .ok_or(E2eeError::UnknownConversation)?;
        // A group saved by an earlier version keeps past epochs: drop them.
        if !matches!(group.past_epoch_deletion_policy(), PastEpochDeletionPolicy::MaxEpochs(PAST_EPOCHS)) {
            group
                .set_past_epoch_deletion_policy(&self.provider, PastEpochDeletionPolicy::MaxEpochs(PAST_EPOCHS))
                .map_err(mls)?;
        }
        Ok(group)
    }

    /// Keeps a group whose state matches the storage (after a successful
    /// operation), so the next one need not read it again.
    fn keep(&self, conversation: &[u8], group: MlsGroup) {
        let mut groups = self.groups.borrow_mut();
        if groups.len() >= GROUPS_KEPT && !groups.contains_key(conversation) {
            groups.clear();
        }
        groups.insert(conversation.to_vec(), group);
    }

    /// Reads something of the conversation's group, without changing it.
    fn look<R>(&self, conversation: &[u8], f: impl FnOnce(&MlsGroup) -> R) -> Result<R, E2eeError> {
        let group = self.group(conversation)?;
        let answer = f(&group);
        self.keep(conversation, group);
        Ok(answer)
    }

    /// Whether this device is an active member of the conversation's group.
    pub fn is_member(&self, conversation: &[u8]) -> bool {
        self.look(conversation, |g| g.is_active()).unwrap_or(false)
    }

    /// Starts the conversation's group with this device as its only member
    /// (epoch 0).
    pub fn create(&mut self, conversation: &[u8]) -> Result<(), E2eeError> {
        if self.look(conversation, |_| ()).is_ok() {
            return Err(E2eeError::AlreadyExists);
        }
        let group = MlsGroup::new_with_group_id(
            &self.provider,
            &self.key,
            &Self::create_config(),
            group_id(conversation),
            self.credential(),
        )
        .map_err(mls)?;
        self.keep(conversation, group);
        self.conversations.insert(conversation.to_vec());
        self.note_refreshed(conversation);
        Ok(())
    }

    /// The conversations this device is an active member of.
    pub fn conversations(&self) -> Vec<Vec<u8>> {
        self.conversations.iter().filter(|c| self.is_member(c)).cloned().collect()
    }

    /// The group's current epoch (what a commit from here would be for).
    pub fn epoch(&self, conversation: &[u8]) -> Result<u64, E2eeError> {
        self.look(conversation, |g| g.epoch().as_u64())
    }

    /// The devices in the conversation's group, in leaf order.
    pub fn members(&self, conversation: &[u8]) -> Result<Vec<DeviceRef>, E2eeError> {
        self.look(conversation, |g| g.members().filter_map(|m| parse_identity(&m.credential).map(|(d, _)| d)).collect())
    }

    /// Each member's MLS key and binding signature, for checking against
    /// the device keys the server lists ([`verify_binding`]).
    pub fn member_keys(&self, conversation: &[u8]) -> Result<Vec<MemberKey>, E2eeError> {
        self.look(conversation, |group| {
            group
                .members()
                .filter_map(|m| {
                    parse_identity(&m.credential).map(|(member, binding)| MemberKey {
                        member,
                        mls_key: m.signature_key.clone(),
                        binding,
                    })
                })
                .collect()
        })
    }

    /// Whether a commit from this device waits for the server's answer.
    pub fn has_pending_commit(&self, conversation: &[u8]) -> bool {
        self.look(conversation, |g| g.pending_commit().is_some()).unwrap_or(false)
    }

    /// A commit adding the devices whose key packages are given (each
    /// checked to be the device it was listed for). Devices already in the
    /// group are skipped; `Ok(None)` when none is left to add.
    pub fn add(&mut self, conversation: &[u8], packages: &[(DeviceRef, Vec<u8>)]) -> Result<Option<Commit>, E2eeError> {
        let mut group = self.group(conversation)?;
        if group.pending_commit().is_some() {
            self.keep(conversation, group);
            return Err(E2eeError::PendingCommit);
        }
        let present: std::collections::HashSet<DeviceRef> =
            group.members().filter_map(|m| parse_identity(&m.credential).map(|(d, _)| d)).collect();
        let mut valid = Vec::new();
        for (expected, bytes) in packages {
            if present.contains(expected) {
                continue;
            }
            let package = KeyPackageIn::tls_deserialize_exact(bytes.as_slice())
                .map_err(|e| E2eeError::BadKeyPackage(e.to_string()))?
                .validate(self.provider.crypto(), ProtocolVersion::Mls10)
                .map_err(|e| E2eeError::BadKeyPackage(e.to_string()))?;
            let got = parse_identity(package.leaf_node().credential())
                .map(|(d, _)| d)
                .ok_or_else(|| E2eeError::BadKeyPackage("not a Skylark credential".into()))?;
            if got != *expected {
                return Err(E2eeError::WrongDevice { expected: *expected, got });
            }
            valid.push(package);
        }
        if valid.is_empty() {
            self.keep(conversation, group);
            return Ok(None);
        }
        let epoch = group.epoch().as_u64();
        let (commit, welcome, _) = group.add_members(&self.provider, &self.key, &valid).map_err(mls)?;
        self.keep(conversation, group);
        Ok(Some(Commit { epoch, commit: wrap(&commit)?, welcome: Some(wrap(&welcome)?) }))
    }

    /// A commit removing the given devices; `Ok(None)` when none of them
    /// is in the group.
    pub fn remove(&mut self, conversation: &[u8], devices: &[DeviceRef]) -> Result<Option<Commit>, E2eeError> {
        let mut group = self.group(conversation)?;
        if group.pending_commit().is_some() {
            self.keep(conversation, group);
            return Err(E2eeError::PendingCommit);
        }
        let leaves: Vec<LeafNodeIndex> = group
            .members()
            .filter(|m| parse_identity(&m.credential).is_some_and(|(d, _)| devices.contains(&d)))
            .map(|m| m.index)
            .collect();
        if leaves.is_empty() {
            self.keep(conversation, group);
            return Ok(None);
        }
        let epoch = group.epoch().as_u64();
        let (commit, welcome, _) = group.remove_members(&self.provider, &self.key, &leaves).map_err(mls)?;
        self.keep(conversation, group);
        Ok(Some(Commit { epoch, commit: wrap(&commit)?, welcome: welcome.as_ref().map(wrap).transpose()? }))
    }

    /// Whether this device should refresh its own keys in the conversation
    /// ([`Engine::update`]) before it next posts: it joined from a key
    /// package and has not committed since, or its last commit there is
    /// [`KEYS_REFRESH_AFTER_SECS`] old (or of a time not kept: a state
    /// saved by an earlier version). A periodic refresh heals the group
    /// from a theft of this device's keys: what is sent after it is
    /// encrypted to keys the thief does not have. Its leaf's encryption key is
    /// then the one from the package, which waited on the server (a
    /// last-resort package's is shared by every conversation it joined),
    /// and the tree nodes above it may be blank: a group filled by batch
    /// additions has blank subtrees, and a commit encrypts to every leaf
    /// of a blank subtree. A member's commit fills its path, so once the
    /// members who post have refreshed, a change to a 1,024-device group
    /// encrypts to about log2(n) nodes instead of about n
    /// (docs/BENCHMARKS.md, "Members refresh their keys").
    pub fn wants_update(&self, conversation: &[u8]) -> bool {
        self.look(conversation, |g| {
            g.is_active()
                && g.pending_commit().is_none()
                // Alone in it (a group just created), there is no one to
                // refresh keys for; adding the others commits them anyway.
                && g.members().nth(1).is_some()
                && g.own_leaf_node().is_some_and(|l| {
                    matches!(l.leaf_node_source(), openmls::treesync::LeafNodeSource::KeyPackage(_))
                        || self.refreshed.get(conversation).is_none_or(|&at| {
                            (self.clock)().saturating_sub(at) >= KEYS_REFRESH_AFTER_SECS
                        })
                })
        })
        .unwrap_or(false)
    }

    /// The conversations whose keys this device should refresh whether or
    /// not it posts ([`Engine::update`]): its keys there are
    /// [`KEYS_REFRESH_IDLE_AFTER_SECS`] old, and [`Engine::wants_update`]
    /// holds. The clients do it as they carry device changes into their
    /// conversations, on connecting. Only the time is looked at first, so
    /// groups whose keys are fresh are not read from the storage. (A state
    /// saved before the times were kept names none: it refreshes at its
    /// next post.)
    pub fn stale_conversations(&self) -> Vec<Vec<u8>> {
        let now = (self.clock)();
        self.refreshed
            .iter()
            .filter(|&(_, &at)| now.saturating_sub(at) >= KEYS_REFRESH_IDLE_AFTER_SECS)
            .map(|(c, _)| c.clone())
            .filter(|c| self.wants_update(c))
            .collect()
    }

    /// A commit that only refreshes this device's own keys (forward
    /// secrecy and post-compromise security).
    pub fn update(&mut self, conversation: &[u8]) -> Result<Commit, E2eeError> {
        let mut group = self.group(conversation)?;
        if group.pending_commit().is_some() {
            self.keep(conversation, group);
            return Err(E2eeError::PendingCommit);
        }
        let epoch = group.epoch().as_u64();
        let bundle = group.self_update(&self.provider, &self.key, LeafNodeParameters::default()).map_err(mls)?;
        self.keep(conversation, group);
        let (commit, welcome, _) = bundle.into_messages();
        Ok(Commit { epoch, commit: wrap(&commit)?, welcome: welcome.as_ref().map(wrap).transpose()? })
    }

    /// Keeps `commit` until [`Engine::unstage`]: what to send again after a
    /// restart ([`Engine::outgoing`]).
    pub fn stage(&mut self, conversation: &[u8], client_id: &str, commit: &Commit) {
        self.outgoing.retain(|o| o.conversation != conversation);
        self.outgoing.push(Outgoing {
            conversation: conversation.to_vec(),
            client_id: client_id.to_owned(),
            commit: commit.clone(),
        });
    }

    /// The staged commit and its Welcome are sent (or the commit lost).
    pub fn unstage(&mut self, conversation: &[u8]) {
        self.outgoing.retain(|o| o.conversation != conversation);
    }

    /// Commits still to send (or to finish sending: when the group has no
    /// pending commit any more, the server took it and only the Welcome is
    /// left).
    pub fn outgoing(&self) -> &[Outgoing] {
        &self.outgoing
    }

    /// The server accepted this device's pending commit: move to the new
    /// epoch. Nothing to do when there is none (already applied).
    pub fn commit_accepted(&mut self, conversation: &[u8]) -> Result<(), E2eeError> {
        let mut group = self.group(conversation)?;
        let merged = group.pending_commit().is_some();
        if merged {
            group.merge_pending_commit(&self.provider).map_err(mls)?;
        }
        self.keep(conversation, group);
        if merged {
            self.note_refreshed(conversation);
        }
        Ok(())
    }

    /// The server refused this device's pending commit (another commit
    /// came first): drop it, process what came first, and make the change
    /// again if it is still needed.
    pub fn commit_refused(&mut self, conversation: &[u8]) -> Result<(), E2eeError> {
        self.unstage(conversation);
        let mut group = self.group(conversation)?;
        group.clear_pending_commit(self.provider.storage()).map_err(mls)?;
        self.keep(conversation, group);
        Ok(())
    }

    /// Encrypts a message for every device in the conversation.
    pub fn encrypt(&mut self, conversation: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, E2eeError> {
        let mut group = self.group(conversation)?;
        if !group.is_active() {
            self.keep(conversation, group);
            return Err(E2eeError::Removed);
        }
        if group.pending_commit().is_some() {
            return Err(E2eeError::PendingCommit);
        }
        let out = group.create_message(&self.provider, &self.key, plaintext).map_err(mls)?;
        self.keep(conversation, group);
        wrap(&out)
    }

    /// Processes one payload from the conversation's log, in log order.
    /// `from_me`: the payload was sent by this device (its own commit, seen
    /// in the log, is applied here if it was still pending; its own
    /// application messages cannot be opened by it, and are `NotForMe`).
    pub fn receive(&mut self, payload: &[u8], from_me: bool) -> Result<Incoming, E2eeError> {
        // A post naming its parts ([`parts`]) is opened once those this
        // device needs are downloaded ([`inline`]); with nothing to
        // download, from the commit it carries, or as nothing at all.
        if let Some(needed) = self.parts_needed(payload, from_me)? {
            if !needed.is_empty() {
                return Err(E2eeError::NotDownloaded);
            }
            let carried = inline(payload, &[])?;
            return if carried.is_empty() { Ok(Incoming::NotForMe) } else { self.receive(&carried, from_me) };
        }
        if payload.starts_with(BUNDLE_MAGIC) {
            let (commit, welcome) =
                split_bundle(payload).ok_or_else(|| E2eeError::Malformed("a cut-off commit bundle".into()))?;
            // Members (and the committer) take the commit; the devices it
            // adds, the Welcome.
            return match self.receive(commit, from_me)? {
                Incoming::NotForMe if !from_me => self.receive(welcome, false),
                done => Ok(done),
            };
        }
        let bytes = payload.strip_prefix(MAGIC).ok_or(E2eeError::NotEncrypted)?;
        let message = MlsMessageIn::tls_deserialize_exact(bytes).map_err(|e| E2eeError::Malformed(e.to_string()))?;
        let protocol: ProtocolMessage = match message.extract() {
            MlsMessageBodyIn::Welcome(welcome) => return self.join(welcome),
            MlsMessageBodyIn::PrivateMessage(m) => m.into(),
            MlsMessageBodyIn::PublicMessage(m) => m.into(),
            _ => return Err(E2eeError::Malformed("not a message, commit or welcome".into())),
        };
        let conversation = protocol.group_id().as_slice().to_vec();
        let Ok(mut group) = self.group(&conversation) else {
            // A message in a conversation this device has no keys of is
            // worth saying; a handshake is not (its Welcome may follow).
            return match protocol.content_type() {
                ContentType::Application => Err(E2eeError::UnknownConversation),
                _ => Ok(Incoming::NotForMe),
            };
        };
        let epoch = protocol.epoch().as_u64();
        if from_me {
            // Our own commit, back from the log: it is the one that counts.
            if protocol.content_type() == ContentType::Commit
                && group.pending_commit().is_some()
                && epoch == group.epoch().as_u64()
            {
                group.merge_pending_commit(&self.provider).map_err(mls)?;
                let (removed, epoch) = (!group.is_active(), group.epoch().as_u64());
                self.keep(&conversation, group);
                self.note_refreshed(&conversation);
                return Ok(Incoming::Committed { conversation, epoch, by: self.me, removed });
            }
            self.keep(&conversation, group);
            return Ok(Incoming::NotForMe);
        }
        if !group.is_active()
            // A commit already applied (a replay after a restart).
            || (protocol.content_type() == ContentType::Commit && epoch < group.epoch().as_u64())
        {
            self.keep(&conversation, group);
            return Ok(Incoming::NotForMe);
        }
        // No device keeps other epochs' keys: say which side it is on.
        let current = group.epoch().as_u64();
        if protocol.content_type() == ContentType::Application && epoch != current {
            self.keep(&conversation, group);
            return Err(if epoch < current { E2eeError::EarlierKeys } else { E2eeError::LaterKeys });
        }
        let processed = match group.process_message(&self.provider, protocol) {
            Ok(processed) => processed,
            // This device started the conversation too, alone in its own
            // group, and another device's start came first: that one's
            // commit is not for this group; its Welcome follows.
            Err(_) if group.members().count() == 1 => return Ok(Incoming::NotForMe),
            Err(e) => return Err(mls(e)),
        };
        let by = parse_identity(processed.credential()).map(|(d, _)| d).unwrap_or(DeviceRef { account: 0, device: 0 });
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => {
                self.keep(&conversation, group);
                Ok(Incoming::Message { conversation, from: by, plaintext: app.into_bytes() })
            }
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                // A commit from another device replaces any of ours for the
                // same epoch: the server took theirs first.
                if group.pending_commit().is_some() {
                    group.clear_pending_commit(self.provider.storage()).map_err(mls)?;
                    self.outgoing.retain(|o| o.conversation != conversation);
                }
                group.merge_staged_commit(&self.provider, *staged).map_err(mls)?;
                let (removed, epoch) = (!group.is_active(), group.epoch().as_u64());
                self.keep(&conversation, group);
                Ok(Incoming::Committed { conversation, epoch, by, removed })
            }
            // Skylark's clients send no standalone proposals.
            _ => {
                self.keep(&conversation, group);
                Ok(Incoming::NotForMe)
            }
        }
    }

    /// Encrypts like [`Engine::encrypt`], and remembers the plaintext
    /// under `client_id`, so this device shows its own message when it
    /// comes back in the log (it cannot decrypt its own ciphertext).
    pub fn encrypt_as(&mut self, conversation: &[u8], client_id: &str, plaintext: &[u8]) -> Result<Vec<u8>, E2eeError> {
        let payload = self.encrypt(conversation, plaintext)?;
        self.remember(
            own_key(client_id),
            Opened::Message { conversation: conversation.to_vec(), from: self.me, plaintext: plaintext.to_vec() },
        );
        Ok(payload)
    }

    /// Opens one log entry once: `key` names the entry (unique per device,
    /// such as the account log's sequence number); asked again, the same
    /// answer comes from memory. `own_client_id`: the entry was sent by this
    /// device, with that client id.
    pub fn open_once(&mut self, key: &str, payload: &[u8], own_client_id: Option<&str>) -> Opened {
        if let Some(known) = self.journal.get(key) {
            return known.clone();
        }
        let opened = match own_client_id.and_then(|c| self.journal.get(&own_key(c))) {
            Some(mine @ Opened::Message { .. }) => mine.clone(),
            _ => {
                // The members before a commit, to tell a change of devices
                // (an application message changes none: not listed for one).
                let before = self.commit_conversation(payload).and_then(|c| self.members(&c).ok());
                match self.receive(payload, own_client_id.is_some()) {
                    Ok(Incoming::Message { conversation, from, plaintext }) if plaintext.starts_with(HISTORY_MAGIC) => {
                        let entries = self.take_history(&conversation, from, &plaintext);
                        Opened::History { conversation, entries }
                    }
                    Ok(Incoming::Message { conversation, from, plaintext }) => {
                        Opened::Message { conversation, from, plaintext }
                    }
                    Ok(Incoming::Committed { conversation, epoch, removed: false, .. })
                        if epoch > 1 && before.is_some_and(|b| self.members(&conversation).ok() != Some(b)) =>
                    {
                        Opened::DevicesChanged { conversation, epoch }
                    }
                    Ok(_) => Opened::Control,
                    // Not remembered: opened again once its parts are
                    // downloaded.
                    Err(e @ E2eeError::NotDownloaded) => return Opened::Failed(e.to_string()),
                    Err(e) => Opened::Failed(e.to_string()),
                }
            }
        };
        self.remember(key.to_owned(), opened.clone());
        opened
    }

    /// The conversation a commit belongs to; `None` for anything else (an
    /// application message, whose content type is in its clear header, or
    /// a Welcome, whose group id is encrypted).
    fn commit_conversation(&self, payload: &[u8]) -> Option<Vec<u8>> {
        let payload = split_bundle(payload).map_or(payload, |(commit, _)| commit);
        let bytes = payload.strip_prefix(MAGIC)?;
        let protocol: ProtocolMessage = match MlsMessageIn::tls_deserialize_exact(bytes).ok()?.extract() {
            MlsMessageBodyIn::PrivateMessage(m) => m.into(),
            MlsMessageBodyIn::PublicMessage(m) => m.into(),
            _ => return None,
        };
        (protocol.content_type() == ContentType::Commit).then(|| protocol.group_id().as_slice().to_vec())
    }

    /// The texts this device has of the conversation's posts, for devices
    /// of this account just added to it, newest first, in chunks of at most
    /// `budget` bytes and at most `chunks` of them: each chunk goes in one
    /// encrypted post ([`Engine::seal_history`]). The records are keyed as
    /// every device keys the conversation's entries, so the new devices show
    /// them where they would have shown that they cannot read them. Every
    /// member can decrypt such a post, as any message of the conversation:
    /// send it only where every member may read all of its history (a 1:1
    /// conversation, whose two people wrote it all).
    pub fn history_chunks(&self, conversation: &[u8], budget: usize, chunks: usize) -> Vec<Vec<u8>> {
        let Some(prefix) = history_prefix(conversation) else { return Vec::new() };
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut chunk = Vec::new();
        for key in self.journal_order.iter().rev() {
            if !key.starts_with(&prefix) {
                continue;
            }
            let opened @ Opened::Message { conversation: c, .. } = &self.journal[key] else { continue };
            if c != conversation {
                continue;
            }
            let mut record = Vec::new();
            put(&mut record, key.as_bytes());
            put_opened(&mut record, opened);
            if record.len() > budget {
                continue;
            }
            if chunk.len() + record.len() > budget {
                out.push(std::mem::take(&mut chunk));
                if out.len() == chunks {
                    return out;
                }
            }
            chunk.extend_from_slice(&record);
        }
        if !chunk.is_empty() && out.len() < chunks {
            out.push(chunk);
        }
        out
    }

    /// Encrypts one chunk of [`Engine::history_chunks`] for the devices `to`
    /// as a message of the conversation.
    pub fn seal_history(&mut self, conversation: &[u8], to: &[DeviceRef], chunk: &[u8]) -> Result<Vec<u8>, E2eeError> {
        let mut plaintext = HISTORY_MAGIC.to_vec();
        put(&mut plaintext, &(to.len() as u64).to_be_bytes());
        for d in to {
            put(&mut plaintext, &d.account.to_be_bytes());
            put(&mut plaintext, &d.device.to_be_bytes());
        }
        plaintext.extend_from_slice(chunk);
        self.encrypt(conversation, &plaintext)
    }

    /// Takes in a history message ([`Engine::seal_history`]) opened in
    /// `conversation`: only from a device of this account, only when it
    /// names this device, only entries of this conversation, and never over
    /// what this device opened itself (only over what it could not open,
    /// lacking the keys). Returns how many entries it added.
    fn take_history(&mut self, conversation: &[u8], from: DeviceRef, plaintext: &[u8]) -> u64 {
        let Some(mut rest) = plaintext.strip_prefix(HISTORY_MAGIC) else { return 0 };
        let Some(prefix) = history_prefix(conversation) else { return 0 };
        let number = |b: Option<&[u8]>| b.and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
        let Some(count) = number(take(&mut rest)) else { return 0 };
        let mut for_me = false;
        for _ in 0..count.min(plaintext.len() as u64) {
            let (Some(account), Some(device)) = (number(take(&mut rest)), number(take(&mut rest))) else { return 0 };
            for_me |= DeviceRef { account, device } == self.me;
        }
        if from.account != self.me.account || from == self.me || !for_me {
            return 0;
        }
        let mut added = 0;
        while let Some(key) = take(&mut rest) {
            let Some(opened) = take_opened(&mut rest) else { break };
            let Ok(key) = String::from_utf8(key.to_vec()) else { break };
            let ours = matches!(&opened, Opened::Message { conversation: c, .. } if c == conversation);
            let unread = matches!(self.journal.get(&key), None | Some(Opened::Failed(_)));
            if ours && key.starts_with(&prefix) && unread {
                self.remember(key, opened);
                added += 1;
            }
        }
        added
    }

    /// Forgets what the entry `key` said (a message deleted for everyone,
    /// or one whose time ran out): it stays opened, as nothing to show, so
    /// it is never decrypted again; when this device sent it, its own copy
    /// of the text goes too.
    pub fn forget(&mut self, key: &str) {
        let Some(Opened::Message { conversation, from, plaintext }) = self.journal.get(key).cloned() else { return };
        if from == self.me {
            let own: Vec<String> = self
                .journal
                .iter()
                .filter(|(k, v)| {
                    k.starts_with("own:")
                        && matches!(v, Opened::Message { conversation: c, plaintext: p, .. }
                            if *c == conversation && *p == plaintext)
                })
                .map(|(k, _)| k.clone())
                .collect();
            for k in own {
                self.journal.insert(k.clone(), Opened::Control);
                self.journal_changed.borrow_mut().push(k);
            }
        }
        self.journal.insert(key.to_owned(), Opened::Control);
        self.journal_changed.borrow_mut().push(key.to_owned());
        self.journal_forgot.set(true);
    }

    /// Whether a message's text was forgotten since the journal changes
    /// were last taken: appending says it is gone, but the file still holds
    /// it, so write the journal afresh ([`Engine::journal_records`]).
    pub fn journal_forgot(&self) -> bool {
        self.journal_forgot.get()
    }

    /// What [`Engine::open_once`] made of the entry `key`, if it was
    /// opened (nothing is decrypted here: for showing history).
    pub fn recall(&self, key: &str) -> Option<Opened> {
        self.journal.get(key).cloned()
    }

    fn remember(&mut self, key: String, opened: Opened) {
        self.journal_changed.borrow_mut().push(key.clone());
        if self.journal.insert(key.clone(), opened).is_none() {
            self.journal_order.push_back(key);
        }
        while self.journal_order.len() > JOURNAL_ENTRIES {
            if let Some(old) = self.journal_order.pop_front() {
                self.journal.remove(&old);
                self.journal_changed.borrow_mut().push(old);
            }
        }
    }

    /// The journal's entries changed since this was last asked (or the
    /// state last exported whole), as records for [`Engine::apply_journal`]:
    /// a client that keeps the journal in a file of its own appends them,
    /// instead of writing its whole history again with every change.
    pub fn take_journal_changes(&mut self) -> Vec<u8> {
        self.journal_forgot.set(false);
        let changed = std::mem::take(&mut *self.journal_changed.borrow_mut());
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for key in changed.iter().rev().filter(|k| seen.insert(k.as_str())).collect::<Vec<_>>().into_iter().rev() {
            put(&mut out, key.as_bytes());
            match self.journal.get(key) {
                Some(opened) => put_opened(&mut out, opened),
                None => put(&mut out, &[JOURNAL_DROPPED]),
            }
        }
        out
    }

    /// The whole journal, as records for [`Engine::apply_journal`] (to
    /// write a journal file afresh).
    pub fn journal_records(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for key in &self.journal_order {
            put(&mut out, key.as_bytes());
            put_opened(&mut out, &self.journal[key]);
        }
        out
    }

    /// Applies journal records ([`Engine::take_journal_changes`],
    /// [`Engine::journal_records`]) in order, after [`Engine::import`] of a
    /// state exported without its journal. A last record cut short (the
    /// process died while appending it) is ignored; returns how many bytes
    /// were whole records.
    pub fn apply_journal(&mut self, records: &[u8]) -> Result<usize, E2eeError> {
        let bad = |what: &str| E2eeError::State(format!("journal: {what}"));
        let mut rest = records;
        loop {
            let whole = records.len() - rest.len();
            let mut record = rest;
            let Some(key) = take(&mut record) else { break };
            let Ok(key) = String::from_utf8(key.to_vec()) else { return Err(bad("a key is not text")) };
            if record.starts_with(&1u32.to_be_bytes()) && record.get(4) == Some(&JOURNAL_DROPPED) {
                record = &record[5..];
                if self.journal.remove(&key).is_some() {
                    if self.journal_order.front() == Some(&key) {
                        self.journal_order.pop_front();
                    } else {
                        self.journal_order.retain(|k| *k != key);
                    }
                }
            } else {
                let Some(opened) = take_opened(&mut record) else {
                    // Cut short, or damaged: what came before stands.
                    self.journal_changed.borrow_mut().clear();
                    return Ok(whole);
                };
                if let Some(known) = self.journal.get_mut(&key) {
                    *known = opened;
                } else {
                    self.remember(key, opened);
                }
            }
            rest = record;
        }
        self.journal_changed.borrow_mut().clear();
        Ok(records.len() - rest.len())
    }

    /// How many log entries the journal remembers.
    pub fn journal_len(&self) -> usize {
        self.journal_order.len()
    }

    fn join(&mut self, welcome: Welcome) -> Result<Incoming, E2eeError> {
        let processed = match ProcessedWelcome::new_from_welcome(&self.provider, &Self::join_config(), welcome) {
            Ok(processed) => processed,
            Err(WelcomeError::NoMatchingKeyPackage) => return Ok(Incoming::NotForMe),
            Err(e) => return Err(mls(e)),
        };
        let conversation = processed.unverified_group_info().group_id().as_slice().to_vec();
        // The Welcome is for this device. A group it had for the
        // conversation gives way only if it was removed from it, or was
        // alone in it (it lost the race to start the conversation): a
        // Welcome never replaces a group this device is a member of with
        // others, so nobody can fork it out of its conversation.
        if let Ok(mut old) = self.group(&conversation) {
            if old.is_active() && old.members().count() > 1 {
                self.keep(&conversation, old);
                return Ok(Incoming::NotForMe);
            }
            old.delete(self.provider.storage()).map_err(mls)?;
        }
        let staged = processed.into_staged_welcome(&self.provider, None).map_err(mls)?;
        let group = staged.into_group(&self.provider).map_err(mls)?;
        let epoch = group.epoch().as_u64();
        self.keep(&conversation, group);
        self.conversations.insert(conversation.clone());
        self.note_refreshed(&conversation);
        Ok(Incoming::Joined { conversation, epoch })
    }

    /// The whole state as one byte string (keys included: keep it private).
    pub fn export(&self) -> Vec<u8> {
        self.journal_changed.borrow_mut().clear();
        self.journal_forgot.set(false);
        self.export_with(true)
    }

    /// The state without the journal: for a client that keeps the journal
    /// apart ([`Engine::take_journal_changes`]); [`Engine::import`] reads it,
    /// then [`Engine::apply_journal`] the journal.
    pub fn export_without_journal(&self) -> Vec<u8> {
        self.export_with(false)
    }

    /// The state without the journal, as a new generation of it: the base
    /// that the changes taken next ([`Engine::take_state_changes`]) follow,
    /// for a client to write as its state, whole. (An export changes
    /// nothing; this starts the changes afresh.)
    pub fn save_whole(&self) -> Vec<u8> {
        self.generation.set(self.generation.get() + 1);
        let values = self.provider.storage().values.read().expect("storage lock");
        *self.saved.borrow_mut() = values.clone();
        drop(values);
        *self.saved_rest.borrow_mut() = self.rest();
        self.export_with(false)
    }

    fn export_with(&self, journal: bool) -> Vec<u8> {
        let generation = self.generation.get();
        let values = self.provider.storage().values.read().expect("storage lock");
        let mut entries: Vec<(&Vec<u8>, &Vec<u8>)> = values.iter().collect();
        entries.sort();
        let mut out = STATE_MAGIC.to_vec();
        out.push(STATE_VERSION);
        put(&mut out, &self.me.account.to_be_bytes());
        put(&mut out, &self.me.device.to_be_bytes());
        put(&mut out, self.key.0.as_bytes());
        put(&mut out, &self.binding);
        put(&mut out, &generation.to_be_bytes());
        put(&mut out, &(entries.len() as u64).to_be_bytes());
        for (k, v) in entries {
            put(&mut out, k);
            put(&mut out, v);
        }
        put_outgoing(&mut out, &self.outgoing);
        let kept = if journal { self.journal_order.len() } else { 0 };
        put(&mut out, &(kept as u64).to_be_bytes());
        for key in self.journal_order.iter().take(kept) {
            put(&mut out, key.as_bytes());
            put_opened(&mut out, &self.journal[key]);
        }
        put_conversations(&mut out, &self.conversations);
        put_refreshed(&mut out, &self.refreshed);
        out
    }

    /// What the state holds besides the MLS storage and the journal.
    fn rest(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_outgoing(&mut out, &self.outgoing);
        put_conversations(&mut out, &self.conversations);
        put_refreshed(&mut out, &self.refreshed);
        out
    }

    /// What changed in the state (the journal aside) since it was last
    /// saved whole ([`Engine::save_whole`]) or this was last asked, as one
    /// record for [`Engine::apply_state_changes`] (empty when nothing did).
    /// A client appends it to a file beside the state written whole,
    /// instead of writing the whole state after each operation: after a
    /// message, in a group of 1,024 devices, 23 KB instead of 1.2 MB. The
    /// record names the whole save it follows, and ends with a checksum.
    pub fn take_state_changes(&self) -> Vec<u8> {
        let values = self.provider.storage().values.read().expect("storage lock");
        let mut saved = self.saved.borrow_mut();
        let changed: Vec<(&Vec<u8>, &Vec<u8>)> = values.iter().filter(|(k, v)| saved.get(*k) != Some(*v)).collect();
        let gone: Vec<Vec<u8>> = saved.keys().filter(|k| !values.contains_key(*k)).cloned().collect();
        let rest = self.rest();
        if changed.is_empty() && gone.is_empty() && rest == *self.saved_rest.borrow() {
            return Vec::new();
        }
        let mut body = CHANGES_MAGIC.to_vec();
        put(&mut body, &self.generation.get().to_be_bytes());
        put(&mut body, &(changed.len() as u64).to_be_bytes());
        for (k, v) in &changed {
            put(&mut body, k);
            put(&mut body, v);
        }
        put(&mut body, &(gone.len() as u64).to_be_bytes());
        for k in &gone {
            put(&mut body, k);
        }
        body.extend_from_slice(&rest);
        for (k, v) in changed {
            saved.insert(k.clone(), v.clone());
        }
        for k in gone {
            saved.remove(&k);
        }
        *self.saved_rest.borrow_mut() = rest;
        let mut out = Vec::with_capacity(body.len() + 12);
        put(&mut out, &body);
        out.extend_from_slice(&checksum(&body));
        out
    }

    /// Applies records of [`Engine::take_state_changes`] in order, after
    /// [`Engine::import`] of the state they followed; records taken after an
    /// earlier whole save are passed over. A last record cut short or damaged
    /// (the process died while appending it) is ignored; returns how many
    /// bytes were whole records.
    pub fn apply_state_changes(&mut self, records: &[u8]) -> Result<usize, E2eeError> {
        let bad = |what: &str| E2eeError::State(format!("state changes: {what}"));
        let mut rest = records;
        loop {
            let whole = records.len() - rest.len();
            let mut record = rest;
            let Some(body) = take(&mut record) else { return Ok(whole) };
            let Some(sum) = record.get(..8) else { return Ok(whole) };
            if checksum(body) != sum {
                return Ok(whole);
            }
            rest = &record[8..];
            let mut body = body.strip_prefix(CHANGES_MAGIC).ok_or_else(|| bad("not a record"))?;
            let mut next = |what: &str| take(&mut body).ok_or_else(|| bad(what));
            let u64_of = |b: &[u8]| b.try_into().map(u64::from_be_bytes).map_err(|_| bad("bad number"));
            if u64_of(next("generation")?)? != self.generation.get() {
                continue; // taken before the state was last written whole
            }
            let mut values = self.provider.storage().values.write().expect("storage lock");
            let mut saved = self.saved.borrow_mut();
            for _ in 0..u64_of(next("count")?)? {
                let (k, v) = (next("key")?.to_vec(), next("value")?.to_vec());
                saved.insert(k.clone(), v.clone());
                values.insert(k, v);
            }
            for _ in 0..u64_of(next("count")?)? {
                let k = next("key")?;
                saved.remove(k);
                values.remove(k);
            }
            let outgoing = take_outgoing(&mut body).ok_or_else(|| bad("commits"))?;
            let conversations = take_conversations(&mut body).ok_or_else(|| bad("conversations"))?;
            // Records of an earlier version end here.
            let refreshed = if body.is_empty() {
                None
            } else {
                Some(take_refreshed(&mut body).ok_or_else(|| bad("refresh times"))?)
            };
            if !body.is_empty() {
                return Err(bad("trailing bytes"));
            }
            drop((values, saved));
            self.outgoing = outgoing;
            self.conversations = conversations;
            if let Some(refreshed) = refreshed {
                self.refreshed = refreshed;
            }
            *self.saved_rest.borrow_mut() = self.rest();
            // Groups read before these changes are out of date.
            self.groups.borrow_mut().clear();
        }
    }

    /// Reads back what [`Engine::export`] wrote.
    pub fn import(bytes: &[u8]) -> Result<Engine, E2eeError> {
        let bad = |what: &str| E2eeError::State(format!("{what} (the file is damaged or from another program)"));
        let rest = bytes.strip_prefix(STATE_MAGIC).ok_or_else(|| bad("not a Skylark encryption state"))?;
        let (&version, mut rest) = rest.split_first().ok_or_else(|| bad("empty"))?;
        if !(1..=STATE_VERSION).contains(&version) {
            return Err(E2eeError::State(format!(
                "state format {version} is not known to this version of Skylark (it reads format {STATE_VERSION})"
            )));
        }
        let mut next = |what: &str| take(&mut rest).ok_or_else(|| bad(what));
        let u64_of = |b: &[u8]| b.try_into().map(u64::from_be_bytes).map_err(|_| bad("bad number"));
        let account = u64_of(next("account")?)?;
        let device = u64_of(next("device")?)?;
        let seed: [u8; 32] = next("key")?.try_into().map_err(|_| bad("bad key"))?;
        let binding = next("binding")?.to_vec();
        // Format 1 had no generations.
        let generation = if version == 1 { 0 } else { u64_of(next("generation")?)? };
        let count = u64_of(next("count")?)?;
        let provider = OpenMlsRustCrypto::default();
        {
            let mut values = provider.storage().values.write().expect("storage lock");
            for _ in 0..count {
                let k = next("entry")?.to_vec();
                let v = next("entry")?.to_vec();
                values.insert(k, v);
            }
        }
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| bad("bad text"));
        let outgoing = take_outgoing(&mut rest).ok_or_else(|| bad("bad commit on its way"))?;
        let mut engine = Engine {
            provider,
            key: MlsKey(SigningKey::from_bytes(&seed)),
            me: DeviceRef { account, device },
            binding,
            outgoing,
            journal: Default::default(),
            journal_order: Default::default(),
            journal_changed: Default::default(),
            journal_forgot: Default::default(),
            conversations: Default::default(),
            refreshed: Default::default(),
            clock: system_clock,
            groups: Default::default(),
            loads: Default::default(),
            saved: Default::default(),
            saved_rest: Default::default(),
            generation: std::cell::Cell::new(generation),
        };
        let journal = take(&mut rest).ok_or_else(|| bad("count"))?;
        for _ in 0..u64_of(journal)? {
            let key = take(&mut rest).ok_or_else(|| bad("journal"))?;
            let key = text(key)?;
            let opened = take_opened(&mut rest).ok_or_else(|| bad("bad journal entry"))?;
            engine.remember(key, opened);
        }
        engine.journal_changed.borrow_mut().clear();
        engine.conversations = take_conversations(&mut rest).ok_or_else(|| bad("bad conversation"))?;
        if version >= 3 {
            engine.refreshed = take_refreshed(&mut rest).ok_or_else(|| bad("bad refresh time"))?;
        }
        if !rest.is_empty() {
            return Err(bad("trailing bytes"));
        }
        *engine.saved.borrow_mut() = engine.provider.storage().values.read().expect("storage lock").clone();
        *engine.saved_rest.borrow_mut() = engine.rest();
        Ok(engine)
    }
}

/// The commits on their way, as the state holds them.
fn put_outgoing(out: &mut Vec<u8>, outgoing: &[Outgoing]) {
    put(out, &(outgoing.len() as u64).to_be_bytes());
    for o in outgoing {
        put(out, &o.conversation);
        put(out, o.client_id.as_bytes());
        put(out, &o.commit.epoch.to_be_bytes());
        put(out, &o.commit.commit);
        put(out, o.commit.welcome.as_deref().unwrap_or_default());
    }
}

fn take_outgoing(rest: &mut &[u8]) -> Option<Vec<Outgoing>> {
    let number = |b: &[u8]| b.try_into().ok().map(u64::from_be_bytes);
    let mut outgoing = Vec::new();
    for _ in 0..number(take(rest)?)? {
        let conversation = take(rest)?.to_vec();
        let client_id = String::from_utf8(take(rest)?.to_vec()).ok()?;
        let epoch = number(take(rest)?)?;
        let commit = take(rest)?.to_vec();
        let welcome = Some(take(rest)?.to_vec()).filter(|w| !w.is_empty());
        outgoing.push(Outgoing { conversation, client_id, commit: Commit { epoch, commit, welcome } });
    }
    Some(outgoing)
}

fn put_conversations(out: &mut Vec<u8>, conversations: &std::collections::BTreeSet<Vec<u8>>) {
    put(out, &(conversations.len() as u64).to_be_bytes());
    for c in conversations {
        put(out, c);
    }
}

fn take_conversations(rest: &mut &[u8]) -> Option<std::collections::BTreeSet<Vec<u8>>> {
    let count = u64::from_be_bytes(take(rest)?.try_into().ok()?);
    (0..count).map(|_| take(rest).map(<[u8]>::to_vec)).collect()
}

fn put_refreshed(out: &mut Vec<u8>, refreshed: &std::collections::BTreeMap<Vec<u8>, u64>) {
    put(out, &(refreshed.len() as u64).to_be_bytes());
    for (conversation, at) in refreshed {
        put(out, conversation);
        put(out, &at.to_be_bytes());
    }
}

fn take_refreshed(rest: &mut &[u8]) -> Option<std::collections::BTreeMap<Vec<u8>, u64>> {
    let number = |b: &[u8]| b.try_into().ok().map(u64::from_be_bytes);
    (0..number(take(rest)?)?).map(|_| Some((take(rest)?.to_vec(), number(take(rest)?)?))).collect()
}

/// The first 8 bytes of a record's SHA-256: a record half written (or
/// damaged on disk) is told from a whole one.
fn checksum(body: &[u8]) -> [u8; 8] {
    let digest = sha2::Sha256::digest(body);
    digest[..8].try_into().expect("8 of 32 bytes")
}

/// How the journal keys of a conversation's entries start (the clients key
/// a group's entries `post:GROUP:SEQ`, the same on every device).
fn history_prefix(conversation: &[u8]) -> Option<String> {
    conversation_group(conversation).map(|group| format!("post:{group}:"))
}

/// The journal key of this device's own message with `client_id`.
fn own_key(client_id: &str) -> String {
    format!("own:{client_id}")
}

/// A journal record's mark for an entry dropped from the journal.
const JOURNAL_DROPPED: u8 = 4;

/// An opened entry, as the state and the journal records hold it.
fn put_opened(out: &mut Vec<u8>, opened: &Opened) {
    match opened {
        Opened::Message { conversation, from, plaintext } => {
            put(out, &[0]);
            put(out, conversation);
            put(out, &from.account.to_be_bytes());
            put(out, &from.device.to_be_bytes());
            put(out, plaintext);
        }
        Opened::Control => put(out, &[1]),
        Opened::DevicesChanged { conversation, epoch } => {
            put(out, &[3]);
            put(out, conversation);
            put(out, &epoch.to_be_bytes());
        }
        Opened::Failed(why) => {
            put(out, &[2]);
            put(out, why.as_bytes());
        }
        Opened::History { conversation, entries } => {
            put(out, &[5]);
            put(out, conversation);
            put(out, &entries.to_be_bytes());
        }
    }
}

fn take_opened(rest: &mut &[u8]) -> Option<Opened> {
    let number = |b: &[u8]| b.try_into().ok().map(u64::from_be_bytes);
    Some(match take(rest)? {
        [0] => Opened::Message {
            conversation: take(rest)?.to_vec(),
            from: DeviceRef { account: number(take(rest)?)?, device: number(take(rest)?)? },
            plaintext: take(rest)?.to_vec(),
        },
        [1] => Opened::Control,
        [3] => Opened::DevicesChanged { conversation: take(rest)?.to_vec(), epoch: number(take(rest)?)? },
        [2] => Opened::Failed(String::from_utf8(take(rest)?.to_vec()).ok()?),
        [5] => Opened::History { conversation: take(rest)?.to_vec(), entries: number(take(rest)?)? },
        _ => return None,
    })
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn take<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let bytes = rest.get(4..4 + len)?;
    *rest = &rest[4 + len..];
    Some(bytes)
}

fn wrap(message: &MlsMessageOut) -> Result<Vec<u8>, E2eeError> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&message.tls_serialize_detached().map_err(mls)?);
    Ok(out)
}

/// Whether a payload is end-to-end encrypted (rather than plain text from
/// a client without encryption).
pub fn is_encrypted(payload: &[u8]) -> bool {
    payload.starts_with(MAGIC) || payload.starts_with(BUNDLE_MAGIC) || payload.starts_with(OUT_OF_LINE_MAGIC)
}

fn getrandom(buf: &mut [u8]) {
    use openmls_traits::random::OpenMlsRand as _;
    let provider = OpenMlsRustCrypto::default();
    let bytes = provider.rand().random_vec(buf.len()).expect("the system's random source");
    buf.copy_from_slice(&bytes);
}

/// The safety number of two accounts: 60 digits that both sides compute
/// from their own and the other's device keys, and compare (read aloud,
/// or side by side). It changes when either account's set of device keys
/// changes. `keys` are 32-byte Ed25519 device keys, in any order.
pub fn safety_number(a: (u64, &[[u8; 32]]), b: (u64, &[[u8; 32]])) -> String {
    let half = |account: u64, keys: &[[u8; 32]]| -> String {
        let mut keys = keys.to_vec();
        keys.sort();
        let mut hash = Sha512::new();
        hash.update(b"skylark safety number v1\0");
        hash.update(account.to_be_bytes());
        for k in &keys {
            hash.update(k);
        }
        let mut digest = hash.finalize();
        // Stretched, so finding a colliding key set costs real work.
        for _ in 0..1024 {
            let mut h = Sha512::new();
            h.update(digest);
            h.update(account.to_be_bytes());
            digest = h.finalize();
        }
        digest[..30]
            .chunks(5)
            .map(|c| {
                let n = c.iter().fold(0u64, |n, &b| (n << 8) | u64::from(b));
                format!("{:05}", n % 100_000)
            })
            .collect()
    };
    let (first, second) = if a.0 <= b.0 { (a, b) } else { (b, a) };
    let digits = half(first.0, first.1) + &half(second.0, second.1);
    digits.as_bytes().chunks(5).map(|c| std::str::from_utf8(c).expect("digits")).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests;
