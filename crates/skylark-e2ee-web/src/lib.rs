//! The web client's end-to-end encryption: [`skylark_e2ee::Engine`] as a
//! WebAssembly module, so the browser runs the same MLS code as the SDK
//! and the CLI.
//!
//! The page (`web/e2ee.js` in skylark-gateway) does what the CLI's
//! `skylark_client::e2ee` does around the engine — key packages, commits
//! in the group's order, opening posts in log order — and keeps
//! [`Device::save`]'s bytes in IndexedDB after every change.
//!
//! The interface speaks the page's language: ids are decimal strings (as
//! in the protocol's JSON), payloads and key packages base64 (as in its
//! frames), structured answers JSON, and errors are JavaScript `Error`s
//! whose message is the engine's sentence for the user.
//!
//! Built with `web/e2ee/build.sh` (cargo for wasm32-unknown-unknown, then
//! wasm-bindgen); the output is committed and CI checks it is current.
#![cfg(target_arch = "wasm32")]

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};
use skylark_e2ee::{Commit, DeviceRef, E2eeError, Engine, Opened, PartKind, group_conversation};
use wasm_bindgen::prelude::*;

#[wasm_bindgen]
extern "C" {
    /// The page's clock, in milliseconds since the Unix epoch.
    #[wasm_bindgen(js_namespace = Date, js_name = now)]
    fn date_now() -> f64;
}

/// The engine's clock ([`Engine::set_clock`]): WebAssembly has no system
/// clock of its own.
fn page_clock() -> u64 {
    (date_now() / 1000.0) as u64
}

fn fail(e: E2eeError) -> JsError {
    JsError::new(&e.to_string())
}

fn number(text: &str, what: &str) -> Result<u64, JsError> {
    text.parse().map_err(|_| JsError::new(&format!("{what} is not a number: {text:?}")))
}

/// Conversations as the page names them: a JSON array of group ids.
fn group_ids(conversations: &[Vec<u8>]) -> String {
    let groups: Vec<String> =
        conversations.iter().filter_map(|c| skylark_e2ee::conversation_group(c)).map(|g| g.to_string()).collect();
    Value::from(groups).to_string()
}

fn conversation(group: &str) -> Result<Vec<u8>, JsError> {
    Ok(group_conversation(number(group, "the group id")?))
}

fn bytes(b64: &str, what: &str) -> Result<Vec<u8>, JsError> {
    BASE64.decode(b64).map_err(|_| JsError::new(&format!("{what} is not base64")))
}

fn parse(json: &str, what: &str) -> Result<Value, JsError> {
    serde_json::from_str(json).map_err(|e| JsError::new(&format!("{what} is not valid JSON: {e}")))
}

/// A JSON array, each element read by `each`.
fn list<T>(json: &str, what: &str, each: impl Fn(&Value) -> Result<T, JsError>) -> Result<Vec<T>, JsError> {
    let value = parse(json, what)?;
    let items = value.as_array().ok_or_else(|| JsError::new(&format!("{what} are not a list")))?;
    items.iter().map(each).collect()
}

fn field<'a>(value: &'a Value, name: &str) -> Result<&'a str, JsError> {
    value.get(name).and_then(Value::as_str).ok_or_else(|| JsError::new(&format!("\"{name}\" is missing")))
}

fn device_ref(value: &Value) -> Result<DeviceRef, JsError> {
    Ok(DeviceRef {
        account: number(field(value, "account")?, "account")?,
        device: number(field(value, "device")?, "device")?,
    })
}

fn commit_value(c: &Commit) -> Value {
    json!({
        "epoch": c.epoch.to_string(),
        "commit": BASE64.encode(&c.commit),
        "welcome": c.welcome.as_ref().map(|w| BASE64.encode(w)),
        "payload": BASE64.encode(c.payload()),
    })
}

fn commit_json(c: &Commit) -> String {
    commit_value(c).to_string()
}

fn commit_from(json: &str) -> Result<Commit, JsError> {
    let v = parse(json, "the commit")?;
    let welcome = match v.get("welcome").and_then(Value::as_str) {
        Some(w) => Some(bytes(w, "the Welcome")?),
        None => None,
    };
    Ok(Commit {
        epoch: number(field(&v, "epoch")?, "the epoch")?,
        commit: bytes(field(&v, "commit")?, "the commit")?,
        welcome,
    })
}

fn opened_json(opened: &Opened) -> String {
    match opened {
        Opened::Message { from, plaintext, .. } => json!({
            "kind": "message",
            "plaintext": BASE64.encode(plaintext),
            "account": from.account.to_string(),
            "device": from.device.to_string(),
        }),
        Opened::DevicesChanged { epoch, .. } => json!({ "kind": "devicesChanged", "epoch": epoch.to_string() }),
        Opened::Failed(why) => json!({ "kind": "failed", "reason": why }),
        Opened::Control => json!({ "kind": "control" }),
        Opened::History { entries, .. } => json!({ "kind": "history", "entries": entries.to_string() }),
    }
    .to_string()
}

/// Whether a payload (base64) is an end-to-end encrypted one.
#[wasm_bindgen(js_name = isEncrypted)]
pub fn is_encrypted(payload: &str) -> bool {
    BASE64.decode(payload).is_ok_and(|p| skylark_e2ee::is_encrypted(&p))
}

fn kind_name(kind: PartKind) -> &'static str {
    match kind {
        PartKind::Commit => "commit",
        PartKind::Welcome => "welcome",
    }
}

/// What to upload of a commit (JSON, as [`Device::add`] returns it) too
/// large for a post of `max_post` bytes: JSON `[{kind, bytes}]`, `kind`
/// "commit" or "welcome", `bytes` base64.
#[wasm_bindgen(js_name = toUpload)]
pub fn to_upload(commit: &str, max_post: u32) -> Result<String, JsError> {
    let commit = commit_from(commit)?;
    let parts: Vec<Value> = commit
        .to_upload(max_post as usize)
        .into_iter()
        .map(|(kind, bytes)| json!({ "kind": kind_name(kind), "bytes": BASE64.encode(bytes) }))
        .collect();
    Ok(Value::from(parts).to_string())
}

/// The post (base64) that stands for the commit once the parts
/// [`to_upload`] listed are uploaded: `uploaded` is JSON `[{kind, id}]`.
#[wasm_bindgen(js_name = outOfLine)]
pub fn out_of_line(group: &str, commit: &str, uploaded: &str) -> Result<String, JsError> {
    let commit = commit_from(commit)?;
    let uploaded = list(uploaded, "the uploaded parts", |v| {
        let kind = match field(v, "kind")? {
            "commit" => PartKind::Commit,
            "welcome" => PartKind::Welcome,
            other => return Err(JsError::new(&format!("no part of a commit is called {other:?}"))),
        };
        Ok((kind, field(v, "id")?.to_owned()))
    })?;
    Ok(BASE64.encode(skylark_e2ee::out_of_line(&conversation(group)?, &commit, &uploaded).map_err(fail)?))
}

/// Checks that a claimed key package belongs to the device it was listed
/// for and that its MLS key is signed by that device's key; throws a
/// sentence saying what is wrong otherwise.
#[wasm_bindgen(js_name = checkPackage)]
pub fn check_package(account: &str, device: &str, package: &str, device_key: &str) -> Result<(), JsError> {
    let who = DeviceRef { account: number(account, "account")?, device: number(device, "device")? };
    skylark_e2ee::check_package(who, &bytes(package, "the key package")?, &bytes(device_key, "the device key")?)
        .map_err(fail)
}

/// The safety number of two accounts from their devices' MLS keys (each a
/// JSON array of base64 keys), as `skylark verify` shows it.
#[wasm_bindgen(js_name = safetyNumber)]
pub fn safety_number(account_a: &str, keys_a: &str, account_b: &str, keys_b: &str) -> Result<String, JsError> {
    let keys = |json: &str| -> Result<Vec<[u8; 32]>, JsError> {
        list(json, "the keys", |k| {
            let k = bytes(k.as_str().unwrap_or_default(), "a key")?;
            k.try_into().map_err(|_| JsError::new("a key is not 32 bytes"))
        })
    };
    let (a, b) = (keys(keys_a)?, keys(keys_b)?);
    Ok(skylark_e2ee::safety_number((number(account_a, "account")?, &a), (number(account_b, "account")?, &b)))
}

/// One device's MLS state.
#[wasm_bindgen]
pub struct Device {
    engine: Engine,
}

#[wasm_bindgen]
impl Device {
    /// A new device with a fresh MLS key, not yet bound to the device key:
    /// sign [`Device::binding_request`] and pass the signature to
    /// [`Device::bind`].
    #[wasm_bindgen(constructor)]
    pub fn new(account: &str, device: &str) -> Result<Device, JsError> {
        let me = DeviceRef { account: number(account, "account")?, device: number(device, "device")? };
        let mut engine = Engine::unbound(me);
        engine.set_clock(page_clock);
        Ok(Device { engine })
    }

    /// The state written by [`Device::save`].
    pub fn restore(state: &[u8]) -> Result<Device, JsError> {
        let mut engine = Engine::import(state).map_err(fail)?;
        engine.set_clock(page_clock);
        Ok(Device { engine })
    }

    /// The whole state (keys included: keep it private).
    pub fn save(&self) -> Vec<u8> {
        self.engine.export()
    }

    /// The state without the journal (the history), which the page keeps
    /// apart ([`Device::journal_changes`] and [`Device::apply_journal`]), as
    /// the base that the next [`Device::state_changes`] follow.
    #[wasm_bindgen(js_name = saveCore)]
    pub fn save_core(&self) -> Vec<u8> {
        self.engine.save_whole()
    }

    /// What changed in the state (the journal aside) since it was last
    /// saved whole or this was last asked, as one record to keep after the
    /// state (empty when nothing did): [`Device::apply_state_changes`].
    #[wasm_bindgen(js_name = stateChanges)]
    pub fn state_changes(&self) -> Vec<u8> {
        self.engine.take_state_changes()
    }

    /// Applies records of [`Device::state_changes`] in order, after
    /// [`Device::restore`] of the state they followed; returns how many
    /// bytes were whole records.
    #[wasm_bindgen(js_name = applyStateChanges)]
    pub fn apply_state_changes(&mut self, records: &[u8]) -> Result<u32, JsError> {
        let whole = self.engine.apply_state_changes(records).map_err(fail)?;
        Ok(u32::try_from(whole).unwrap_or(u32::MAX))
    }

    /// The journal records changed since last asked (to append).
    #[wasm_bindgen(js_name = journalChanges)]
    pub fn journal_changes(&mut self) -> Vec<u8> {
        self.engine.take_journal_changes()
    }

    /// The whole journal as records (to write it afresh).
    #[wasm_bindgen(js_name = journalRecords)]
    pub fn journal_records(&self) -> Vec<u8> {
        self.engine.journal_records()
    }

    /// Whether a text was forgotten since the changes were last taken: the
    /// journal must then be written afresh, so the text leaves it.
    #[wasm_bindgen(js_name = journalForgot)]
    pub fn journal_forgot(&self) -> bool {
        self.engine.journal_forgot()
    }

    /// How many entries the journal remembers.
    #[wasm_bindgen(js_name = journalLength)]
    pub fn journal_length(&self) -> u32 {
        u32::try_from(self.engine.journal_len()).unwrap_or(u32::MAX)
    }

    /// Applies journal records, after [`Device::restore`] of a state saved
    /// without them; returns how many bytes were whole records.
    #[wasm_bindgen(js_name = applyJournal)]
    pub fn apply_journal(&mut self, records: &[u8]) -> Result<u32, JsError> {
        let whole = self.engine.apply_journal(records).map_err(fail)?;
        Ok(u32::try_from(whole).unwrap_or(u32::MAX))
    }

    #[wasm_bindgen(js_name = bindingRequest)]
    pub fn binding_request(&self) -> Vec<u8> {
        self.engine.binding_request()
    }

    pub fn bind(&mut self, signature: Vec<u8>) {
        self.engine.bind(signature);
    }

    #[wasm_bindgen(js_name = isBound)]
    pub fn is_bound(&self) -> bool {
        self.engine.is_bound()
    }

    /// `n` one-time key packages (a JSON array of base64).
    #[wasm_bindgen(js_name = keyPackages)]
    pub fn key_packages(&mut self, n: usize) -> Result<String, JsError> {
        let packages = self.engine.key_packages(n).map_err(fail)?;
        Ok(Value::from(packages.iter().map(|p| BASE64.encode(p)).collect::<Vec<_>>()).to_string())
    }

    /// A last-resort key package (base64).
    #[wasm_bindgen(js_name = lastResortPackage)]
    pub fn last_resort_package(&mut self) -> Result<String, JsError> {
        Ok(BASE64.encode(self.engine.last_resort_package().map_err(fail)?))
    }

    #[wasm_bindgen(js_name = isMember)]
    pub fn is_member(&self, group: &str) -> Result<bool, JsError> {
        Ok(self.engine.is_member(&conversation(group)?))
    }

    /// Starts the group's encryption with this device alone in it.
    pub fn create(&mut self, group: &str) -> Result<(), JsError> {
        self.engine.create(&conversation(group)?).map_err(fail)
    }

    pub fn epoch(&self, group: &str) -> Result<String, JsError> {
        Ok(self.engine.epoch(&conversation(group)?).map_err(fail)?.to_string())
    }

    /// The devices in the group (JSON: `[{account, device, key}]`, the key
    /// the MLS key in base64).
    pub fn members(&self, group: &str) -> Result<String, JsError> {
        let keys = self.engine.member_keys(&conversation(group)?).map_err(fail)?;
        let list: Vec<Value> = keys
            .iter()
            .map(|k| {
                json!({
                    "account": k.member.account.to_string(),
                    "device": k.member.device.to_string(),
                    "key": BASE64.encode(&k.mls_key),
                })
            })
            .collect();
        Ok(Value::from(list).to_string())
    }

    /// A commit adding devices (JSON `[{account, device, keyPackage}]`, each
    /// package checked with [`check_package`] first), or `undefined` when
    /// all are in already. Returns the commit as JSON, `payload` the post.
    pub fn add(&mut self, group: &str, packages: &str) -> Result<Option<String>, JsError> {
        let packages = list(packages, "the key packages", |p| {
            Ok((device_ref(p)?, bytes(field(p, "keyPackage")?, "a key package")?))
        })?;
        let commit = self.engine.add(&conversation(group)?, &packages).map_err(fail)?;
        Ok(commit.as_ref().map(commit_json))
    }

    /// A commit removing every device of the accounts (a JSON array of
    /// ids), or `undefined` when none is in the group.
    #[wasm_bindgen(js_name = removeAccounts)]
    pub fn remove_accounts(&mut self, group: &str, accounts: &str) -> Result<Option<String>, JsError> {
        let accounts = list(accounts, "the accounts", |a| number(a.as_str().unwrap_or_default(), "account"))?;
        let conversation = conversation(group)?;
        let leaving: Vec<DeviceRef> = self
            .engine
            .members(&conversation)
            .map_err(fail)?
            .into_iter()
            .filter(|d| accounts.contains(&d.account))
            .collect();
        let commit = self.engine.remove(&conversation, &leaving).map_err(fail)?;
        Ok(commit.as_ref().map(commit_json))
    }

    /// A commit removing these devices (JSON `[{account, device}]`) from
    /// the group, or `undefined` when none is in it.
    #[wasm_bindgen(js_name = removeDevices)]
    pub fn remove_devices(&mut self, group: &str, devices: &str) -> Result<Option<String>, JsError> {
        let devices = list(devices, "the devices", device_ref)?;
        let commit = self.engine.remove(&conversation(group)?, &devices).map_err(fail)?;
        Ok(commit.as_ref().map(commit_json))
    }

    /// Whether this device should give its leaf fresh keys ([`Device::update`])
    /// before it next posts to the group (see `Engine::wants_update`).
    #[wasm_bindgen(js_name = wantsUpdate)]
    pub fn wants_update(&self, group: &str) -> Result<bool, JsError> {
        Ok(self.engine.wants_update(&conversation(group)?))
    }

    /// A commit giving this device's leaf fresh keys, or `undefined` when
    /// it does not need one ([`Device::wants_update`]).
    pub fn update(&mut self, group: &str) -> Result<Option<String>, JsError> {
        let conversation = conversation(group)?;
        if !self.engine.wants_update(&conversation) {
            return Ok(None);
        }
        let commit = self.engine.update(&conversation).map_err(fail)?;
        Ok(Some(commit_json(&commit)))
    }

    /// The groups (JSON array of ids) where this device's keys are a month
    /// old: [`Device::update`] them whether or not it posts (see
    /// `Engine::stale_conversations`).
    #[wasm_bindgen(js_name = staleGroups)]
    pub fn stale_groups(&self) -> String {
        group_ids(&self.engine.stale_conversations())
    }

    /// The groups this device holds the keys of (a JSON array of ids).
    pub fn groups(&self) -> String {
        group_ids(&self.engine.conversations())
    }

    /// Keeps a commit until it is answered ([`Device::outgoing`] after a
    /// reload).
    pub fn stage(&mut self, group: &str, client_id: &str, commit: &str) -> Result<(), JsError> {
        let commit = commit_from(commit)?;
        self.engine.stage(&conversation(group)?, client_id, &commit);
        Ok(())
    }

    pub fn unstage(&mut self, group: &str) -> Result<(), JsError> {
        self.engine.unstage(&conversation(group)?);
        Ok(())
    }

    /// Commits still to send (JSON `[{group, clientId, commit}]`).
    pub fn outgoing(&self) -> String {
        let list: Vec<Value> = self
            .engine
            .outgoing()
            .iter()
            .filter_map(|o| {
                let group = skylark_e2ee::conversation_group(&o.conversation)?;
                Some(json!({
                    "group": group.to_string(),
                    "clientId": o.client_id,
                    "commit": commit_value(&o.commit),
                }))
            })
            .collect();
        Value::from(list).to_string()
    }

    #[wasm_bindgen(js_name = hasPendingCommit)]
    pub fn has_pending_commit(&self, group: &str) -> Result<bool, JsError> {
        Ok(self.engine.has_pending_commit(&conversation(group)?))
    }

    #[wasm_bindgen(js_name = commitAccepted)]
    pub fn commit_accepted(&mut self, group: &str) -> Result<(), JsError> {
        let conversation = conversation(group)?;
        self.engine.commit_accepted(&conversation).map_err(fail)?;
        self.engine.unstage(&conversation);
        Ok(())
    }

    #[wasm_bindgen(js_name = commitRefused)]
    pub fn commit_refused(&mut self, group: &str) -> Result<(), JsError> {
        self.engine.commit_refused(&conversation(group)?).map_err(fail)
    }

    /// Encrypts a post (`plaintext` as bytes) for every device in the
    /// group; returns the payload (base64). This device shows its own post
    /// by `client_id` when it comes back.
    #[wasm_bindgen(js_name = encryptAs)]
    pub fn encrypt_as(&mut self, group: &str, client_id: &str, plaintext: &[u8]) -> Result<String, JsError> {
        let payload = self.engine.encrypt_as(&conversation(group)?, client_id, plaintext).map_err(fail)?;
        Ok(BASE64.encode(payload))
    }

    /// The group's history for devices of this account just added to it,
    /// as chunks (a JSON array of base64), newest first, each for one post
    /// ([`Device::seal_history`]). Only for a 1:1 conversation: every member
    /// can read such a post.
    /// Each chunk's post fits `max_payload` (the server's limit; its text
    /// is under 1 KiB less).
    #[wasm_bindgen(js_name = historyChunks)]
    pub fn history_chunks(&self, group: &str, max_payload: u32) -> Result<String, JsError> {
        let budget = skylark_e2ee::HISTORY_BYTES.min((max_payload as usize).saturating_sub(1024));
        let chunks = self.engine.history_chunks(&conversation(group)?, budget, skylark_e2ee::HISTORY_CHUNKS);
        Ok(Value::from(chunks.iter().map(|c| BASE64.encode(c)).collect::<Vec<_>>()).to_string())
    }

    /// The blob ids (a JSON array) of the parts of a post naming a commit's
    /// parts ([`out_of_line`]) that this device needs before it can open
    /// it (the commit, or the Welcome for a device being added; none when
    /// nothing of it is for this device); `None` when `payload` (base64)
    /// is not such a post. `from_me`: this device posted it.
    #[wasm_bindgen(js_name = partsNeeded)]
    pub fn parts_needed(&self, payload: &str, from_me: bool) -> Result<Option<String>, JsError> {
        let payload = bytes(payload, "the payload")?;
        let needed = self.engine.parts_needed(&payload, from_me).map_err(fail)?;
        Ok(needed.map(|parts| Value::from(parts.into_iter().map(|p| p.id).collect::<Vec<_>>()).to_string()))
    }

    /// The payload (base64) to open in place of a post naming a commit's
    /// parts, from the parts [`Device::parts_needed`] listed, downloaded
    /// (JSON `{id: base64}`): each checked against the length and digest
    /// the post gives it.
    pub fn inline(&self, payload: &str, from_me: bool, fetched: &str) -> Result<String, JsError> {
        let payload = bytes(payload, "the payload")?;
        let fetched = parse(fetched, "the downloaded parts")?;
        let parts = self.engine.parts_needed(&payload, from_me).map_err(fail)?.unwrap_or_default();
        let mut with_bytes = Vec::with_capacity(parts.len());
        for part in parts {
            let b64 = fetched
                .get(&part.id)
                .and_then(Value::as_str)
                .ok_or_else(|| JsError::new("a part was not downloaded"))?;
            let downloaded = bytes(b64, "a downloaded part")?;
            with_bytes.push((part, downloaded));
        }
        Ok(BASE64.encode(skylark_e2ee::inline(&payload, &with_bytes).map_err(fail)?))
    }

    /// One chunk of [`Device::history_chunks`], encrypted for the devices
    /// (JSON `[{account, device}]`) as a post of the group (base64).
    #[wasm_bindgen(js_name = sealHistory)]
    pub fn seal_history(&mut self, group: &str, devices: &str, chunk: &str) -> Result<String, JsError> {
        let devices = list(devices, "the devices", device_ref)?;
        let chunk = bytes(chunk, "the chunk")?;
        let payload = self.engine.seal_history(&conversation(group)?, &devices, &chunk).map_err(fail)?;
        Ok(BASE64.encode(payload))
    }

    /// Opens a log entry once, in log order (`key` names it; asked again,
    /// the answer comes from memory). `own_client_id`: this device sent
    /// it. JSON: `{kind: "message", plaintext, account, device}`,
    /// `{kind: "devicesChanged"}`, `{kind: "failed", reason}`,
    /// `{kind: "history", entries}` (another device of this account gave
    /// this one the conversation's earlier messages: show them again) or
    /// `{kind: "control"}` (a handshake: nothing to show).
    #[wasm_bindgen(js_name = openOnce)]
    pub fn open_once(&mut self, key: &str, payload: &str, own_client_id: Option<String>) -> Result<String, JsError> {
        let payload = bytes(payload, "the payload")?;
        Ok(opened_json(&self.engine.open_once(key, &payload, own_client_id.as_deref())))
    }

    /// What [`Device::open_once`] made of entry `key`, if it was opened.
    pub fn recall(&self, key: &str) -> Option<String> {
        self.engine.recall(key).as_ref().map(opened_json)
    }

    /// Forgets what entry `key` said (deleted for everyone, or expired).
    pub fn forget(&mut self, key: &str) {
        self.engine.forget(key);
    }
}
