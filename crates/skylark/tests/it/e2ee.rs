//! End-to-end encryption through the client SDK, where a test needs to
//! stop a client at an exact step (the CLI tests cover the commands).

use crate::harness::{EVENT_WAIT, TestServer, Transport};
use skylark_client::e2ee::{Crypto, Shown, group_conversation};
use skylark_client::session::{Event, LogEvent, log_event};
use skylark_client::{Identity, Session};
use tokio::sync::mpsc;

struct Device {
    identity: Identity,
    crypto: Crypto,
    session: Session,
    events: mpsc::Receiver<Event>,
}

async fn device(server: &TestServer, identity: &Identity, profile: &std::path::Path) -> Device {
    let (session, events) = Session::open(&server.endpoint(Transport::Ws), identity).await.unwrap();
    let crypto = Crypto::open(profile, identity).unwrap();
    crypto.resume(&session.handle()).await.unwrap();
    crypto.replenish(&session.handle()).await.unwrap();
    Device { identity: identity.clone(), crypto, session, events }
}

/// `n` registered accounts (`{prefix}0`, `{prefix}1`, …), a device of each
/// with its own profile under `dirs`.
async fn devices(server: &TestServer, dirs: &std::path::Path, prefix: &str, n: usize) -> Vec<Device> {
    let mut devices = Vec::new();
    for i in 0..n {
        let id = server.register(&format!("{prefix}{i}")).await;
        devices.push(device(server, &id, &dirs.join(format!("d{i}"))).await);
    }
    devices
}

/// Reads the log until a post opens to `text`; returns what it saw.
async fn read_until(d: &mut Device, text: &str) -> Vec<Shown> {
    let mut seen = Vec::new();
    loop {
        let event = tokio::time::timeout(EVENT_WAIT, d.events.recv()).await;
        let Ok(Some(Event::Frame(frame))) = event else { panic!("no post {text:?}; saw {seen:?}") };
        if let Some(LogEvent::Entry(entry)) = log_event(&frame) {
            d.session.handle().ack(entry.seq).await.unwrap();
            let entry = &*d.crypto.fetch_parts(&d.session.handle(), entry).await.unwrap();
            if let Some(shown) = d.crypto.open_event(entry) {
                let hit = shown == Shown::Encrypted(text.to_owned());
                seen.push(shown);
                if hit {
                    return seen;
                }
            }
        }
    }
}

/// A client that dies after the server took its commit, but before it
/// heard so or sent the Welcome, finishes both on its next run; one that
/// dies before sending the commit sends it then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_mid_commit_finishes_it_on_the_next_run() {
    let server = TestServer::start().await;
    let dirs = tempfile::tempdir().unwrap();
    let alice_id = server.register("+15552000001").await;
    let bob_id = server.register("+15552000002").await;
    let alice_dir = dirs.path().join("alice");
    let mut bob = device(&server, &bob_id, &dirs.path().join("bob")).await;

    for (name, server_took_it) in [("taken", true), ("never sent", false)] {
        let alice = device(&server, &alice_id, &alice_dir).await;
        let h = alice.session.handle();
        let info = h.create_group(name, &["+15552000002"]).await.unwrap();
        let conversation = group_conversation(info.id);
        let claimed = h.claim_key_packages("+15552000002").await.unwrap();
        let packages: Vec<(skylark_e2ee::DeviceRef, Vec<u8>)> = claimed
            .devices
            .iter()
            .map(|d| {
                (skylark_e2ee::DeviceRef { account: claimed.account_id, device: d.device_id }, d.key_package.to_vec())
            })
            .collect();
        let commit = alice
            .crypto
            .with(|e| {
                e.create(&conversation)?;
                let c = e.add(&conversation, &packages)?.expect("bob's device to add");
                e.stage(&conversation, "commit-1", &c);
                Ok(c)
            })
            .unwrap();
        if server_took_it {
            h.commit_to_group(info.id, "commit-1", commit.epoch, commit.payload()).await.unwrap();
        }
        // The process dies here: no answer recorded, no Welcome sent.
        alice.session.close().await;
        drop(alice.crypto);

        let mut alice = device(&server, &alice_id, &alice_dir).await;
        assert!(alice.crypto.with(|e| Ok(e.outgoing().is_empty())).unwrap(), "{name}: the next run finished it");
        assert_eq!(alice.crypto.with(|e| e.epoch(&conversation)).unwrap(), 1);
        let text = format!("after the crash ({name})");
        let cid = format!("p-{}", name.replace(' ', "-"));
        alice.crypto.post(&alice.session.handle(), &mut alice.events, info.id, &cid, &text).await.unwrap();
        let seen = read_until(&mut bob, &text).await;
        assert!(!seen.iter().any(|s| matches!(s, Shown::Unreadable(_))), "{name}: {seen:?}");
        // Alice's other run sees its own post in the log as what it sent.
        assert!(read_until(&mut alice, &text).await.contains(&Shown::Encrypted(text.clone())));
        assert_eq!(alice.identity.device_id, alice_id.device_id);
        alice.session.close().await;
    }
}

/// What a member device read, in order: (group sequence, what it showed).
type Feed = Vec<(u64, Shown)>;

/// Reads a device's log until `stop` says so (on a post's text or the
/// device's removal), opening every group post; returns the feed.
async fn read_feed(mut d: Device, group: u64, me: u64, stop: &'static str) -> Feed {
    use skylark_protocol::v1::{event::Body, group_event::Body as G};
    let mut feed = Vec::new();
    loop {
        let event = tokio::time::timeout(std::time::Duration::from_secs(120), d.events.recv()).await;
        let Ok(Some(Event::Frame(frame))) = event else { panic!("device of {me}: the log stopped; read {feed:?}") };
        let Some(LogEvent::Entry(entry)) = log_event(&frame) else { continue };
        d.session.handle().ack(entry.seq).await.unwrap();
        let Some(Body::Group(g)) = &entry.body else { continue };
        if g.group != group {
            continue;
        }
        if let Some(shown) = d.crypto.open_event(&d.crypto.fetch_parts(&d.session.handle(), entry).await.unwrap()) {
            let last = shown == Shown::Encrypted(stop.to_owned());
            feed.push((g.group_seq, shown));
            if last {
                return feed;
            }
        }
        if matches!(&g.body, Some(G::Removed(m)) if m.account == me) {
            return feed;
        }
    }
}

/// A 100-member encrypted group, members added and removed while others
/// post: every device reads exactly the posts of the epochs it was a
/// member in (and that reached it), in the group's order, and nothing of
/// the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_member_group_under_traffic_each_device_reads_its_slice() {
    const MEMBERS: usize = 100;
    const FIRST: usize = 50;
    let server = TestServer::start().await;
    let dirs = tempfile::tempdir().unwrap();
    let mut identities = Vec::new();
    let mut devices = Vec::new();
    for i in 0..MEMBERS {
        let id = server.register(&format!("+1555210{i:04}")).await;
        devices.push(device(&server, &id, &dirs.path().join(format!("m{i}"))).await);
        identities.push(id);
    }
    let phone = |i: usize| identities[i].phone.clone();
    let mut admin = devices.remove(0);
    let h = admin.session.handle();
    let first: Vec<String> = (1..FIRST).map(phone).collect();
    let refs: Vec<&str> = first.iter().map(String::as_str).collect();
    let info = h.create_group("hundred", &refs).await.unwrap();
    let setup = admin.crypto.start_group(&h, &mut admin.events, &info).await.unwrap();
    assert_eq!(setup, skylark_client::e2ee::Setup::Encrypted);
    let conversation = group_conversation(info.id);
    let epoch_of = |c: &Crypto| c.with(|e| e.epoch(&conversation)).unwrap();
    // Membership by epochs: from the epoch a device was added in, up to
    // the one it was removed in. The start adds the first members
    // ADD_BATCH at a time, in the order named (epoch 1, then 2): a poster
    // of the first commit may post in epoch 1, which the others of that
    // commit read and those of the second do not.
    let mut joined = vec![0; MEMBERS];
    for (i, epoch) in joined.iter_mut().enumerate().take(FIRST).skip(1) {
        *epoch = 1 + ((i - 1) / skylark_client::e2ee::ADD_BATCH) as u64;
    }
    assert_eq!(joined[FIRST - 1], epoch_of(&admin.crypto), "the start made one commit per batch");
    let mut left = vec![u64::MAX; MEMBERS];

    // Everyone but the admin reads; five of the first members post.
    let mut readers = Vec::new();
    let mut posters = Vec::new();
    for (n, d) in devices.into_iter().enumerate() {
        let i = n + 1;
        if i <= 5 {
            posters.push((i, d));
        } else {
            let me = identities[i].account_id;
            readers.push((i, tokio::spawn(read_feed(d, info.id, me, "the end"))));
        }
    }
    let posts = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(u64, u64, String)>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut poster_tasks = Vec::new();
    for (i, mut d) in posters {
        let (posts, stop, conversation) = (posts.clone(), stop.clone(), conversation.clone());
        poster_tasks.push(tokio::spawn(async move {
            // First the Welcome.
            while !d.crypto.encrypts(info.id).unwrap() {
                let Ok(Some(Event::Frame(frame))) = tokio::time::timeout(EVENT_WAIT, d.events.recv()).await else {
                    panic!("member {i} was never welcomed")
                };
                if let Some(LogEvent::Entry(entry)) = log_event(&frame) {
                    d.crypto.open_event(entry);
                    d.session.handle().ack(entry.seq).await.unwrap();
                }
            }
            let mut n = 0;
            // A few posts each, spread over the changes (and on while they last).
            while n < 6 || !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 12 {
                // Keep up with the group's commits before each post.
                while let Ok(Some(Event::Frame(frame))) =
                    tokio::time::timeout(std::time::Duration::from_millis(5), d.events.recv()).await
                {
                    if let Some(LogEvent::Entry(entry)) = log_event(&frame) {
                        d.crypto.open_event(entry);
                        d.session.handle().ack(entry.seq).await.unwrap();
                    }
                }
                let text = format!("post {n} from {i}");
                let cid = format!("p{i}-{n}");
                // Made again when a commit came first (the group takes a
                // post only in its current epoch): the epoch after is the
                // one it was made in.
                let (ack, encrypted) =
                    d.crypto.post(&d.session.handle(), &mut d.events, info.id, &cid, &text).await.unwrap();
                assert!(encrypted);
                let epoch = d.crypto.with(|e| e.epoch(&conversation)).unwrap();
                d.crypto.take_read();
                posts.lock().unwrap().push((ack.id.unwrap().seq, epoch, text));
                n += 1;
                tokio::time::sleep(std::time::Duration::from_millis(150)).await;
            }
            d
        }));
    }

    // Under that traffic: two additions of 25, then two removals of five.
    for batch in 0..2 {
        let added: Vec<usize> = (FIRST + batch * 25..FIRST + batch * 25 + 25).collect();
        let phones: Vec<String> = added.iter().map(|&i| phone(i)).collect();
        let prepared = admin.crypto.prepare_add(&h, info.id, &phones).await.unwrap().unwrap();
        assert!(prepared.without_keys().is_empty());
        let change = skylark_protocol::v1::change_group::Change::Add(skylark_protocol::v1::PhoneList { phones });
        h.change_group(info.id, change).await.unwrap();
        admin.crypto.finish_add(&h, &mut admin.events, info.id, prepared).await.unwrap();
        for i in added {
            joined[i] = epoch_of(&admin.crypto);
        }
    }
    for batch in 0..2 {
        let removed: Vec<usize> = ((10 + batch * 5)..(15 + batch * 5)).collect();
        for &i in &removed {
            let remove = skylark_protocol::v1::change_group::Change::Remove(phone(i));
            h.change_group(info.id, remove).await.unwrap();
        }
        let accounts: Vec<u64> = removed.iter().map(|&i| identities[i].account_id).collect();
        assert!(admin.crypto.remove_accounts(&h, &mut admin.events, info.id, &accounts).await.unwrap());
        for i in removed {
            left[i] = epoch_of(&admin.crypto);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut last_poster = None;
    for task in poster_tasks {
        last_poster = Some(task.await.unwrap());
    }
    admin.crypto.post(&h, &mut admin.events, info.id, "end", "the end").await.unwrap();
    let end_epoch = epoch_of(&admin.crypto);
    drop(last_poster);

    let posts = posts.lock().unwrap().clone();
    assert!(posts.len() >= 30, "traffic went on during the changes: {} posts", posts.len());
    let mut checked = 0;
    for (i, reader) in readers {
        let feed = reader.await.unwrap();
        let removed_at = feed.iter().map(|(seq, _)| *seq).max().filter(|_| left[i] != u64::MAX);
        let got: Vec<String> = feed
            .iter()
            .filter_map(|(_, s)| match s {
                Shown::Encrypted(t) => Some(t.clone()),
                _ => None,
            })
            .collect();
        // Exactly the posts of its epochs that reached it, in group order.
        let mut want: Vec<(u64, String)> = posts
            .iter()
            .filter(|(seq, epoch, _)| *epoch >= joined[i] && *epoch < left[i] && feed.iter().any(|(s, _)| s == seq))
            .map(|(seq, _, text)| (*seq, text.clone()))
            .collect();
        want.sort();
        let mut want: Vec<String> = want.into_iter().map(|(_, t)| t).collect();
        if left[i] == u64::MAX {
            assert!(end_epoch >= joined[i]);
            want.push("the end".to_owned());
        }
        assert_eq!(
            got, want,
            "member {i} (joined in epoch {}, left in {:?}, removed at {removed_at:?})",
            joined[i], left[i]
        );
        // Posts of epochs before it joined reached it but are not readable to it.
        for (seq, shown) in &feed {
            if let Some((_, epoch, _)) = posts.iter().find(|p| p.0 == *seq)
                && *epoch < joined[i]
            {
                assert!(matches!(shown, Shown::Unreadable(_)), "member {i} read a post from before it joined");
            }
        }
        checked += 1;
    }
    assert_eq!(checked, MEMBERS - 6);
}

/// On a server whose claim limit holds fewer claims than a batch, the
/// batch is refused as a whole and the client claims one number at a time
/// (waiting out the limit), so the group still starts encrypted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_batch_too_large_for_the_limit_falls_back_to_one_number_at_a_time() {
    let mut config = crate::harness::test_config();
    config.rate_limits.key_claims_per_device = skylark_server::config::Quota { burst: 1, per_ms: 100 };
    let server = TestServer::start_with(config).await;
    let dirs = tempfile::tempdir().unwrap();
    let mut devices = devices(&server, dirs.path(), "+1555230000", 3).await;
    let mut admin = devices.remove(0);
    let h = admin.session.handle();
    let mut before = Vec::new();
    for d in &devices {
        before.push(d.session.handle().key_package_stock().await.unwrap().available);
    }
    let info = h.create_group("limited", &["+15552300001", "+15552300002"]).await.unwrap();
    let setup = admin.crypto.start_group(&h, &mut admin.events, &info).await.unwrap();
    assert_eq!(setup, skylark_client::e2ee::Setup::Encrypted);
    for (d, was) in devices.iter().zip(before) {
        let now = d.session.handle().key_package_stock().await.unwrap().available;
        assert_eq!(now, was - 1, "one package of each member's device was claimed");
    }
}

/// A commit the server refuses for good (here: larger than the payload
/// limit, as adding many devices to a large group can be) is dropped and
/// said in words, instead of staying staged: a staged commit holds up every
/// encrypted message of the device in that group, and the next run's
/// `resume` would send it again for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_refused_for_good_is_dropped_and_the_group_stays_usable() {
    let mut config = crate::harness::test_config();
    // Room for starting a group of two, not for adding four devices at
    // once, neither in a post nor as files (the way a commit too large
    // for a post travels).
    config.messaging.max_payload_bytes = 3_000;
    config.media.max_upload_bytes = 2_000;
    let server = TestServer::start_with(config).await;
    let dirs = tempfile::tempdir().unwrap();
    let mut devices = devices(&server, dirs.path(), "+1555240000", 6).await;
    let mut admin = devices.remove(0);
    let mut member = devices.remove(0);
    let h = admin.session.handle();
    let info = h.create_group("limited", &["+15552400001"]).await.unwrap();
    let setup = admin.crypto.start_group(&h, &mut admin.events, &info).await.unwrap();
    assert_eq!(setup, skylark_client::e2ee::Setup::Encrypted);

    let newcomers: Vec<String> = (2..6).map(|i| format!("+1555240000{i}")).collect();
    let err = add_members(&mut admin, info.id, &newcomers).await.unwrap_err();
    assert_eq!(err.error_code(), Some(skylark_protocol::ErrorCode::MessageTooLarge), "{err}");
    let words = err.to_string();
    assert!(
        words.contains("too large for this server, in a post and as a file") && words.contains("was not changed"),
        "{words}"
    );
    // The members the server took could not read the group: out again.
    let out = admin.crypto.undo_unkeyed_add(&h, info.id, &newcomers).await.unwrap();
    assert_eq!(out, newcomers);
    let members: Vec<String> = h.group_info(info.id).await.unwrap().members.into_iter().map(|m| m.phone).collect();
    assert_eq!(members.len(), 2, "{members:?}");
    assert!(!members.iter().any(|m| newcomers.contains(m)));
    assert!(admin.crypto.undo_unkeyed_add(&h, info.id, &newcomers).await.unwrap().is_empty(), "nothing twice");

    let conversation = group_conversation(info.id);
    assert!(!admin.crypto.with(|e| Ok(e.has_pending_commit(&conversation))).unwrap(), "the commit was dropped");
    assert!(admin.crypto.with(|e| Ok(e.outgoing().is_empty())).unwrap(), "nothing is left to send again");
    // The group's encryption goes on as it was: the admin still posts
    // encrypted, the member reads it, and a new run has nothing to resume.
    let (_, encrypted) =
        admin.crypto.post(&h, &mut admin.events, info.id, "still-readable", "after the refusal").await.unwrap();
    assert!(encrypted);
    read_until(&mut member, "after the refusal").await;
    admin.crypto.resume(&h).await.unwrap();
}

/// A commit too large for one post on the server (a Welcome carries the
/// group's ratchet tree) travels as blobs, named by a short post: devices
/// added read their Welcome from it, members the commit, and the group's
/// encryption goes on for all of them, through additions and a removal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_too_large_for_a_post_travel_as_files_and_every_device_reads_them() {
    let (server, media) = server_of_small_posts().await;
    let dirs = tempfile::tempdir().unwrap();
    let mut devices = devices(&server, dirs.path(), "+1555241000", 7).await;
    assert_eq!(devices[0].session.handle().max_payload_bytes(), 3_000, "the server says its limit");
    let mut admin = devices.remove(0);
    let mut member = devices.remove(0);
    let h = admin.session.handle();
    let info = h.create_group("large", &["+15552410001"]).await.unwrap();
    let setup = admin.crypto.start_group(&h, &mut admin.events, &info).await.unwrap();
    assert_eq!(setup, skylark_client::e2ee::Setup::Encrypted);
    welcomed(&mut member, info.id).await;

    // Four devices at once: their Welcome is larger than a post.
    let newcomers: Vec<String> = (2..6).map(|i| format!("+1555241000{i}")).collect();
    add_members(&mut admin, info.id, &newcomers).await.unwrap();
    let history = h.history(0, 50).await.unwrap();
    let posts: Vec<&[u8]> = history
        .events
        .iter()
        .filter_map(|e| match &e.body {
            Some(skylark_protocol::v1::event::Body::Group(g)) if g.group == info.id => match &g.body {
                Some(skylark_protocol::v1::group_event::Body::Message(m)) => Some(&m.payload[..]),
                _ => None,
            },
            _ => None,
        })
        .collect();
    let named = posts.iter().filter(|p| p.starts_with(skylark_e2ee::OUT_OF_LINE_MAGIC)).count();
    assert_eq!(named, 1, "the addition went as a post naming its parts");
    for d in &mut devices[..4] {
        welcomed(d, info.id).await;
    }
    let (_, encrypted) =
        admin.crypto.post(&h, &mut admin.events, info.id, "welcome-all", "welcome, all four").await.unwrap();
    assert!(encrypted);
    read_until(&mut member, "welcome, all four").await;
    for d in &mut devices[..4] {
        read_until(d, "welcome, all four").await;
    }

    // The admin removes a newcomer, another newcomer commits it (any
    // member may), and the rest read on.
    let removed = devices.remove(1);
    h.change_group(info.id, skylark_protocol::v1::change_group::Change::Remove(removed.identity.phone.clone()))
        .await
        .unwrap();
    let newcomer = &mut devices[0];
    let hn = newcomer.session.handle();
    assert!(
        newcomer
            .crypto
            .remove_accounts(&hn, &mut newcomer.events, info.id, &[removed.identity.account_id])
            .await
            .unwrap()
    );
    let (_, encrypted) =
        newcomer.crypto.post(&hn, &mut newcomer.events, info.id, "after-removal", "one fewer").await.unwrap();
    assert!(encrypted);
    read_until(&mut admin, "one fewer").await;
    read_until(&mut member, "one fewer").await;
    let members = admin.crypto.with(|e| e.members(&group_conversation(info.id))).unwrap();
    assert_eq!(members.len(), 5, "{members:?}");
    assert!(!members.iter().any(|m| m.account == removed.identity.account_id));

    // A device that finds the files gone (past the commits' retention, a
    // year) is told it cannot read that change; nothing is remembered of it.
    let mut late = devices.pop().unwrap();
    add_members(&mut admin, info.id, std::slice::from_ref(&late.identity.phone)).await.unwrap();
    for blob in std::fs::read_dir(media.path().join("blobs").join("blobs")).unwrap() {
        std::fs::remove_file(blob.unwrap().path()).unwrap();
    }
    let lh = late.session.handle();
    let entry = loop {
        let Ok(Some(Event::Frame(frame))) = tokio::time::timeout(EVENT_WAIT, late.events.recv()).await else {
            panic!("the addition never reached the late device")
        };
        if let Some(LogEvent::Entry(entry)) = log_event(&frame)
            && skylark_client::e2ee::kept_out_of_line(entry)
        {
            break entry.clone();
        }
    };
    let fetched = late.crypto.fetch_parts(&lh, &entry).await.unwrap();
    assert!(matches!(fetched, std::borrow::Cow::Borrowed(_)), "left as it was");
    let shown = late.crypto.open_event(&fetched);
    assert!(matches!(&shown, Some(Shown::Unreadable(w)) if w.contains("could not download")), "{shown:?}");
    assert!(!late.crypto.encrypts(info.id).unwrap());
    assert_eq!(late.crypto.recall(&entry), None, "not remembered as unreadable");
}

/// The files of a commit too large for a post outlive the attachments'
/// retention (`media.commit_retention_ms`, a year, against 30 days): devices
/// away for more than a month still follow the group's encryption when they
/// come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commits_files_outlive_the_attachments_retention() {
    const DAY_MS: u64 = 86_400_000;
    let (server, media) = server_of_small_posts().await;
    let dirs = tempfile::tempdir().unwrap();
    let mut devices = devices(&server, dirs.path(), "+1555320000", 6).await;
    let mut admin = devices.remove(0);
    let mut member = devices.remove(0);
    let h = admin.session.handle();
    let info = h.create_group("kept", &["+15553200001"]).await.unwrap();
    admin.crypto.start_group(&h, &mut admin.events, &info).await.unwrap();
    welcomed(&mut member, info.id).await;
    let newcomers: Vec<String> = (2..6).map(|i| format!("+1555320000{i}")).collect();
    add_members(&mut admin, info.id, &newcomers).await.unwrap();
    let blobs = || std::fs::read_dir(media.path().join("blobs").join("blobs")).map_or(0, |d| d.count());
    let files = blobs();
    assert!(files >= 1, "the addition went as files");

    // A month and a day on, before anyone but the admin has read it.
    server.clock.advance_ms(31 * DAY_MS);
    assert_eq!(server.server.collect_media().await.unwrap().blobs, 0, "no commit's file is gone");
    assert_eq!(blobs(), files);
    for d in &mut devices {
        welcomed(d, info.id).await;
    }
    admin.crypto.post(&h, &mut admin.events, info.id, "later", "a month on").await.unwrap();
    read_until(&mut member, "a month on").await;
    for d in &mut devices {
        read_until(d, "a month on").await;
    }
    // A year after the commit, its files go like any attachment's.
    server.clock.advance_ms(335 * DAY_MS);
    assert_eq!(server.server.collect_media().await.unwrap().blobs, files);
    assert_eq!(blobs(), 0);
}

/// A server taking posts of at most 3,000 bytes (a Welcome to a few devices
/// is larger, and travels as files), its media in the directory returned.
async fn server_of_small_posts() -> (TestServer, tempfile::TempDir) {
    let mut config = crate::harness::test_config();
    config.messaging.max_payload_bytes = 3_000;
    let media = tempfile::tempdir().unwrap();
    config.media.dir = media.path().to_owned();
    (TestServer::start_with(config).await, media)
}

/// Adds `phones` to the encrypted group as the clients do: their devices'
/// key packages claimed, the server's membership changed, then the commit
/// that gives those devices the keys, whose outcome this returns.
async fn add_members(admin: &mut Device, group: u64, phones: &[String]) -> Result<(), skylark_client::ClientError> {
    let h = admin.session.handle();
    let prepared = admin.crypto.prepare_add(&h, group, phones).await.unwrap().expect("the group encrypts");
    let add =
        skylark_protocol::v1::change_group::Change::Add(skylark_protocol::v1::PhoneList { phones: phones.to_vec() });
    h.change_group(group, add).await.unwrap();
    admin.crypto.finish_add(&h, &mut admin.events, group, prepared).await
}

/// `n` devices (as [`devices`]), and a group the first creates with all
/// the others, started encrypted, each of them welcomed.
async fn encrypted_group(
    server: &TestServer,
    dirs: &std::path::Path,
    prefix: &str,
    n: usize,
) -> (Vec<Device>, skylark_protocol::v1::GroupInfo) {
    let mut devices = devices(server, dirs, prefix, n).await;
    let h = devices[0].session.handle();
    let others: Vec<String> = (1..n).map(|i| format!("{prefix}{i}")).collect();
    let refs: Vec<&str> = others.iter().map(String::as_str).collect();
    let info = h.create_group("encrypted", &refs).await.unwrap();
    let first = &mut devices[0];
    let setup = first.crypto.start_group(&h, &mut first.events, &info).await.unwrap();
    assert_eq!(setup, skylark_client::e2ee::Setup::Encrypted);
    for d in &mut devices[1..] {
        welcomed(d, info.id).await;
    }
    (devices, info)
}

/// Reads a device's log until it has the group's keys (its Welcome).
async fn welcomed(d: &mut Device, group: u64) {
    while !d.crypto.encrypts(group).unwrap() {
        let Ok(Some(Event::Frame(frame))) = tokio::time::timeout(EVENT_WAIT, d.events.recv()).await else {
            panic!("never welcomed to group {group}")
        };
        if let Some(LogEvent::Entry(entry)) = log_event(&frame) {
            d.crypto.open_event(&d.crypto.fetch_parts(&d.session.handle(), entry).await.unwrap());
        }
    }
}

/// Reads a device's log until it hears that a device was linked to its
/// account (opening what it reads on the way).
async fn hears_of_a_link(d: &mut Device) {
    use skylark_protocol::v1::{device_change::Change, event::Body};
    loop {
        let Ok(Some(Event::Frame(frame))) = tokio::time::timeout(EVENT_WAIT, d.events.recv()).await else {
            panic!("the device never heard of the linked one")
        };
        if let Some(LogEvent::Entry(entry)) = log_event(&frame) {
            d.crypto.open_event(entry);
            if matches!(&entry.body, Some(Body::DeviceChange(c)) if matches!(c.change, Some(Change::Linked(_)))) {
                return;
            }
        }
    }
}

/// What the frames a device read while posting or committing opened to.
fn opened_while_busy(d: &Device) -> Vec<Shown> {
    d.crypto
        .take_read()
        .iter()
        .filter_map(|f| match log_event(f) {
            Some(LogEvent::Entry(e)) => d.crypto.recall(e),
            _ => None,
        })
        .collect()
}

/// No device keeps the keys of past epochs, so every post must be opened
/// in the epoch it was made in. Posts and commits cross both ways here: a
/// member that has not read the newest commit has its post refused as
/// stale, reads on and makes it again; and a committer opens what was
/// posted before its commit before applying it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_and_commits_that_cross_are_each_opened_in_their_epoch() {
    let server = TestServer::start().await;
    let dirs = tempfile::tempdir().unwrap();
    let (mut devices, info) = encrypted_group(&server, dirs.path(), "+1555250000", 3).await;
    let mut admin = devices.remove(0);
    let mut member = devices.remove(0);
    let third = devices.remove(0);
    let (h, mh) = (admin.session.handle(), member.session.handle());
    let conversation = group_conversation(info.id);
    let epoch = |d: &Device| d.crypto.with(|e| e.epoch(&conversation)).unwrap();
    assert_eq!((epoch(&admin), epoch(&member)), (1, 1));

    // The member posts, its first post: a commit of fresh keys for its leaf
    // goes first (epoch 2), the post after it. The admin, which has read
    // neither, removes the third member: its commit for epoch 1 loses to
    // the member's, it reads that and commits again, and its commit comes
    // after the post in the log; the admin opens the post (in epoch 2) on
    // its way to applying the commit.
    member.crypto.post(&mh, &mut member.events, info.id, "m1", "before the removal").await.unwrap();
    assert!(!member.crypto.with(|e| Ok(e.wants_update(&conversation))).unwrap());
    assert_eq!(epoch(&member), 2, "the member's first post came after a commit of its fresh keys");
    let remove = skylark_protocol::v1::change_group::Change::Remove("+15552500002".into());
    h.change_group(info.id, remove).await.unwrap();
    let gone = third.identity.account_id;
    assert!(admin.crypto.remove_accounts(&h, &mut admin.events, info.id, &[gone]).await.unwrap());
    assert_eq!(epoch(&admin), 3);
    let opened = opened_while_busy(&admin);
    assert!(opened.contains(&Shown::Encrypted("before the removal".into())), "{opened:?}");

    // The member has not read the commit: a post it makes in epoch 2 is
    // refused as stale by the group itself...
    let payload = member.crypto.with(|e| e.encrypt(&conversation, b"made in epoch 2")).unwrap();
    let stale = skylark_client::session::SendOptions { message_epoch: Some(2), ..Default::default() };
    let refused = mh.send_with(skylark_client::session::To::Group(info.id), "raw", payload, stale).await.unwrap_err();
    assert_eq!(refused.error_code(), Some(skylark_protocol::ErrorCode::StaleEpoch), "{refused}");
    // ...and the client reads on through the commit and makes it again
    // (no second refresh: the member did that once).
    let (_, encrypted) = member.crypto.post(&mh, &mut member.events, info.id, "m2", "after the removal").await.unwrap();
    assert!(encrypted);
    assert_eq!(epoch(&member), 3, "made again in the new epoch");
    let opened = opened_while_busy(&member);
    assert!(opened.contains(&Shown::DevicesChanged), "the member read the removal on the way: {opened:?}");
    let seen = read_until(&mut admin, "after the removal").await;
    assert!(!seen.iter().any(|s| matches!(s, Shown::Unreadable(_))), "{seen:?}");
}

/// A device that only reads refreshes its keys too, once they are a month
/// old, as it carries device changes into its conversations on connecting
/// (`Crypto::maintain`): keys stolen from it stop opening the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_only_reads_refreshes_its_keys_a_month_on() {
    let server = TestServer::start().await;
    let dirs = tempfile::tempdir().unwrap();
    let (mut devices, info) = encrypted_group(&server, dirs.path(), "+1555300000", 2).await;
    let mut admin = devices.remove(0);
    let mut reader = devices.remove(0);
    let (h, rh) = (admin.session.handle(), reader.session.handle());
    let conversation = group_conversation(info.id);
    let epoch = |d: &Device| d.crypto.with(|e| e.epoch(&conversation)).unwrap();
    reader.crypto.maintain(&rh, &mut reader.events).await.unwrap();
    assert_eq!(epoch(&reader), 1, "keys a moment old are not refreshed");

    fn a_month_on() -> u64 {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        now + skylark_e2ee::KEYS_REFRESH_IDLE_AFTER_SECS
    }
    reader
        .crypto
        .with(|e| {
            e.set_clock(a_month_on);
            Ok(())
        })
        .unwrap();
    reader.crypto.maintain(&rh, &mut reader.events).await.unwrap();
    assert_eq!(epoch(&reader), 2, "a commit of fresh keys");
    assert!(reader.crypto.with(|e| Ok(e.stale_conversations())).unwrap().is_empty());
    assert!(!reader.crypto.with(|e| Ok(e.wants_update(&conversation))).unwrap(), "nor again at its first post");

    // The admin applies the commit on its way to posting, and the reader
    // opens the post with its new keys.
    admin.crypto.post(&h, &mut admin.events, info.id, "a1", "a month on").await.unwrap();
    assert_eq!(epoch(&admin), 2);
    let seen = read_until(&mut reader, "a month on").await;
    assert!(!seen.iter().any(|s| matches!(s, Shown::Unreadable(_))), "{seen:?}");
}

/// The server hands a device its log only so far ahead of what it
/// acknowledged (256 entries), and one-shot commands acknowledge nothing.
/// A device that far behind a commit has its post refused as stale, reads
/// the live log as far as it is handed, then the rest from the account's
/// history, through the commit; every post on the way opens in its epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_far_behind_its_log_reads_on_to_the_commit_from_history() {
    use skylark_protocol::v1::event::Body;
    let server = TestServer::start().await;
    let dirs = tempfile::tempdir().unwrap();
    let (mut devices, info) = encrypted_group(&server, dirs.path(), "+1555280000", 3).await;
    let mut admin = devices.remove(0);
    let mut quiet = devices.remove(0);
    let third = devices.remove(0);
    let (h, qh) = (admin.session.handle(), quiet.session.handle());
    const CHATTER: usize = 300;
    for i in 0..CHATTER {
        admin.crypto.post(&h, &mut admin.events, info.id, &format!("c{i}"), &format!("chatter {i}")).await.unwrap();
    }
    read_until(&mut admin, &format!("chatter {}", CHATTER - 1)).await;
    let remove = skylark_protocol::v1::change_group::Change::Remove("+15552800002".into());
    h.change_group(info.id, remove).await.unwrap();
    assert!(admin.crypto.remove_accounts(&h, &mut admin.events, info.id, &[third.identity.account_id]).await.unwrap());

    let conversation = group_conversation(info.id);
    assert_eq!(quiet.crypto.with(|e| e.epoch(&conversation)).unwrap(), 1, "the quiet device read nothing yet");
    let (_, encrypted) = quiet.crypto.post(&qh, &mut quiet.events, info.id, "q1", "from far behind").await.unwrap();
    assert!(encrypted);
    assert_eq!(quiet.crypto.with(|e| e.epoch(&conversation)).unwrap(), 2);
    read_until(&mut admin, "from far behind").await;
    // What the quiet device opened on the way: every post of the chatter.
    let mut opened = Vec::new();
    let mut before = 0;
    loop {
        let page = qh.history(before, 200).await.unwrap();
        for event in &page.events {
            if matches!(&event.body, Some(Body::Group(g)) if matches!(g.body, Some(skylark_protocol::v1::group_event::Body::Message(_))))
            {
                opened.extend(quiet.crypto.recall(event));
            }
        }
        match page.events.last() {
            Some(oldest) if page.has_more => before = oldest.seq,
            _ => break,
        }
    }
    for i in 0..CHATTER {
        assert!(opened.contains(&Shown::Encrypted(format!("chatter {i}"))), "chatter {i}: {} opened", opened.len());
    }
    assert!(!opened.iter().any(|s| matches!(s, Shown::Unreadable(_))));
}

/// One conversation refusing a device change (here: the account was taken
/// out of a group, and its device has not heard) does not keep the change
/// from the others; the refusal is said, and stays to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_change_one_conversation_refuses_still_reaches_the_others() {
    use skylark_protocol::v1::change_group::Change;
    let server = TestServer::start().await;
    let dirs = tempfile::tempdir().unwrap();
    // Bob's encrypted group with Ann, and their encrypted 1:1 conversation.
    let (mut devices, info) = encrypted_group(&server, dirs.path(), "+1555260000", 2).await;
    let mut bob = devices.remove(0);
    let mut ann = devices.remove(0);
    let (ah, bh) = (ann.session.handle(), bob.session.handle());
    let direct = ann.crypto.start_direct(&ah, &mut ann.events, "+15552600000").await.unwrap().expect("both encrypt");
    // Bob takes Ann out of the group on the server, and his client has not
    // committed it: her device still holds the group's keys.
    bh.change_group(info.id, Change::Remove("+15552600001".into())).await.unwrap();

    // Ann links a laptop (which publishes its keys), and her phone reads of it.
    let laptop_id = crate::devices::link_from(&server, &ah, &ann.identity, "laptop").await;
    let mut laptop = device(&server, &laptop_id, &dirs.path().join("laptop")).await;
    // (The group sorts before the 1:1 conversation in her list.)
    assert!(group_conversation(info.id) < group_conversation(direct));
    hears_of_a_link(&mut ann).await;
    // The group refuses her commit (she is no longer a member); the 1:1
    // conversation, after it in her list, gets the laptop all the same.
    let words = ann.crypto.maintain(&ah, &mut ann.events).await.unwrap_err().to_string();
    assert!(words.contains(&format!("group {}", info.id)) && words.contains("tries again"), "{words}");
    let laptop_ref = skylark_e2ee::DeviceRef { account: ann.identity.account_id, device: laptop_id.device_id };
    let members = ann.crypto.with(|e| e.members(&group_conversation(direct))).unwrap();
    assert!(members.contains(&laptop_ref), "the 1:1 conversation has the laptop: {members:?}");
    let members = ann.crypto.with(|e| e.members(&group_conversation(info.id))).unwrap();
    assert!(!members.contains(&laptop_ref));
    // It stays to do: the next command tries the group again.
    assert!(ann.crypto.maintain(&ah, &mut ann.events).await.is_err());
    // Bob (once he has read Ann's start of their conversation) writes; the
    // laptop reads it.
    welcomed(&mut bob, direct).await;
    let (_, encrypted) =
        bob.crypto.post(&bh, &mut bob.events, direct, "b1", "for both of ann's devices").await.unwrap();
    assert!(encrypted);
    let seen = read_until(&mut laptop, "for both of ann's devices").await;
    assert!(!seen.iter().any(|s| matches!(s, Shown::Unreadable(_))), "{seen:?}");
}

/// A linked device whose keys run short (it has published one key
/// package so far) is added to the conversation that got it, and stays to
/// add to the others: the next run adds it there once it has published
/// more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_device_whose_keys_ran_short_is_added_to_the_rest_later() {
    let server = TestServer::start().await;
    let dirs = tempfile::tempdir().unwrap();
    let (mut devices, info) = encrypted_group(&server, dirs.path(), "+1555290000", 2).await;
    let mut ann = devices.remove(0);
    let ah = ann.session.handle();
    let direct = ann.crypto.start_direct(&ah, &mut ann.events, "+15552900001").await.unwrap().expect("both encrypt");
    // The laptop publishes a single key package, and no last-resort one.
    let laptop_id = crate::devices::link_from(&server, &ah, &ann.identity, "laptop").await;
    let (laptop_session, _laptop_events) = Session::open(&server.endpoint(Transport::Ws), &laptop_id).await.unwrap();
    let laptop = Crypto::open(&dirs.path().join("laptop"), &laptop_id).unwrap();
    let one = laptop.with(|e| e.key_packages(1)).unwrap();
    laptop_session.handle().upload_key_packages(one.into_iter().map(Into::into).collect(), None).await.unwrap();
    hears_of_a_link(&mut ann).await;
    let laptop_ref = skylark_e2ee::DeviceRef { account: ann.identity.account_id, device: laptop_id.device_id };
    let has_laptop = |ann: &Device, group: u64| {
        ann.crypto.with(|e| e.members(&group_conversation(group))).unwrap().contains(&laptop_ref)
    };
    ann.crypto.maintain(&ah, &mut ann.events).await.unwrap();
    let first: Vec<bool> = [info.id, direct].iter().map(|&g| has_laptop(&ann, g)).collect();
    assert_eq!(first.iter().filter(|&&x| x).count(), 1, "one conversation got the one package: {first:?}");
    // Once it has published its keys, the next run adds it to the other.
    laptop.replenish(&laptop_session.handle()).await.unwrap();
    ann.crypto.maintain(&ah, &mut ann.events).await.unwrap();
    assert!(has_laptop(&ann, info.id) && has_laptop(&ann, direct), "in both conversations now");
}

/// A profile keeps the device's history (what each entry opened to) apart
/// from its keys, in `e2ee.journal`: each operation appends what it
/// opened instead of writing the whole history again, the state file
/// holds no plaintext, a new run reads both back, and a state written by
/// an earlier version (history inline) is carried over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_appends_its_history_and_reads_it_back() {
    let server = TestServer::start().await;
    let dirs = tempfile::tempdir().unwrap();
    let (mut devices, info) = encrypted_group(&server, dirs.path(), "+1555270000", 2).await;
    let mut ann = devices.remove(0);
    let mut bob = devices.remove(0);
    let bob_dir = dirs.path().join("d1");
    let h = ann.session.handle();
    let has = |file: &str, text: &str| {
        let bytes = std::fs::read(bob_dir.join(file)).unwrap();
        bytes.windows(text.len()).any(|w| w == text.as_bytes())
    };
    let journal_len = || std::fs::metadata(bob_dir.join("e2ee.journal")).unwrap().len();
    let changes_len = || std::fs::metadata(bob_dir.join("e2ee.changes")).map_or(0, |m| m.len());
    let state_file = || {
        let meta = std::fs::metadata(bob_dir.join("e2ee.state")).unwrap();
        (std::os::unix::fs::MetadataExt::ino(&meta), meta.len())
    };
    let state_before = state_file();
    let mut sizes = Vec::new();
    let mut seqs = Vec::new();
    for i in 0..6 {
        let text = format!("history-marker-{i}");
        let (ack, _) = ann.crypto.post(&h, &mut ann.events, info.id, &format!("h{i}"), &text).await.unwrap();
        seqs.push(ack.id.unwrap().seq);
        read_until(&mut bob, &text).await;
        sizes.push((journal_len(), changes_len()));
    }
    // Appended: each post adds its own journal record, a few hundred
    // bytes, and the state's changes; the state is not written again.
    for pair in sizes.windows(2) {
        let ((j0, c0), (j1, c1)) = (pair[0], pair[1]);
        assert!(j1 > j0 && j1 - j0 < 400, "{sizes:?}");
        assert!(c1 > c0, "{sizes:?}");
    }
    assert_eq!(state_file(), state_before, "the state written whole once, not after each message");
    assert!(has("e2ee.journal", "history-marker-5"));
    assert!(!has("e2ee.state", "history-marker-"), "the state file holds no plaintext");
    assert!(!has("e2ee.changes", "history-marker-"), "nor its changes");
    // A text forgotten (as a deletion for everyone does) leaves the file.
    bob.crypto
        .with(|e| {
            e.forget(&format!("post:{}:{}", info.id, seqs[2]));
            Ok(())
        })
        .unwrap();
    assert!(!has("e2ee.journal", "history-marker-2"), "the forgotten text left the journal");
    assert!(has("e2ee.journal", "history-marker-3"));
    // A new run reads both back.
    let kept = bob.crypto.with(|e| Ok(e.journal_len())).unwrap();
    assert!(kept >= 6);
    let again = Crypto::open(&bob_dir, &bob.identity).unwrap();
    assert_eq!(again.with(|e| Ok(e.journal_len())).unwrap(), kept);
    // A record cut short (the process died while appending) is dropped,
    // and the journal written afresh, whole records only.
    let before = journal_len();
    let mut file = std::fs::OpenOptions::new().append(true).open(bob_dir.join("e2ee.journal")).unwrap();
    std::io::Write::write_all(&mut file, &[0, 0, 0, 9, b'p']).unwrap();
    drop(file);
    let after_crash = Crypto::open(&bob_dir, &bob.identity).unwrap();
    assert_eq!(after_crash.with(|e| Ok(e.journal_len())).unwrap(), kept);
    assert!(journal_len() <= before, "{} > {before}", journal_len());
    assert_eq!(Crypto::open(&bob_dir, &bob.identity).unwrap().with(|e| Ok(e.journal_len())).unwrap(), kept);

    // A state with its history inline, as earlier versions wrote it.
    let whole = bob.crypto.with(|e| Ok(e.export())).unwrap();
    let old = dirs.path().join("old");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(old.join("e2ee.state"), &whole).unwrap();
    let carried = Crypto::open(&old, &bob.identity).unwrap();
    assert_eq!(carried.with(|e| Ok(e.journal_len())).unwrap(), kept);
    let journal = std::fs::read(old.join("e2ee.journal")).unwrap();
    assert!(journal.windows(16).any(|w| w == b"history-marker-0"), "the history moved to the journal");
    let state = std::fs::read(old.join("e2ee.state")).unwrap();
    assert!(!state.windows(15).any(|w| w == b"history-marker-"));
    let reread = Crypto::open(&old, &bob.identity).unwrap();
    assert_eq!(reread.with(|e| Ok(e.journal_len())).unwrap(), kept);
    // A state change cut short (the process died while appending) is
    // dropped: the state is written whole, and the device reads on.
    let epoch = after_crash.with(|e| e.epoch(&group_conversation(info.id))).unwrap();
    let mut file = std::fs::OpenOptions::new().append(true).open(bob_dir.join("e2ee.changes")).unwrap();
    std::io::Write::write_all(&mut file, &[0, 0, 1, 0, b'S', b'K']).unwrap();
    drop(file);
    let after_crash = Crypto::open(&bob_dir, &bob.identity).unwrap();
    assert_eq!(changes_len(), 0, "written whole, its changes emptied");
    assert_ne!(state_file(), state_before);
    assert_eq!(after_crash.with(|e| e.epoch(&group_conversation(info.id))).unwrap(), epoch);
    drop(after_crash);
    bob.crypto = Crypto::open(&bob_dir, &bob.identity).unwrap();
    ann.crypto.post(&h, &mut ann.events, info.id, "h-after", "after the cut record").await.unwrap();
    read_until(&mut bob, "after the cut record").await;
}

/// A newly linked device gets its account's history of each encrypted 1:1
/// conversation from the device that adds it: the messages from before it
/// was linked show on it as they do on the others. A group's history is
/// not given (a member added later must not read what came before), and
/// the other person's devices take nothing from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_device_reads_the_earlier_messages_of_its_one_to_one_conversations() {
    use skylark_protocol::v1::event::Body;
    let server = TestServer::start().await;
    let dirs = tempfile::tempdir().unwrap();
    let (mut devices, info) = encrypted_group(&server, dirs.path(), "+1555270000", 2).await;
    let mut bob = devices.remove(0);
    let mut ann = devices.remove(0);
    let (ah, bh) = (ann.session.handle(), bob.session.handle());
    let direct = ann.crypto.start_direct(&ah, &mut ann.events, "+15552700000").await.unwrap().expect("both encrypt");
    welcomed(&mut bob, direct).await;
    ann.crypto.post(&ah, &mut ann.events, direct, "a1", "ann, before the laptop").await.unwrap();
    bob.crypto.post(&bh, &mut bob.events, direct, "b1", "bob, before the laptop").await.unwrap();
    bob.crypto.post(&bh, &mut bob.events, info.id, "b2", "in the group, before the laptop").await.unwrap();
    read_until(&mut ann, "in the group, before the laptop").await;

    // Ann links a laptop; her phone reads of it and adds it.
    let laptop_id = crate::devices::link_from(&server, &ah, &ann.identity, "laptop").await;
    let mut laptop = device(&server, &laptop_id, &dirs.path().join("laptop")).await;
    hears_of_a_link(&mut ann).await;
    ann.crypto.maintain(&ah, &mut ann.events).await.unwrap();
    bob.crypto.take_read();
    bob.crypto.post(&bh, &mut bob.events, direct, "b3", "bob, after the laptop").await.unwrap();
    read_until(&mut laptop, "bob, after the laptop").await;

    // The laptop pages back through the account's log, as a client shows a
    // conversation: the 1:1 messages from before it show; the group's not.
    let page = laptop.session.handle().history(0, 200).await.unwrap();
    let shown = |d: &Device, group: u64| -> Vec<Shown> {
        page.events
            .iter()
            .rev()
            .filter(|e| {
                matches!(&e.body, Some(Body::Group(g)) if g.group == group
                && matches!(g.body, Some(skylark_protocol::v1::group_event::Body::Message(_))))
            })
            .filter_map(|e| d.crypto.open_event(e))
            .collect()
    };
    let in_direct = shown(&laptop, direct);
    for text in ["ann, before the laptop", "bob, before the laptop", "bob, after the laptop"] {
        assert!(in_direct.contains(&Shown::Encrypted(text.into())), "{text:?} on the laptop: {in_direct:?}");
    }
    let in_group = shown(&laptop, info.id);
    assert!(!in_group.contains(&Shown::Encrypted("in the group, before the laptop".into())), "{in_group:?}");
    assert!(in_group.iter().any(|s| matches!(s, Shown::Unreadable(_))), "{in_group:?}");
    // Bob's device reads the history post as nothing to show (whether his
    // post read it on its way, or his log did after).
    let mut bobs = opened_while_busy(&bob);
    bobs.extend(read_until(&mut bob, "bob, after the laptop").await);
    let texts = ["ann, before the laptop", "bob, before the laptop", "in the group, before the laptop"];
    let expected = |s: &Shown| match s {
        Shown::DevicesChanged => true,
        Shown::Encrypted(text) => texts.contains(&text.as_str()) || text == "bob, after the laptop",
        _ => false,
    };
    assert!(bobs.iter().all(expected), "{bobs:?}");

    // History that cannot be posted yet stays owed. Ann blocked Bob, so
    // the conversation takes her commits but not her posts: her phone adds
    // a tablet, and the history is refused. Once she unblocks him, her
    // next run gives it.
    ah.block("+15552700000", true).await.unwrap();
    let tablet_id = crate::devices::link_from(&server, &ah, &ann.identity, "tablet").await;
    let mut tablet = device(&server, &tablet_id, &dirs.path().join("tablet")).await;
    hears_of_a_link(&mut ann).await;
    ann.crypto.maintain(&ah, &mut ann.events).await.unwrap();
    assert!(ann.crypto.encrypts(direct).unwrap());
    let tablet_reads = async |tablet: &Device| {
        let page = tablet.session.handle().history(0, 200).await.unwrap();
        page.events.iter().filter_map(|e| tablet.crypto.open_event(e)).collect::<Vec<Shown>>()
    };
    ah.block("+15552700000", false).await.unwrap();
    ann.crypto.post(&ah, &mut ann.events, direct, "a2", "ann, after the tablet").await.unwrap();
    read_until(&mut tablet, "ann, after the tablet").await;
    assert!(!tablet_reads(&tablet).await.contains(&Shown::Encrypted("ann, before the laptop".into())), "not given yet");
    ann.crypto.maintain(&ah, &mut ann.events).await.unwrap();
    ann.crypto.post(&ah, &mut ann.events, direct, "a3", "ann, after the history").await.unwrap();
    read_until(&mut tablet, "ann, after the history").await;
    let read = tablet_reads(&tablet).await;
    assert!(read.contains(&Shown::Encrypted("ann, before the laptop".into())), "{read:?}");
}
