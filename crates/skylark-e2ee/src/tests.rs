//! The engine against a stand-in for the server's delivery service: one
//! ordered log per conversation that accepts a commit, and an application
//! message, only in its current epoch, as the group actor does.

use super::*;

const CONV: &[u8] = b"skylark-test-conversation";

struct Device {
    engine: Engine,
    device_key: SigningKey,
    /// How far into the log this device has read.
    read: usize,
}

fn device(account: u64, device: u64) -> Device {
    let device_key = SigningKey::from_bytes(&[(account * 16 + device) as u8; 32]);
    let engine = Engine::new(DeviceRef { account, device }, |t| device_key.sign(t).to_bytes().to_vec());
    Device { engine, device_key, read: 0 }
}

#[derive(Default)]
struct Log {
    epoch: u64,
    entries: Vec<(DeviceRef, Vec<u8>)>,
    /// Parts of commits posted out of line, by blob id.
    blobs: std::collections::HashMap<String, Vec<u8>>,
    /// Out-of-line parts each device downloaded (device, kind), in order.
    downloaded: Vec<(DeviceRef, PartKind)>,
    /// The next commit goes out of line, for a server taking posts of at
    /// most this many bytes.
    out_of_line: Option<usize>,
}

impl Log {
    /// The delivery service's rule: a commit for an epoch that is not the
    /// current one is refused.
    fn commit(&mut self, from: &mut Device, commit: &Commit) -> bool {
        if commit.epoch != self.epoch {
            from.engine.commit_refused(CONV).unwrap();
            return false;
        }
        self.epoch += 1;
        let payload = if let Some(max) = self.out_of_line.take() {
            // As the clients do when a commit outgrows a post: its parts
            // as blobs, and a post naming them.
            let mut uploaded = Vec::new();
            for (i, (kind, bytes)) in commit.to_upload(max).into_iter().enumerate() {
                let id = format!("blob{}-{i}", self.entries.len());
                self.blobs.insert(id.clone(), bytes.to_vec());
                uploaded.push((kind, id));
            }
            out_of_line(CONV, commit, &uploaded).unwrap()
        } else {
            commit.payload()
        };
        self.entries.push((from.engine.me(), payload));
        // As the clients do: read the log through to the commit, which
        // applies it (what came before it is opened in the old epoch).
        self.catch_up(from);
        assert!(!from.engine.has_pending_commit(CONV));
        true
    }

    /// The delivery service's rule for messages: one made in an epoch that
    /// a commit has ended is refused (its sender catches up and encrypts
    /// it again).
    fn try_post(&mut self, from: &mut Device, text: &str) -> bool {
        let epoch = from.engine.epoch(CONV).unwrap();
        let payload = from.engine.encrypt(CONV, text.as_bytes()).unwrap();
        // A text of a byte or two can turn up in random ciphertext by
        // chance (two bytes: about once in 300 posts of this size), so the
        // tests post texts of three bytes or more, most much longer.
        assert!(text.len() >= 3, "a text too short to look for in the payload");
        assert!(!payload.windows(text.len()).any(|w| w == text.as_bytes()), "plaintext visible in the payload");
        if epoch != self.epoch {
            return false;
        }
        self.entries.push((from.engine.me(), payload));
        true
    }

    fn post(&mut self, from: &mut Device, text: &str) {
        assert!(self.try_post(from, text), "{:?} posted in a stale epoch", from.engine.me());
    }

    /// Everything new for `d`, in order; returns the texts it decrypted.
    fn catch_up(&mut self, d: &mut Device) -> Vec<String> {
        let mut texts = Vec::new();
        while d.read < self.entries.len() {
            let (from, mut payload) = self.entries[d.read].clone();
            d.read += 1;
            // A post naming a commit's parts: the ones this device needs,
            // downloaded.
            if let Some(parts) = d.engine.parts_needed(&payload, from == d.engine.me()).unwrap() {
                let fetched: Vec<(Part, Vec<u8>)> = parts
                    .into_iter()
                    .map(|p| {
                        self.downloaded.push((d.engine.me(), p.kind));
                        let bytes = self.blobs[&p.id].clone();
                        (p, bytes)
                    })
                    .collect();
                payload = inline(&payload, &fetched).unwrap();
            }
            match d.engine.receive(&payload, from == d.engine.me()).unwrap() {
                Incoming::Message { plaintext, from: sender, .. } => {
                    assert_eq!(sender, from, "the sender named inside the message is the one who posted");
                    texts.push(String::from_utf8(plaintext).unwrap());
                }
                Incoming::Joined { .. } | Incoming::Committed { .. } | Incoming::NotForMe => {}
            }
        }
        texts
    }
}

fn packages(devices: &mut [&mut Device]) -> Vec<(DeviceRef, Vec<u8>)> {
    devices.iter_mut().map(|d| (d.engine.me(), d.engine.key_packages(1).unwrap().remove(0))).collect()
}

/// Starts a conversation of `a1` with the others, everyone caught up.
fn start(log: &mut Log, a1: &mut Device, others: &mut [&mut Device]) {
    a1.engine.create(CONV).unwrap();
    let commit = a1.engine.add(CONV, &packages(others)).unwrap().expect("devices to add");
    assert!(log.commit(a1, &commit));
    for d in others.iter_mut() {
        // A device joins from the Welcome; the commit before it is not for it.
        d.read = log.entries.len() - 1;
        log.catch_up(d);
        assert!(d.engine.is_member(CONV));
    }
    a1.read = log.entries.len();
}

#[test]
fn every_device_of_both_accounts_reads_every_message() {
    let (mut a1, mut a2, mut b1, mut b2) = (device(1, 1), device(1, 2), device(2, 1), device(2, 2));
    let mut log = Log::default();
    start(&mut log, &mut a1, &mut [&mut a2, &mut b1, &mut b2]);
    assert_eq!(a1.engine.members(CONV).unwrap().len(), 4);

    log.post(&mut a1, "hello from a1");
    log.post(&mut b2, "hello from b2");
    assert_eq!(log.catch_up(&mut a2), ["hello from a1", "hello from b2"]);
    assert_eq!(log.catch_up(&mut b1), ["hello from a1", "hello from b2"]);
    // A device cannot open its own ciphertext; the others all can.
    assert_eq!(log.catch_up(&mut b2), ["hello from a1"]);
    assert_eq!(log.catch_up(&mut a1), ["hello from b2"]);
}

#[test]
fn a_removed_device_reads_nothing_sent_after() {
    let (mut a1, mut b1, mut b2) = (device(1, 1), device(2, 1), device(2, 2));
    let mut log = Log::default();
    start(&mut log, &mut a1, &mut [&mut b1, &mut b2]);
    log.post(&mut a1, "before");
    let commit = b1.engine.remove(CONV, &[b2.engine.me()]).unwrap().expect("b2 is a member");
    log.catch_up(&mut b1);
    assert!(log.commit(&mut b1, &commit));
    log.catch_up(&mut a1);
    log.post(&mut a1, "after");
    let removal_index = log.entries.len() - 2;

    assert_eq!(log.catch_up(&mut b2), ["before"]);
    assert!(!b2.engine.is_member(CONV), "b2 learned it was removed");
    // Even handed the later ciphertext directly, b2 cannot open it.
    let (_, after) = &log.entries[removal_index + 1];
    assert!(!matches!(b2.engine.receive(after, false), Ok(Incoming::Message { .. })));
    assert_eq!(log.catch_up(&mut b1), ["after"]);
    log.catch_up(&mut a1);
    assert_eq!(a1.engine.members(CONV).unwrap(), [a1.engine.me(), b1.engine.me()]);
}

#[test]
fn two_devices_commit_at_once_one_wins_the_other_retries_and_both_converge() {
    let (mut a1, mut b1, mut c1) = (device(1, 1), device(2, 1), device(3, 1));
    let mut log = Log::default();
    start(&mut log, &mut a1, &mut [&mut b1]);
    // Both change the group from the same epoch.
    let from_a = a1.engine.update(CONV).unwrap();
    let from_b = b1.engine.add(CONV, &packages(&mut [&mut c1])).unwrap().unwrap();
    assert!(log.commit(&mut a1, &from_a));
    assert!(!log.commit(&mut b1, &from_b), "the second commit for the same epoch is refused");
    // b1 merges what came first and makes its change again.
    log.catch_up(&mut b1);
    let retry = b1.engine.add(CONV, &packages(&mut [&mut c1])).unwrap().unwrap();
    assert!(log.commit(&mut b1, &retry));
    c1.read = log.entries.len() - 1;
    log.catch_up(&mut c1);
    log.catch_up(&mut a1);
    assert_eq!(a1.engine.epoch(CONV).unwrap(), b1.engine.epoch(CONV).unwrap());
    assert_eq!(c1.engine.epoch(CONV).unwrap(), a1.engine.epoch(CONV).unwrap());
    log.post(&mut c1, "all three");
    assert_eq!(log.catch_up(&mut a1), ["all three"]);
    assert_eq!(log.catch_up(&mut b1), ["all three"]);
}

#[test]
fn a_committer_opens_what_came_before_its_commit_and_no_device_keeps_past_epochs() {
    let (mut a1, mut b1, mut c1) = (device(1, 1), device(2, 1), device(3, 1));
    let mut log = Log::default();
    start(&mut log, &mut a1, &mut [&mut b1, &mut c1]);
    // b1 posts; a1 commits before it has read the post, and the server
    // orders the post first.
    log.post(&mut b1, "before the commit");
    let commit = a1.engine.update(CONV).unwrap();
    assert_eq!(commit.epoch, log.epoch);
    log.epoch += 1;
    log.entries.push((a1.engine.me(), commit.payload()));
    // Reading the log applies the commit after opening the post.
    assert_eq!(log.catch_up(&mut a1), ["before the commit"]);
    assert_eq!(a1.engine.epoch(CONV).unwrap(), log.epoch);
    // c1 has not read the commit: its message is refused, and made again
    // once it has.
    assert!(!log.try_post(&mut c1, "after the commit"));
    assert_eq!(log.catch_up(&mut c1), ["before the commit"]);
    log.post(&mut c1, "after the commit");
    assert_eq!(log.catch_up(&mut a1), ["after the commit"]);
    assert_eq!(log.catch_up(&mut b1), ["after the commit"], "b1 cannot open its own post");
    // Why the rule: a message of an ended epoch would not open, since no
    // device keeps past epochs' keys.
    let stale = b1.engine.encrypt(CONV, b"made before the commit").unwrap();
    let change = a1.engine.update(CONV).unwrap();
    assert!(log.commit(&mut a1, &change));
    log.catch_up(&mut c1);
    let err = c1.engine.receive(&stale, false).unwrap_err();
    assert!(matches!(err, E2eeError::EarlierKeys), "a past epoch's message: {err}");
    assert!(err.to_string().contains("before this device joined"), "said in words: {err}");
    // And one from an epoch this device has not reached is said as such.
    let later = a1.engine.encrypt(CONV, b"made after a change b1 has not read").unwrap();
    assert!(matches!(b1.engine.receive(&later, false), Err(E2eeError::LaterKeys)));
    // Opened once, the reason is kept in the journal, in words.
    let Opened::Failed(why) = c1.engine.open_once("post:1:stale", &stale, None) else { panic!("opened") };
    assert!(why.contains("keys from before this device joined"), "{why}");
}

#[test]
fn a_journal_kept_apart_is_appended_to_and_read_back_with_the_state() {
    let (mut a1, mut b1) = (device(1, 1), device(2, 1));
    let mut log = Log::default();
    start(&mut log, &mut a1, &mut [&mut b1]);
    let mut file = b1.engine.journal_records();
    b1.engine.take_journal_changes();
    let mut opened = Vec::new();
    for i in 0..5 {
        let text = format!("kept {i}");
        log.post(&mut a1, &text);
        let (_, payload) = log.entries.last().unwrap().clone();
        let key = format!("post:1:{i}");
        assert!(matches!(b1.engine.open_once(&key, &payload, None), Opened::Message { .. }));
        opened.push(key);
        // Each change is appended as it comes: only what changed.
        let changes = b1.engine.take_journal_changes();
        assert!(changes.len() < 200, "{} bytes for one entry", changes.len());
        file.extend_from_slice(&changes);
    }
    b1.read = log.entries.len();
    assert!(!b1.engine.journal_forgot());
    b1.engine.forget(&opened[1]);
    assert!(b1.engine.journal_forgot(), "a file holding the text must be written afresh");
    file.extend_from_slice(&b1.engine.take_journal_changes());
    assert!(!b1.engine.journal_forgot());
    assert!(b1.engine.take_journal_changes().is_empty(), "taken once");

    // The state without its journal, and the journal: together, the same.
    let state = b1.engine.export_without_journal();
    assert!(!state.windows(6).any(|w| w == b"kept 0"), "no history in the state");
    let mut back = Engine::import(&state).unwrap();
    assert_eq!(back.journal_len(), 0);
    assert_eq!(back.apply_journal(&file).unwrap(), file.len());
    for key in &opened {
        assert_eq!(back.recall(key), b1.engine.recall(key), "{key}");
    }
    assert_eq!(back.recall(&opened[1]), Some(Opened::Control), "forgotten stays forgotten");
    assert!(back.take_journal_changes().is_empty(), "reading back changes nothing");
    // A record cut short by a crash is ignored; what came before stands.
    let mut cut = Engine::import(&state).unwrap();
    let whole = cut.apply_journal(&file[..file.len() - 3]).unwrap();
    assert!(whole < file.len());
    assert_eq!(cut.recall(&opened[0]), b1.engine.recall(&opened[0]));
    // And the conversation goes on from the read-back state.
    b1.engine = back;
    log.post(&mut a1, "after");
    assert_eq!(log.catch_up(&mut b1), ["after"]);
}

/// The state written whole once, then only what each operation changed:
/// read back, the same state; the conversation goes on from it.
#[test]
fn state_changes_appended_after_a_whole_state_read_back_the_same() {
    let mut devices: Vec<Device> = (1..=20).map(|i| device(i, 1)).collect();
    let (first, rest) = devices.split_at_mut(1);
    let mut log = Log::default();
    start(&mut log, &mut first[0], &mut rest.iter_mut().collect::<Vec<_>>());
    let [a1, b1, ..] = devices.as_mut_slice() else { unreachable!("20 devices") };
    let base = b1.engine.save_whole();
    assert!(b1.engine.take_state_changes().is_empty(), "nothing changed since the save");
    let mut file = Vec::new();
    for i in 0..3 {
        log.post(a1, &format!("message {i} from a1"));
        log.catch_up(b1);
        log.post(b1, &format!("reply {i} from b1"));
        let changes = b1.engine.take_state_changes();
        assert!(!changes.is_empty());
        // A message changes its group's ratchets, not the group's tree.
        assert!(changes.len() * 4 < base.len(), "{} bytes of changes, {} of state", changes.len(), base.len());
        file.extend_from_slice(&changes);
    }
    assert!(b1.engine.take_state_changes().is_empty(), "taken once");
    // A member removed: the commit is a change like any other.
    let gone = DeviceRef { account: 20, device: 1 };
    let commit = a1.engine.remove(CONV, &[gone]).unwrap().unwrap();
    assert!(log.commit(a1, &commit));
    log.catch_up(b1);
    file.extend_from_slice(&b1.engine.take_state_changes());

    let mut back = Engine::import(&base).unwrap();
    assert_eq!(back.apply_state_changes(&file).unwrap(), file.len());
    assert_eq!(back.members(CONV).unwrap(), b1.engine.members(CONV).unwrap());
    assert_eq!(back.export_without_journal(), b1.engine.export_without_journal(), "the same state");
    // A record cut short by a crash is ignored: the state before it stands.
    let mut cut = Engine::import(&base).unwrap();
    let whole = cut.apply_state_changes(&file[..file.len() - 3]).unwrap();
    assert!(whole < file.len());
    assert!(cut.members(CONV).unwrap().contains(&gone), "the removal was the record cut");
    // Changes taken before a later whole state are passed over.
    let again = b1.engine.save_whole();
    let mut later = Engine::import(&again).unwrap();
    assert_eq!(later.apply_state_changes(&file).unwrap(), file.len());
    assert_eq!(later.export_without_journal(), b1.engine.export_without_journal());
    // The conversation goes on from the state read back.
    b1.engine = back;
    log.post(a1, "after");
    assert_eq!(log.catch_up(b1), ["after"]);
    log.post(b1, "from the copy");
    assert_eq!(log.catch_up(a1), ["from the copy"]);
}

#[test]
fn state_survives_export_and_import() {
    let (mut a1, mut b1) = (device(1, 1), device(2, 1));
    let mut log = Log::default();
    start(&mut log, &mut a1, &mut [&mut b1]);
    log.post(&mut a1, "one");
    assert_eq!(log.catch_up(&mut b1), ["one"]);
    let saved = b1.engine.export();
    b1.engine = Engine::import(&saved).unwrap();
    log.post(&mut a1, "two");
    assert_eq!(log.catch_up(&mut b1), ["two"]);
    log.post(&mut b1, "three");
    assert_eq!(log.catch_up(&mut a1), ["three"]);
    assert!(Engine::import(&saved[..saved.len() / 2]).is_err(), "a truncated state is an error");
    assert!(Engine::import(b"something else").is_err());
}

/// What a device's engine says of the conversation, and what a copy of it
/// read back from its exported state says: the same, if every group it
/// keeps in memory matches its storage.
fn assert_matches_its_storage(d: &Device) {
    let copy = Engine::import(&d.engine.export()).unwrap();
    let me = d.engine.me();
    assert_eq!(copy.epoch(CONV).ok(), d.engine.epoch(CONV).ok(), "epoch of {me:?}");
    assert_eq!(copy.members(CONV).ok(), d.engine.members(CONV).ok(), "members seen by {me:?}");
    assert_eq!(copy.has_pending_commit(CONV), d.engine.has_pending_commit(CONV), "pending commit of {me:?}");
    assert_eq!(copy.is_member(CONV), d.engine.is_member(CONV), "membership of {me:?}");
}

#[test]
fn groups_kept_in_memory_match_their_storage_through_every_kind_of_change() {
    let (mut a1, mut b1, mut b2, mut c1) = (device(1, 1), device(2, 1), device(2, 2), device(3, 1));
    let mut log = Log::default();
    start(&mut log, &mut a1, &mut [&mut b1]);
    let check = |ds: &[&Device]| ds.iter().for_each(|d| assert_matches_its_storage(d));
    check(&[&a1, &b1]);

    // A change waiting for the server's answer, then refused (a race).
    let from_a = a1.engine.add(CONV, &packages(&mut [&mut b2])).unwrap().unwrap();
    let from_b = b1.engine.update(CONV).unwrap();
    check(&[&a1, &b1]);
    assert!(log.commit(&mut b1, &from_b));
    assert!(!log.commit(&mut a1, &from_a));
    check(&[&a1, &b1]);
    log.catch_up(&mut a1);
    let retry = a1.engine.add(CONV, &packages(&mut [&mut b2, &mut c1])).unwrap().unwrap();
    assert!(log.commit(&mut a1, &retry));
    for d in [&mut b2, &mut c1] {
        d.read = log.entries.len() - 1;
    }
    log.catch_up(&mut b1);
    log.catch_up(&mut b2);
    log.catch_up(&mut c1);
    check(&[&a1, &b1, &b2, &c1]);

    // Messages (each moves a ratchet), then a removal.
    log.post(&mut a1, "one");
    log.post(&mut c1, "two");
    for d in [&mut a1, &mut b1, &mut b2, &mut c1] {
        log.catch_up(d);
    }
    check(&[&a1, &b1, &b2, &c1]);
    let removal = b1.engine.remove(CONV, &[b2.engine.me()]).unwrap().unwrap();
    assert!(log.commit(&mut b1, &removal));
    for d in [&mut a1, &mut b1, &mut b2, &mut c1] {
        log.catch_up(d);
    }
    check(&[&a1, &b1, &b2, &c1]);
    assert!(!b2.engine.is_member(CONV));

    // Each device goes on from its read-back copy: the copies are whole.
    for d in [&mut a1, &mut b1, &mut c1] {
        d.engine = Engine::import(&d.engine.export()).unwrap();
    }
    log.post(&mut b1, "three");
    assert_eq!(log.catch_up(&mut a1), ["three"]);
    assert_eq!(log.catch_up(&mut c1), ["three"]);
}

#[test]
fn a_group_is_read_from_storage_once_not_once_a_message() {
    let (mut a1, mut b1) = (device(1, 1), device(2, 1));
    let mut log = Log::default();
    start(&mut log, &mut a1, &mut [&mut b1]);
    let before = (a1.engine.loads.get(), b1.engine.loads.get());
    for i in 0..20 {
        log.post(&mut a1, &format!("message {i}"));
        assert_eq!(log.catch_up(&mut b1), [format!("message {i}")]);
        assert!(b1.engine.members(CONV).unwrap().len() == 2 && a1.engine.is_member(CONV));
    }
    assert_eq!((a1.engine.loads.get(), b1.engine.loads.get()), before);
    // A restarted device reads it once.
    b1.engine = Engine::import(&b1.engine.export()).unwrap();
    log.post(&mut a1, "after the restart");
    log.post(&mut a1, "and another");
    assert_eq!(log.catch_up(&mut b1), ["after the restart", "and another"]);
    assert_eq!(b1.engine.loads.get(), 1);
}

/// The size of a commit `by` would make removing `whom`, not sent.
fn removal_bytes(by: &mut Device, whom: DeviceRef) -> usize {
    let commit = by.engine.remove(CONV, &[whom]).unwrap().expect("a member to remove");
    by.engine.commit_refused(CONV).unwrap();
    commit.payload().len()
}

#[test]
fn members_refreshing_their_keys_once_fill_the_tree_and_shrink_every_later_commit() {
    // 32 devices, the other 31 added in one commit: the tree's nodes above
    // them are blank, so a commit encrypts to each of their leaves.
    let mut a1 = device(1, 1);
    let mut others: Vec<Device> = (1..32).map(|d| device(2, d)).collect();
    let mut log = Log::default();
    a1.engine.create(b"alone").unwrap();
    assert!(!a1.engine.wants_update(b"alone"), "alone in a group, there is no one to refresh keys for");
    start(&mut log, &mut a1, &mut others.iter_mut().collect::<Vec<_>>());
    assert!(!a1.engine.wants_update(CONV), "the creator's commit gave it fresh keys");
    let last = others[30].engine.me();
    let blank = removal_bytes(&mut a1, last);
    let keys =
        |d: &Device| -> Vec<Vec<u8>> { d.engine.member_keys(CONV).unwrap().into_iter().map(|k| k.mls_key).collect() };
    let identities = keys(&a1);

    let mut first_update = 0;
    for (i, d) in others.iter_mut().enumerate() {
        log.catch_up(d);
        assert!(d.engine.wants_update(CONV), "a device that joined from a key package refreshes");
        let commit = d.engine.update(CONV).unwrap();
        if i == 0 {
            first_update = commit.payload().len();
        }
        assert!(log.commit(d, &commit));
        assert!(!d.engine.wants_update(CONV), "once is enough");
    }
    log.catch_up(&mut a1);
    // Fresh encryption keys, the same identities: safety numbers stay.
    assert_eq!(keys(&a1), identities);
    let filled = removal_bytes(&mut a1, last);
    // About 31 encrypted path secrets before, about 6 after (log2 32, plus
    // the blanks the removal itself leaves).
    assert!(filled * 2 < blank, "a removal was {blank} bytes in a blank tree and {filled} in a filled one");
    let last_update = log.entries.last().unwrap().1.len();
    assert!(last_update * 2 < first_update, "updates went from {first_update} to {last_update} bytes");

    // The group still works, with the refreshed keys.
    log.post(&mut a1, "after every refresh");
    for d in &mut others {
        assert_eq!(log.catch_up(d), ["after every refresh"]);
    }
    // A device added later refreshes too.
    let mut late = device(3, 1);
    let commit = a1.engine.add(CONV, &packages(&mut [&mut late])).unwrap().unwrap();
    assert!(log.commit(&mut a1, &commit));
    late.read = log.entries.len() - 1;
    log.catch_up(&mut late);
    assert!(late.engine.wants_update(CONV));
}

thread_local! {
    /// The time [`test_clock`] reads, per test (each runs on its thread).
    static NOW: std::cell::Cell<u64> = const { std::cell::Cell::new(1_800_000_000) };
}

fn test_clock() -> u64 {
    NOW.with(std::cell::Cell::get)
}

fn wait(secs: u64) {
    NOW.with(|now| now.set(now.get() + secs));
}

#[test]
fn a_device_refreshes_its_keys_again_a_week_after_its_last_commit() {
    let (mut a1, mut b1) = (device(1, 1), device(2, 1));
    a1.engine.set_clock(test_clock);
    b1.engine.set_clock(test_clock);
    let mut log = Log::default();
    start(&mut log, &mut a1, &mut [&mut b1]);
    assert!(b1.engine.wants_update(CONV), "joined from a key package");
    let commit = b1.engine.update(CONV).unwrap();
    assert!(log.commit(&mut b1, &commit));
    log.catch_up(&mut a1);
    assert!(!a1.engine.wants_update(CONV) && !b1.engine.wants_update(CONV));

    wait(KEYS_REFRESH_AFTER_SECS - 1);
    assert!(!a1.engine.wants_update(CONV) && !b1.engine.wants_update(CONV), "not yet a week");
    assert!(a1.engine.stale_conversations().is_empty() && b1.engine.stale_conversations().is_empty());
    wait(1);
    assert!(a1.engine.wants_update(CONV), "the creator's last commit is a week old");
    assert!(b1.engine.wants_update(CONV), "so is the member's");
    // A commit accepted by the server (the CLI's path) counts as one read
    // back from the log (the test log's path).
    let commit = a1.engine.update(CONV).unwrap();
    log.entries.push((a1.engine.me(), commit.payload()));
    log.epoch += 1;
    a1.engine.commit_accepted(CONV).unwrap();
    a1.read = log.entries.len();
    assert!(!a1.engine.wants_update(CONV), "refreshed just now");
    log.catch_up(&mut b1);
    assert!(b1.engine.wants_update(CONV), "another's commit does not renew this device's keys");
    let commit = b1.engine.update(CONV).unwrap();
    assert!(log.commit(&mut b1, &commit));
    log.catch_up(&mut a1);
    assert!(!b1.engine.wants_update(CONV));

    // The time is kept in the state, whole and as changes.
    let base = b1.engine.save_whole();
    wait(KEYS_REFRESH_AFTER_SECS);
    let commit = b1.engine.update(CONV).unwrap();
    assert!(log.commit(&mut b1, &commit));
    let changes = b1.engine.take_state_changes();
    let mut restored = Engine::import(&base).unwrap();
    restored.set_clock(test_clock);
    assert!(restored.wants_update(CONV), "a week after the refresh in the whole save");
    restored.apply_state_changes(&changes).unwrap();
    assert!(!restored.wants_update(CONV), "the refresh in the changes");
    let mut exported = Engine::import(&b1.engine.export()).unwrap();
    exported.set_clock(test_clock);
    assert!(!exported.wants_update(CONV));
    // A state saved before the time was kept (format 2, which ends before
    // it) refreshes at its next post.
    let mut old = b1.engine.export();
    let mut times = Vec::new();
    put_refreshed(&mut times, &b1.engine.refreshed);
    old.truncate(old.len() - times.len());
    old[STATE_MAGIC.len()] = 2;
    let mut old = Engine::import(&old).unwrap();
    old.set_clock(test_clock);
    assert!(old.wants_update(CONV), "no time kept");
    wait(KEYS_REFRESH_IDLE_AFTER_SECS);
    assert!(old.stale_conversations().is_empty(), "a reader with no time kept waits for its next post");
    // A device that only reads refreshes a month after it joined; one that
    // commits, a month after its last commit.
    let mut reader = device(4, 1);
    reader.engine.set_clock(test_clock);
    log.catch_up(&mut a1);
    let commit = a1.engine.add(CONV, &packages(&mut [&mut reader])).unwrap().unwrap();
    assert!(log.commit(&mut a1, &commit));
    reader.read = log.entries.len() - 1;
    log.catch_up(&mut reader);
    log.catch_up(&mut b1);
    wait(KEYS_REFRESH_IDLE_AFTER_SECS - 1);
    assert_eq!(reader.engine.stale_conversations(), Vec::<Vec<u8>>::new());
    assert_eq!(a1.engine.stale_conversations(), Vec::<Vec<u8>>::new(), "its add was a commit");
    assert_eq!(b1.engine.stale_conversations(), [CONV], "a month and a week since its last commit");
    wait(1);
    assert_eq!(reader.engine.stale_conversations(), [CONV]);
    let commit = reader.engine.update(CONV).unwrap();
    assert!(log.commit(&mut reader, &commit));
    assert!(reader.engine.stale_conversations().is_empty() && !reader.engine.wants_update(CONV));

    // A device's own clock is the system's unless set.
    let mut fresh = device(3, 1);
    fresh.engine.create(b"mine").unwrap();
    let at = fresh.engine.refreshed[b"mine".as_slice()];
    assert!(at.abs_diff(system_clock()) < 60 && at > 1_700_000_000, "{at}");
}

#[test]
fn a_device_killed_between_commit_and_answer_applies_its_commit_from_the_log() {
    let (mut a1, mut b1, mut b2) = (device(1, 1), device(2, 1), device(2, 2));
    let mut log = Log::default();
    start(&mut log, &mut a1, &mut [&mut b1]);
    let commit = a1.engine.add(CONV, &packages(&mut [&mut b2])).unwrap().unwrap();
    // The state on disk holds the pending commit; the process dies before
    // the server's answer arrives, but the server took the commit.
    let saved = a1.engine.export();
    log.epoch += 1;
    log.entries.push((a1.engine.me(), commit.payload()));
    a1.engine = Engine::import(&saved).unwrap();
    assert!(a1.engine.has_pending_commit(CONV));
    log.catch_up(&mut a1);
    assert!(!a1.engine.has_pending_commit(CONV), "its own commit in the log applied it");
    assert_eq!(a1.engine.epoch(CONV).unwrap(), log.epoch);
    log.catch_up(&mut b1);
    log.post(&mut a1, "still in sync");
    assert_eq!(log.catch_up(&mut b1), ["still in sync"]);
}

#[test]
fn a_key_package_listed_for_another_device_is_refused() {
    let (mut a1, mut b1, mut c1) = (device(1, 1), device(2, 1), device(3, 1));
    a1.engine.create(CONV).unwrap();
    let c_package = c1.engine.key_packages(1).unwrap().remove(0);
    let err = a1.engine.add(CONV, &[(b1.engine.me(), c_package)]).unwrap_err();
    assert!(matches!(err, E2eeError::WrongDevice { .. }), "{err}");
    let err = a1.engine.add(CONV, &[(b1.engine.me(), b"junk".to_vec())]).unwrap_err();
    assert!(matches!(err, E2eeError::BadKeyPackage(_)), "{err}");
    let _ = b1.engine.last_resort_package().unwrap();
}

#[test]
fn each_member_key_is_bound_to_its_device_key() {
    let (mut a1, mut b1) = (device(1, 1), device(2, 1));
    let mut log = Log::default();
    start(&mut log, &mut a1, &mut [&mut b1]);
    let keys = a1.engine.member_keys(CONV).unwrap();
    let b = keys.iter().find(|k| k.member == b1.engine.me()).unwrap();
    let b_device_key = b1.device_key.verifying_key().to_bytes();
    assert!(verify_binding(b.member, &b.mls_key, &b.binding, &b_device_key));
    let a_device_key = a1.device_key.verifying_key().to_bytes();
    assert!(!verify_binding(b.member, &b.mls_key, &b.binding, &a_device_key), "another device's key does not verify");
    assert!(!verify_binding(a1.engine.me(), &b.mls_key, &b.binding, &b_device_key), "nor another identity");
}

#[test]
fn safety_numbers_agree_on_both_sides_and_change_with_a_key() {
    let (k1, k2, k3) = ([1u8; 32], [2u8; 32], [3u8; 32]);
    let alice = safety_number((10, &[k1, k2]), (20, &[k3]));
    let bob = safety_number((20, &[k3]), (10, &[k2, k1]));
    assert_eq!(alice, bob);
    assert_eq!(alice.replace(' ', "").len(), 60);
    assert!(alice.replace(' ', "").chars().all(|c| c.is_ascii_digit()));
    assert_ne!(alice, safety_number((10, &[k1]), (20, &[k3])), "a device removed changes the number");
    assert_ne!(alice, safety_number((10, &[k1, k2]), (20, &[[4u8; 32]])), "a new key changes it");
}

#[test]
fn plain_payloads_are_told_apart() {
    let mut a1 = device(1, 1);
    assert!(!is_encrypted(b"hello"));
    assert!(matches!(a1.engine.receive(b"hello", false), Err(E2eeError::NotEncrypted)));
    let mut junk = MAGIC.to_vec();
    junk.extend_from_slice(b"garbage");
    assert!(matches!(a1.engine.receive(&junk, false), Err(E2eeError::Malformed(_))));
}

#[test]
fn an_entry_read_again_is_answered_from_the_journal_even_after_a_restart() {
    let (mut a1, mut b1) = (device(1, 1), device(2, 1));
    let mut log = Log::default();
    start(&mut log, &mut a1, &mut [&mut b1]);
    let payload = a1.engine.encrypt_as(CONV, "cid-1", b"remember me").unwrap();
    let first = b1.engine.open_once("seq-9", &payload, None);
    assert!(matches!(&first, Opened::Message { plaintext, .. } if plaintext == b"remember me"));
    // MLS keys are single use: opening the same ciphertext afresh fails...
    assert!(b1.engine.receive(&payload, false).is_err());
    // ...but the journal answers, also after the state went to disk and back.
    b1.engine = Engine::import(&b1.engine.export()).unwrap();
    assert_eq!(b1.engine.open_once("seq-9", &payload, None), first);
    // The sender shows its own message from what it remembered when sending.
    let mine = a1.engine.open_once("seq-4", &payload, Some("cid-1"));
    assert!(
        matches!(mine, Opened::Message { from, plaintext, .. } if from == a1.engine.me() && plaintext == b"remember me")
    );
}

#[test]
fn a_staged_commit_survives_a_restart_until_unstaged() {
    let (mut a1, mut b1) = (device(1, 1), device(2, 1));
    a1.engine.create(CONV).unwrap();
    let commit = a1.engine.add(CONV, &packages(&mut [&mut b1])).unwrap().unwrap();
    a1.engine.stage(CONV, "commit-1", &commit);
    let mut back = Engine::import(&a1.engine.export()).unwrap();
    assert_eq!(back.outgoing().len(), 1);
    assert_eq!(back.outgoing()[0].client_id, "commit-1");
    assert_eq!(back.outgoing()[0].commit, commit);
    assert!(back.has_pending_commit(CONV));
    back.commit_accepted(CONV).unwrap();
    assert_eq!(back.outgoing().len(), 1, "the Welcome is still to send");
    back.unstage(CONV);
    assert!(back.outgoing().is_empty());
    // A refused commit is dropped with its staging.
    let mut c1 = device(3, 1);
    let again = back.add(CONV, &packages(&mut [&mut c1])).unwrap().unwrap();
    back.stage(CONV, "commit-2", &again);
    back.commit_refused(CONV).unwrap();
    assert!(back.outgoing().is_empty() && !back.has_pending_commit(CONV));
}

/// The web client tells encrypted messages from handshakes by these bytes
/// (app.js, `mlsKind`), without decrypting: keep them where it looks.
#[test]
fn the_wire_layout_the_web_client_reads() {
    fn kind(payload: &[u8]) -> &'static str {
        let at = MAGIC.len();
        assert_eq!(&payload[at..at + 2], &[0, 1], "MLS 1.0");
        if u16::from_be_bytes([payload[at + 2], payload[at + 3]]) != 2 {
            return "handshake";
        }
        let mut at = at + 4;
        let length_bytes = 1usize << (payload[at] >> 6);
        let mut group_id_length = usize::from(payload[at] & 0x3f);
        for i in 1..length_bytes {
            group_id_length = group_id_length * 256 + usize::from(payload[at + i]);
        }
        at += length_bytes + group_id_length + 8;
        if payload[at] == 1 { "application" } else { "handshake" }
    }
    let (mut a1, mut b1) = (device(1, 1), device(2, 1));
    a1.engine.create(CONV).unwrap();
    let commit = a1.engine.add(CONV, &packages(&mut [&mut b1])).unwrap().unwrap();
    assert_eq!(kind(&commit.commit), "handshake");
    assert_eq!(kind(commit.welcome.as_ref().unwrap()), "handshake");
    // A bundle: the first six bytes of MAGIC, then 'B' (app.js looks there).
    let bundle = commit.payload();
    assert!(bundle.starts_with(&MAGIC[..6]) && bundle[6] == b'B', "a commit with a Welcome is posted as a bundle");
    a1.engine.commit_accepted(CONV).unwrap();
    assert_eq!(kind(&a1.engine.encrypt(CONV, b"hi").unwrap()), "application");
}

#[test]
fn a_device_that_lost_the_race_to_start_a_conversation_joins_the_winners() {
    let (mut a1, mut b1) = (device(1, 1), device(2, 1));
    // Both start the conversation and add the other, from epoch 0.
    a1.engine.create(CONV).unwrap();
    b1.engine.create(CONV).unwrap();
    let from_a = a1.engine.add(CONV, &packages(&mut [&mut b1])).unwrap().unwrap();
    let from_b = b1.engine.add(CONV, &packages(&mut [&mut a1])).unwrap().unwrap();
    let mut log = Log::default();
    assert!(log.commit(&mut a1, &from_a));
    assert!(!log.commit(&mut b1, &from_b));
    // b1 reads a1's commit (which its own group cannot take) and Welcome.
    log.catch_up(&mut b1);
    assert!(b1.engine.is_member(CONV));
    assert_eq!(b1.engine.epoch(CONV).unwrap(), 1);
    log.post(&mut b1, "joined the winner's");
    assert_eq!(log.catch_up(&mut a1), ["joined the winner's"]);
}

#[test]
fn a_device_knows_its_conversations_across_a_restart() {
    let (mut a1, mut b1) = (device(1, 1), device(2, 1));
    let mut log = Log::default();
    start(&mut log, &mut a1, &mut [&mut b1]);
    assert_eq!(a1.engine.conversations(), [CONV.to_vec()]);
    assert_eq!(Engine::import(&b1.engine.export()).unwrap().conversations(), [CONV.to_vec()]);
    // Removed from it, it is no longer one of its conversations.
    let commit = a1.engine.remove(CONV, &[b1.engine.me()]).unwrap().unwrap();
    assert!(log.commit(&mut a1, &commit));
    log.catch_up(&mut b1);
    assert!(b1.engine.conversations().is_empty());
}

#[test]
fn a_claimed_package_must_be_bound_to_the_device_key_the_server_lists() {
    let (mut b1, c1) = (device(2, 1), device(3, 1));
    let package = b1.engine.key_packages(1).unwrap().remove(0);
    let b_key = b1.device_key.verifying_key().to_bytes();
    assert!(check_package(b1.engine.me(), &package, &b_key).is_ok());
    let c_key = c1.device_key.verifying_key().to_bytes();
    assert!(matches!(check_package(b1.engine.me(), &package, &c_key), Err(E2eeError::Unbound(_))));
    assert!(matches!(check_package(c1.engine.me(), &package, &b_key), Err(E2eeError::WrongDevice { .. })));
    assert!(matches!(check_package(b1.engine.me(), b"junk", &b_key), Err(E2eeError::BadKeyPackage(_))));
}

#[test]
fn a_linked_device_gets_its_accounts_history_of_a_conversation_and_nothing_else() {
    let conversation = group_conversation(7);
    let g = conversation.as_slice();
    let (mut a1, mut a2, mut b1) = (device(1, 1), device(1, 2), device(2, 1));
    // Every device applies an entry in the log's order, as the clients do.
    let apply = |d: &mut Device, payload: &[u8], mine: bool| {
        d.engine.receive(payload, mine).unwrap();
    };
    a1.engine.create(g).unwrap();
    let start = a1.engine.add(g, &packages(&mut [&mut b1])).unwrap().unwrap();
    apply(&mut a1, &start.payload(), true);
    apply(&mut b1, &start.payload(), false);

    let one = b1.engine.encrypt_as(g, "b-1", b"one, from b").unwrap();
    let two = a1.engine.encrypt_as(g, "a-1", b"two, from a").unwrap();
    assert!(matches!(a1.engine.open_once("post:7:2", &one, None), Opened::Message { .. }));
    assert!(matches!(a1.engine.open_once("post:7:3", &two, Some("a-1")), Opened::Message { .. }));
    assert!(matches!(b1.engine.open_once("post:7:3", &two, None), Opened::Message { .. }));

    // a2 is linked: a1 adds it to the conversation.
    let link = a1.engine.add(g, &packages(&mut [&mut a2])).unwrap().unwrap();
    apply(&mut a1, &link.payload(), true);
    apply(&mut b1, &link.payload(), false);
    assert!(matches!(a2.engine.receive(&link.payload(), false).unwrap(), Incoming::Joined { .. }));
    let before = a2.engine.open_once("post:7:2", &one, None);
    assert!(matches!(before, Opened::Failed(_)), "a device added later cannot read what came before: {before:?}");

    // History from the other account's device is not taken.
    let history = |d: &mut Device, to: DeviceRef| {
        let chunks = d.engine.history_chunks(g, HISTORY_BYTES, HISTORY_CHUNKS);
        assert_eq!(chunks.len(), 1);
        d.engine.seal_history(g, &[to], &chunks[0]).unwrap()
    };
    let theirs = history(&mut b1, a2.engine.me());
    assert_eq!(
        a2.engine.open_once("post:7:5", &theirs, None),
        Opened::History { conversation: g.to_vec(), entries: 0 }
    );
    assert_eq!(a2.engine.recall("post:7:3"), None);

    // History from its own account's device is: both messages, keyed as
    // every device keys them, with who sent each.
    let ours = history(&mut a1, a2.engine.me());
    assert!(!ours.windows(3).any(|w| w == b"one"), "history travels encrypted");
    assert_eq!(a2.engine.open_once("post:7:6", &ours, None), Opened::History { conversation: g.to_vec(), entries: 2 });
    let text = |d: &Device, key: &str| match d.engine.recall(key) {
        Some(Opened::Message { from, plaintext, .. }) => Some((from, String::from_utf8(plaintext).unwrap())),
        _ => None,
    };
    assert_eq!(text(&a2, "post:7:2"), Some((b1.engine.me(), "one, from b".into())));
    assert_eq!(text(&a2, "post:7:3"), Some((a1.engine.me(), "two, from a".into())));
    // A member it does not name takes nothing from it.
    assert_eq!(b1.engine.open_once("post:7:6", &ours, None), Opened::History { conversation: g.to_vec(), entries: 0 });
    assert_eq!(text(&b1, "post:7:2"), None);

    // Only entries of this conversation, and never over what a device has.
    let mut forged = HISTORY_MAGIC.to_vec();
    put(&mut forged, &1u64.to_be_bytes());
    put(&mut forged, &1u64.to_be_bytes());
    put(&mut forged, &2u64.to_be_bytes());
    let entry = |c: &[u8], text: &[u8]| Opened::Message {
        conversation: c.to_vec(),
        from: b1.engine.me(),
        plaintext: text.to_vec(),
    };
    for (key, opened) in [
        ("post:8:1", entry(&group_conversation(8), b"another conversation's")),
        ("post:7:2", entry(g, b"a changed text")),
        ("post:7:4", entry(&group_conversation(8), b"keyed here, of another conversation")),
        ("post:7:9", entry(g, b"taken")),
    ] {
        put(&mut forged, key.as_bytes());
        put_opened(&mut forged, &opened);
    }
    let forged = a1.engine.encrypt(g, &forged).unwrap();
    assert_eq!(
        a2.engine.open_once("post:7:7", &forged, None),
        Opened::History { conversation: g.to_vec(), entries: 1 }
    );
    assert_eq!(text(&a2, "post:7:9"), Some((b1.engine.me(), "taken".into())));
    assert_eq!(text(&a2, "post:7:2"), Some((b1.engine.me(), "one, from b".into())));
    assert_eq!(a2.engine.recall("post:8:1"), None);
    assert_eq!(a2.engine.recall("post:7:4"), None);

    // What it took, and what the history entry was, survive a restart.
    a2.engine = Engine::import(&a2.engine.export()).unwrap();
    assert_eq!(text(&a2, "post:7:3"), Some((a1.engine.me(), "two, from a".into())));
    assert_eq!(a2.engine.recall("post:7:6"), Some(Opened::History { conversation: g.to_vec(), entries: 2 }));
    // Nothing to give: no history.
    assert!(a1.engine.history_chunks(&group_conversation(9), HISTORY_BYTES, HISTORY_CHUNKS).is_empty());
    // More than a chunk holds: newest first, in chunks within the budget,
    // and no more chunks than asked.
    for i in 0..20 {
        let post = b1.engine.encrypt(g, format!("message number {i:02}").as_bytes()).unwrap();
        a1.engine.open_once(&format!("post:7:{}", 100 + i), &post, None);
    }
    let all = a1.engine.history_chunks(g, 1 << 20, 1).remove(0);
    let budget = all.len() / 4;
    let chunks = a1.engine.history_chunks(g, budget, 100);
    assert!(
        chunks.len() >= 4 && chunks.iter().all(|c| c.len() <= budget),
        "{budget}: {:?}",
        chunks.iter().map(Vec::len).collect::<Vec<_>>()
    );
    assert_eq!(chunks.iter().map(Vec::len).sum::<usize>(), all.len(), "every message in one chunk or another");
    let has = |c: &[u8], text: &[u8]| c.windows(text.len()).any(|w| w == text);
    assert!(has(&chunks[0], b"message number 19") && has(chunks.last().unwrap(), b"one, from b"), "newest first");
    assert_eq!(a1.engine.history_chunks(g, budget, 2).len(), 2, "no more chunks than asked");
}

#[test]
fn a_commit_posted_out_of_line_is_downloaded_by_each_device_in_the_part_it_needs() {
    let (mut a1, mut b1, mut c1, mut c2, mut d1) =
        (device(1, 1), device(2, 1), device(3, 1), device(3, 2), device(4, 1));
    let mut log = Log::default();
    start(&mut log, &mut a1, &mut [&mut b1]);
    // a1 adds c1 and c2 with a commit too large for a post (as if).
    let add = a1.engine.add(CONV, &packages(&mut [&mut c1, &mut c2])).unwrap().unwrap();
    log.out_of_line = Some(1);
    assert!(log.commit(&mut a1, &add));
    let (_, reference) = log.entries.last().unwrap().clone();
    assert!(reference.starts_with(OUT_OF_LINE_MAGIC) && reference.len() < 200, "{} bytes", reference.len());
    assert!(is_encrypted(&reference), "never shown as a plain text");
    // Unread, it says why. A device that is not in the group needs the
    // Welcome (to learn whether it is added); a member needs the commit.
    assert!(matches!(b1.engine.receive(&reference, false), Err(E2eeError::NotDownloaded)));
    let kinds = |d: &Device| {
        d.engine.parts_needed(&reference, false).unwrap().unwrap().iter().map(|p| p.kind).collect::<Vec<_>>()
    };
    assert_eq!(kinds(&d1), [PartKind::Welcome]);
    assert_eq!(kinds(&b1), [PartKind::Commit]);
    // A damaged download is refused before it is opened.
    let mut parts = b1.engine.parts_needed(&reference, false).unwrap().unwrap();
    let bad = vec![(parts.remove(0), b"not the commit".to_vec())];
    assert!(inline(&reference, &bad).unwrap_err().to_string().contains("does not match"));
    for d in [&mut b1, &mut c1, &mut c2] {
        d.read = log.entries.len() - 1;
        log.catch_up(d);
        assert!(d.engine.is_member(CONV), "{:?} is in", d.engine.me());
    }
    // The committer and b1 fetched the commit, the new devices the Welcome.
    let (a, b, c, c_2) = (a1.engine.me(), b1.engine.me(), c1.engine.me(), c2.engine.me());
    assert_eq!(
        log.downloaded,
        [(a, PartKind::Commit), (b, PartKind::Commit), (c, PartKind::Welcome), (c_2, PartKind::Welcome)]
    );
    log.post(&mut c1, "in the group of four");
    assert_eq!(log.catch_up(&mut b1), ["in the group of four"]);
    assert_eq!(log.catch_up(&mut c2), ["in the group of four"]);

    // A removal out of line (no Welcome): c2 reads that it is out.
    let removal = b1.engine.remove(CONV, &[c_2]).unwrap().unwrap();
    log.out_of_line = Some(1);
    assert!(log.commit(&mut b1, &removal));
    log.catch_up(&mut a1);
    log.post(&mut a1, "after c2 left");
    assert!(log.catch_up(&mut c2).is_empty());
    assert!(!c2.engine.is_member(CONV));
    assert_eq!(log.catch_up(&mut c1), ["after c2 left"]);
    // Nothing of a removal is for a device outside the group.
    let removal = &log.entries[log.entries.len() - 2].1;
    assert_eq!(d1.engine.parts_needed(removal, false).unwrap(), Some(Vec::new()));
    assert_eq!(d1.engine.receive(removal, false).unwrap(), Incoming::NotForMe);

    // A commit that fits in a post goes in it, and only the Welcome as a
    // blob: the members download nothing, the device added its Welcome.
    let before = log.downloaded.len();
    let add = a1.engine.add(CONV, &packages(&mut [&mut d1])).unwrap().unwrap();
    log.out_of_line = Some(64 * 1024);
    assert!(log.commit(&mut a1, &add));
    let (_, reference) = log.entries.last().unwrap().clone();
    assert!(
        reference.starts_with(OUT_OF_LINE_MAGIC) && reference.len() > add.commit.len(),
        "the commit is in the post"
    );
    d1.read = log.entries.len() - 1;
    for d in [&mut b1, &mut c1, &mut d1] {
        log.catch_up(d);
    }
    assert_eq!(log.downloaded[before..], [(d1.engine.me(), PartKind::Welcome)]);
    log.post(&mut d1, "d1 is in");
    assert_eq!(log.catch_up(&mut c1), ["d1 is in"]);
    assert_eq!(log.catch_up(&mut b1), ["d1 is in"]);
}

#[test]
fn a_device_that_lost_the_race_to_start_reads_the_winners_out_of_line_start() {
    let (mut a1, mut b1) = (device(1, 1), device(2, 1));
    a1.engine.create(CONV).unwrap();
    b1.engine.create(CONV).unwrap();
    let from_a = a1.engine.add(CONV, &packages(&mut [&mut b1])).unwrap().unwrap();
    let from_b = b1.engine.add(CONV, &packages(&mut [&mut a1])).unwrap().unwrap();
    let mut log = Log { out_of_line: Some(1), ..Log::default() };
    assert!(log.commit(&mut a1, &from_a));
    assert!(!log.commit(&mut b1, &from_b));
    // Alone in its own group, b1 needs the commit (not for it) and the Welcome.
    log.catch_up(&mut b1);
    assert!(b1.engine.is_member(CONV));
    assert_eq!(log.downloaded.iter().filter(|(d, _)| *d == b1.engine.me()).count(), 2);
    log.post(&mut b1, "joined the winner's");
    assert_eq!(log.catch_up(&mut a1), ["joined the winner's"]);
}
