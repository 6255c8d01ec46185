//! The README walkthrough, with the real binary: register, then whoami.

use crate::harness::TestServer;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

fn skylark(home: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_skylark"));
    cmd.env("SKYLARK_HOME", home).env_remove("SKYLARK_PROFILE").env_remove("SKYLARK_SERVER");
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_then_whoami_from_the_command_line() {
    let server = TestServer::start().await;
    let home = tempfile::tempdir().unwrap();
    let base = server.http_base();

    let sms = server.sms.clone();
    let home_path = home.path().to_owned();
    let base_for_child = base.clone();
    let register = tokio::task::spawn_blocking(move || {
        let mut child = skylark(&home_path)
            .args(["register", "+15550500001", "--server", &base_for_child, "--name", "laptop", "--profile", "alice"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        assert!(first.contains("A code was sent to +15550500001"), "{first}");
        // The code "arrives by SMS" once the line above is printed.
        let code = sms.last_code("+15550500001");
        let mut stdin = child.stdin.take().unwrap();
        // A slip (too short) costs no attempt; a wrong code costs one.
        writeln!(stdin, "12").unwrap();
        let wrong = if code == "000001" { "000002" } else { "000001" };
        writeln!(stdin, "{wrong}").unwrap();
        writeln!(stdin, "{code}").unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
        assert!(child.wait().unwrap().success(), "{rest}");
        rest
    });
    let output = register.await.unwrap();
    assert!(output.contains("A code is 6 digits"), "{output}");
    assert!(output.contains("Wrong code; 4 attempts left."), "{output}");
    assert!(output.contains("Registered +15550500001"), "{output}");

    let home_path = home.path().to_owned();
    let tcp = server.gateway.as_ref().unwrap().tcp_addr().to_string();
    // Each names the address it used, as an address (not a Rust value).
    let used = [
        format!("server:   ws://{}/v1/ws (protocol v1)", base.trim_start_matches("http://")),
        format!("server:   tcp://{tcp} (protocol v1)"),
        format!("server:   ws://{}/v1/ws (protocol v1)", base.trim_start_matches("http://")),
    ];
    let outputs = tokio::task::spawn_blocking(move || {
        let mut outputs = Vec::new();
        for extra in [vec![], vec!["--tcp", tcp.as_str()], vec!["--json"]] {
            let out = skylark(&home_path).args(["whoami", "--profile", "alice"]).args(extra).output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            outputs.push(String::from_utf8(out.stdout).unwrap());
        }
        outputs
    })
    .await
    .unwrap();
    for (out, used) in outputs.iter().zip(&used) {
        assert!(out.contains("phone:    +15550500001"), "{out}");
        assert!(out.contains("(laptop)"), "{out}");
        assert!(out.contains(used.as_str()), "{out}");
    }

    // An empty or blank message is a slip: refused in words, nothing sent.
    for args in [vec!["send", "+15550500001", ""], vec!["send", "+15550500001", "   "], vec!["group", "send", "1", ""]]
    {
        let out = skylark(home.path()).args(&args).args(["--profile", "alice"]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains("the message is empty, so nothing was sent"), "{args:?}: {stderr}");
    }

    // Without a profile, whoami says what to do.
    let out = skylark(home.path()).args(["whoami", "--profile", "nobody"]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("skylark register"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A child process whose stdout lines arrive on a channel.
struct Running {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Running {
    fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running { child, lines }
    }

    /// Waits for a line containing `needle`; returns every line read.
    fn expect(&self, needle: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            match self.lines.recv_timeout(crate::harness::EVENT_WAIT) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    seen.push(line);
                    if hit {
                        return seen;
                    }
                }
                Err(_) => panic!("no line containing {needle:?}; got {seen:#?}"),
            }
        }
    }

    fn type_line(&mut self, line: &str) {
        writeln!(self.child.stdin.as_mut().unwrap(), "{line}").unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_listen_and_chat_from_the_command_line() {
    use crate::harness::{Peer, Transport};
    use skylark_protocol::v1::ReceiptKind;

    let server = TestServer::start().await;
    let home = tempfile::tempdir().unwrap();
    let alice = server.register("+15550800001").await;
    let bob = server.register("+15550800002").await;
    bob.save(&home.path().join("bob")).unwrap();

    // `send` from Bob's profile, `listen` on… Alice via the SDK sees it.
    let mut alice_peer = Peer::connect(&server, &alice, Transport::Tcp).await;
    let home_path = home.path().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        skylark(&home_path).args(["send", "+15550800001", "hello from the cli", "--profile", "bob"]).output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("✓ sent to +15550800001"));
    let got = alice_peer.received(1, true).await;
    assert_eq!(got[0].payload, b"hello from the cli".as_slice());

    // `listen` shows Alice's reply and the delivery receipt for Bob's message.
    alice_peer.handle().send("+15550800002", "r1", b"hi bob".to_vec()).await.unwrap();
    let mut cmd = skylark(home.path());
    cmd.args(["listen", "--profile", "bob"]);
    let listen = Running::spawn(cmd);
    let mut seen = listen.expect("+15550800001: hi bob");
    seen.extend(listen.expect("— caught up —"));
    // What this device sent is not sent back to it (`send` showed it).
    assert!(!seen.iter().any(|l| l.contains("hello from the cli")), "{seen:#?}");
    drop(listen);

    // `chat`: Bob types; the tick turns to ✓✓ when Alice's device acks, and
    // to read when she reads it; Alice's answer appears.
    let mut cmd = skylark(home.path());
    cmd.args([
        "chat",
        "+15550800001",
        "--profile",
        "bob",
        "--tcp",
        &server.gateway.as_ref().unwrap().tcp_addr().to_string(),
    ]);
    let mut chat = Running::spawn(cmd);
    chat.expect("Chat with +15550800001");
    // It opens on the conversation so far, once.
    chat.expect("— earlier —");
    let earlier = chat.expect("— now —");
    assert!(earlier.iter().any(|l| l.contains("you → +15550800001: hello from the cli")), "{earlier:#?}");
    assert!(earlier.iter().any(|l| l.contains("+15550800001: hi bob")), "{earlier:#?}");
    chat.type_line("are you there?");
    chat.expect("✓ you: are you there?");
    let got = alice_peer.received(1, true).await;
    assert_eq!(got[0].payload, b"are you there?".as_slice());
    chat.expect("✓✓ you: are you there?");
    let id = got[0].id.unwrap();
    alice_peer.handle().mark_read(id.sender, id.seq).await.unwrap();
    chat.expect("✓✓ (read) you: are you there?");
    alice_peer.handle().send("+15550800002", "r2", b"yes!".to_vec()).await.unwrap();
    chat.expect("+15550800001: yes!");
    // Bob's chat marked Alice's message read as it showed it.
    alice_peer.receipt(ReceiptKind::Read, 2).await;
    // `/file PATH` sends a file from the chat; Alice's device fetches and opens it.
    let notes = home.path().join("chat-notes.txt");
    std::fs::write(&notes, "from the chat").unwrap();
    chat.type_line(&format!("/file {}", notes.display()));
    chat.expect("✓ you: 📎 chat-notes.txt (13 bytes)");
    let got = alice_peer.received(1, true).await;
    let content = skylark_client::content::Content::parse(&String::from_utf8_lossy(&got[0].payload));
    let skylark_client::content::Content::File { file, .. } = content else { panic!("{content:?}") };
    let token = alice_peer.handle().media_token().await.unwrap().token;
    let api = server.api();
    let bytes = skylark_client::media::Transfer::new(&api, &token).download(&file.id, &mut |_, _| {}).await.unwrap();
    assert_eq!(skylark_client::media::open(&file, &bytes).unwrap(), b"from the chat");
    chat.type_line("/file /nonexistent/nope.txt");
    chat.expect("(nothing was sent: cannot read /nonexistent/nope.txt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_approve_and_manage_devices_from_the_command_line() {
    let server = TestServer::start().await;
    let home = tempfile::tempdir().unwrap();
    let alice = server.register("+15550800011").await;
    alice.save(&home.path().join("alice")).unwrap();
    let base = server.http_base();
    let home_path = home.path().to_owned();

    let outputs = tokio::task::spawn_blocking(move || {
        let run = |args: &[&str]| {
            let out = skylark(&home_path).args(args).output().unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
            )
        };
        // The new device shows a code (and a QR code) and waits.
        let mut cmd = skylark(&home_path);
        cmd.args(["link", "--server", &base, "--name", "laptop", "--profile", "laptop"]);
        let linking = Running::spawn(cmd);
        let lines = linking.expect("Link code:");
        // A five-minute code reads as five minutes, not "4 min".
        assert!(lines.last().unwrap().contains("(valid for 5 minutes)"), "{lines:#?}");
        let code = lines.last().unwrap().split_whitespace().nth(2).unwrap().to_owned();
        assert!(lines.iter().any(|l| l.contains('█') || l.contains('▀') || l.contains('▄')), "a QR code is drawn");

        let (ok, approved) = run(&["link", "approve", &code, "--profile", "alice"]);
        assert!(ok, "{approved}");
        assert!(approved.contains("\"laptop\" now belongs to +15550800011"), "{approved}");
        assert!(approved.contains("Not yours? Remove it at once: skylark devices remove"), "{approved}");
        linking.expect("Linked: this is device");

        let (ok, list) = run(&["devices", "--profile", "laptop"]);
        assert!(ok, "{list}");
        let id = list.lines().find(|l| l.starts_with("this")).unwrap().split_whitespace().nth(1).unwrap().to_owned();
        let (ok, renamed) = run(&["devices", "rename", &id, "work laptop", "--profile", "alice"]);
        assert!(ok, "{renamed}");
        let (_, list_after) = run(&["devices", "--profile", "alice"]);
        let (ok, removed) = run(&["devices", "remove", &id, "--profile", "alice"]);
        assert!(ok, "{removed}");
        let (ok, whoami) = run(&["whoami", "--profile", "laptop"]);
        assert!(!ok, "a removed device cannot sign in: {whoami}");
        // The dead profile does not block linking it again; a live one does.
        let mut cmd = skylark(&home_path);
        cmd.args(["link", "--server", &base, "--name", "laptop again", "--profile", "laptop"]);
        let relinking = Running::spawn(cmd);
        relinking.expect("was removed from its account");
        relinking.expect("Link code:");
        drop(relinking);
        let (ok, refused) = run(&["link", "--server", &base, "--profile", "alice"]);
        assert!(!ok && refused.contains("which still works"), "{refused}");
        (list, list_after, whoami)
    })
    .await
    .unwrap();
    let (list, list_after, whoami) = outputs;
    assert!(list.contains(" laptop ") && list.contains(" test "), "both devices are listed: {list}");
    assert!(list_after.contains("work laptop"), "{list_after}");
    assert!(whoami.contains("removed"), "{whoami}");
}

/// A terminal program run inside a private tmux server.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(command: &str) -> Tmux {
        let socket = format!("skylark-test-{}-{}", std::process::id(), rand_suffix());
        let status = Command::new("tmux")
            .args(["-L", &socket, "new-session", "-d", "-x", "120", "-y", "40", command])
            .status()
            .expect("this test needs tmux (Debian package tmux) to drive the CLI in a real terminal");
        assert!(status.success(), "tmux could not start {command}");
        Tmux { socket }
    }

    fn keys(&self, keys: &[&str]) {
        let status =
            Command::new("tmux").args(["-L", &self.socket, "send-keys", "-t", "0"]).args(keys).status().unwrap();
        assert!(status.success());
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux").args(["-L", &self.socket, "capture-pane", "-p", "-t", "0"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until the screen shows `needle` (a terminal has no events to
    /// wait on, so this looks at the screen every 50 ms, for a bounded time).
    fn wait_for(&self, needle: &str) {
        let deadline = std::time::Instant::now() + crate::harness::EVENT_WAIT;
        while std::time::Instant::now() < deadline {
            if self.screen().contains(needle) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("the screen never showed {needle:?}:\n{}", self.screen());
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["-L", &self.socket, "kill-server"]).status();
    }
}

/// The next typing state `peer` is told about.
async fn next_typing(peer: &mut crate::harness::Peer) -> i32 {
    use skylark_client::session::Event;
    use skylark_protocol::v1::server_frame::Body;
    loop {
        match tokio::time::timeout(crate::harness::EVENT_WAIT, peer.events.recv()).await.unwrap().unwrap() {
            Event::Frame(f) => {
                if let Some(Body::TypingUpdate(t)) = f.body {
                    return t.state;
                }
            }
            Event::Closed { .. } => panic!("closed"),
        }
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_in_a_terminal_sends_typing_as_you_type_and_shows_presence() {
    use crate::harness::{Peer, Transport};
    use skylark_protocol::v1::TypingState;

    let server = TestServer::start().await;
    let home = tempfile::tempdir().unwrap();
    let alice_id = server.register("+15550800021").await;
    let bob_id = server.register("+15550800022").await;
    bob_id.save(&home.path().join("bob")).unwrap();
    let mut alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    alice.handle().subscribe_presence(&["+15550800022"]).await.unwrap();

    let command = format!(
        "env SKYLARK_HOME={} {} chat +15550800021 --profile bob",
        home.path().display(),
        env!("CARGO_BIN_EXE_skylark")
    );
    let tmux = tokio::task::spawn_blocking(move || {
        let tmux = Tmux::start(&command);
        tmux.wait_for("● +15550800021 is online");
        tmux
    })
    .await
    .unwrap();

    // Keystrokes, not lines: Alice sees Bob typing before he presses Enter…
    tmux.keys(&["hel"]);
    assert_eq!(next_typing(&mut alice).await, TypingState::Composing as i32);
    // …and "paused" once he stops for a few seconds.
    assert_eq!(next_typing(&mut alice).await, TypingState::Paused as i32);
    tmux.keys(&["lo", "Enter"]);
    let got = alice.received(1, true).await;
    assert_eq!(got[0].payload, b"hello".as_slice());
    // Alice types back; Bob's terminal shows it.
    alice.handle().typing("+15550800022", TypingState::Composing).await.unwrap();
    alice.handle().send("+15550800022", "r", b"hi bob".to_vec()).await.unwrap();
    tokio::task::spawn_blocking(move || {
        tmux.wait_for("… +15550800021 is typing");
        tmux.wait_for("+15550800021: hi bob");
        tmux.wait_for("✓✓ you: hello");
        tmux.keys(&["C-d"]);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_from_the_command_line() {
    use crate::harness::{Peer, Transport};
    use skylark_protocol::v1::event::Body;

    let server = TestServer::start().await;
    let home = tempfile::tempdir().unwrap();
    let alice = server.register("+15550900001").await;
    let bob = server.register("+15550900002").await;
    let carol = server.register("+15550900003").await;
    alice.save(&home.path().join("alice")).unwrap();
    let run = |args: Vec<String>| {
        let home_path = home.path().to_owned();
        tokio::task::spawn_blocking(move || {
            let out = skylark(&home_path).args(&args).args(["--profile", "alice"]).output().unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        })
    };
    let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<String>>();

    let (ok, out, err) = run(args(&["group", "create", "Weekend", "+15550900002"])).await.unwrap();
    assert!(ok, "{err}");
    let group: u64 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(
        out.contains("\"Weekend\"") && out.contains("+15550900001  admin") && out.contains("+15550900002"),
        "{out}"
    );
    let g = group.to_string();

    let (ok, out, err) = run(args(&["group", "add", &g, "+15550900003"])).await.unwrap();
    assert!(ok && out.contains("+15550900003"), "{out}{err}");
    let (ok, out, _) = run(args(&["group", "send", &g, "who's in?"])).await.unwrap();
    assert!(ok && out.contains(&format!("✓ posted to group {group}")), "{out}");

    // Bob, a member from the start, sees creation, addition and the post, in order.
    let mut bob_peer = Peer::connect(&server, &bob, Transport::Ws).await;
    let mut kinds = Vec::new();
    while kinds.len() < 3 {
        let event = bob_peer.next_entry().await;
        bob_peer.handle().ack(event.seq).await.unwrap();
        if let Some(Body::Group(e)) = event.body {
            kinds.push(e.group_seq);
            if let Some(skylark_protocol::v1::group_event::Body::Message(m)) = e.body {
                assert_eq!(m.payload, b"who's in?".as_slice());
            }
        }
    }
    assert_eq!(kinds, vec![1, 2, 3]);

    // `listen` prints group events; `msginfo` counts who has the post.
    let mut cmd = skylark(home.path());
    cmd.args(["listen", "--profile", "alice"]);
    let listen = Running::spawn(cmd);
    listen.expect(&format!("group {group}: you created \"Weekend\""));
    listen.expect(&format!("group {group} #3 you: who's in?"));
    drop(listen);
    // `chat --group` names the group by its subject and opens on its posts.
    let mut cmd = skylark(home.path());
    cmd.args(["chat", "--group", &g, "--profile", "alice"]);
    let chat = Running::spawn(cmd);
    chat.expect(&format!("Chat with group \"Weekend\" ({group})"));
    chat.expect("who's in?");
    drop(chat);
    let (ok, out, _) = run(args(&["group", "msginfo", &g, "3"])).await.unwrap();
    assert!(ok && out.contains("of 2"), "{out}");

    // A refused change is reported in words, and changes nothing.
    carol.save(&home.path().join("carol")).unwrap();
    let home_path = home.path().to_owned();
    let g2 = g.clone();
    let out = tokio::task::spawn_blocking(move || {
        skylark(&home_path).args(["group", "remove", &g2, "+15550900002", "--profile", "carol"]).output().unwrap()
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only group admins may do that"), "{out:?}");
    let (ok, out, _) = run(args(&["group", "info", &g])).await.unwrap();
    assert!(ok && out.contains("+15550900002"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_speaks_tls_when_told_to_trust_the_ca() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = skylark_gateway::tls::dev_certificate(certs.path()).unwrap();
    let mut config = crate::harness::test_config();
    config.tls.cert_file = Some(cert.clone());
    config.tls.key_file = Some(key);
    let server = TestServer::start_with(config).await;
    let gateway = server.gateway.as_ref().unwrap();
    let https = format!("https://{}", gateway.http_addr());
    let tcp = gateway.tcp_addr().to_string();
    let home = tempfile::tempdir().unwrap();

    let sms = server.sms.clone();
    let (home_path, ca) = (home.path().to_owned(), cert.to_string_lossy().into_owned());
    let register = tokio::task::spawn_blocking(move || {
        let mut child = skylark(&home_path)
            .args(["register", "+15550950001", "--server", &https, "--ca", &ca])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        writeln!(child.stdin.take().unwrap(), "{}", sms.last_code("+15550950001")).unwrap();
        assert!(child.wait().unwrap().success());
    });
    register.await.unwrap();

    let (home_path, ca) = (home.path().to_owned(), cert.to_string_lossy().into_owned());
    let outs = tokio::task::spawn_blocking(move || {
        let run = |extra: &[&str]| skylark(&home_path).arg("whoami").args(extra).output().unwrap();
        // The profile remembers the CA it registered with.
        (run(&["--ca", &ca]), run(&["--ca", &ca, "--tcp", &tcp, "--tls"]), run(&[]), run(&["--tcp", &tcp]))
    })
    .await
    .unwrap();
    for ok in [&outs.0, &outs.1, &outs.2] {
        assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
        assert!(String::from_utf8_lossy(&ok.stdout).contains("+15550950001"));
    }
    // Plain TCP to the TLS port is explained, not "a frame of 352518912 bytes".
    assert!(!outs.3.status.success());
    assert!(String::from_utf8_lossy(&outs.3.stderr).contains("the server speaks TLS on this port"), "{:?}", outs.3);

    // A profile made before the server switched to TLS is pointed at the new
    // address; without the CA the self-signed certificate is refused, in
    // words, and the profile is left as it was.
    let sms = server.sms.clone();
    let (home_path, ca, https) =
        (home.path().to_owned(), cert.to_string_lossy().into_owned(), format!("https://{}", gateway.http_addr()));
    tokio::task::spawn_blocking(move || {
        let mut child = skylark(&home_path)
            .args(["register", "+15550950002", "--server", &https, "--ca", &ca, "--profile", "old"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Kept open until the command ends: it still prints.
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        writeln!(child.stdin.take().unwrap(), "{}", sms.last_code("+15550950002")).unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{first}{rest}{}", String::from_utf8_lossy(&out.stderr));
    })
    .await
    .unwrap();
    // As it was before TLS: plain HTTP, no CA.
    let mut old = skylark_client::Identity::load(&home.path().join("old")).unwrap();
    old.server = format!("http://{}", gateway.http_addr());
    old.ca = None;
    old.save(&home.path().join("old")).unwrap();
    let (home_path, ca, https) =
        (home.path().to_owned(), cert.to_string_lossy().into_owned(), format!("https://{}", gateway.http_addr()));
    let outs = tokio::task::spawn_blocking(move || {
        let run = |args: &[&str]| skylark(&home_path).args(args).args(["--profile", "old"]).output().unwrap();
        (
            run(&["profile", "server", &https]),
            run(&["whoami"]),
            run(&["profile", "server", &https, "--ca", &ca]),
            run(&["whoami"]),
        )
    })
    .await
    .unwrap();
    assert!(!outs.0.status.success());
    let said = String::from_utf8_lossy(&outs.0.stderr);
    assert!(said.contains("not signed by an authority this device trusts") && said.contains("--ca FILE"), "{said}");
    assert!(String::from_utf8_lossy(&outs.0.stderr).contains("the profile is unchanged"), "{:?}", outs.0);
    assert!(!outs.1.status.success(), "still the old address");
    assert!(outs.2.status.success(), "{}", String::from_utf8_lossy(&outs.2.stderr));
    assert!(String::from_utf8_lossy(&outs.2.stdout).contains("now connects to"), "{:?}", outs.2);
    assert!(outs.3.status.success(), "{}", String::from_utf8_lossy(&outs.3.stderr));
    assert!(String::from_utf8_lossy(&outs.3.stdout).contains("+15550950002"));
}

/// `skylark admin ARGS` against the test server's admin listener: its stdout.
async fn admin_cli(cli: &Profiles, server: &TestServer, args: &[&str]) -> String {
    let (home, url) = (cli.home().to_owned(), server.admin_base());
    let mut all: Vec<String> = vec!["admin".into()];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    all.extend(["--admin".into(), url, "--token".into(), crate::harness::ADMIN_TOKEN.into()]);
    let out = tokio::task::spawn_blocking(move || skylark(&home).args(&all).output().unwrap()).await.unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The CLI on profiles kept under one home directory.
struct Profiles {
    home: tempfile::TempDir,
}

impl Profiles {
    fn new() -> Profiles {
        Profiles { home: tempfile::tempdir().unwrap() }
    }

    fn home(&self) -> &std::path::Path {
        self.home.path()
    }

    fn save(&self, identity: &skylark_client::Identity, profile: &str) {
        identity.save(&self.home().join(profile)).unwrap();
    }

    /// Runs `skylark ARGS --profile PROFILE` to its end.
    async fn output(&self, profile: &str, args: &[&str]) -> std::process::Output {
        let home = self.home().to_owned();
        let mut args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        args.extend(["--profile".to_owned(), profile.to_owned()]);
        tokio::task::spawn_blocking(move || skylark(&home).args(&args).output().unwrap()).await.unwrap()
    }

    /// As [`Profiles::output`], for a command that must succeed: its stdout.
    async fn run(&self, profile: &str, args: &[&str]) -> String {
        let out = self.output(profile, args).await;
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "skylark {args:?} --profile {profile} failed:\n{stdout}{stderr}");
        stdout.into_owned()
    }

    /// `skylark listen` on a profile, running until dropped.
    fn listen(&self, profile: &str) -> Running {
        let mut cmd = skylark(self.home());
        cmd.args(["listen", "--profile", profile]);
        Running::spawn(cmd)
    }
}

/// The digits of the safety number `skylark verify` printed.
fn safety_number(out: &str) -> String {
    out.lines().filter(|l| l.starts_with("    ")).map(str::trim).collect::<Vec<_>>().join(" ")
}

/// End-to-end encrypted groups with the real binary: every device of every
/// member reads the posts, a removed member's devices are taken out of the
/// keys, and the server's store never holds the text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_groups_from_the_command_line() {
    use crate::harness::{Peer, Transport, test_config};
    use skylark_store::redb_store::RedbStore;
    use std::sync::Arc;

    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("skylark.redb");
    let store: Arc<dyn skylark_store::Store> = Arc::new(RedbStore::open(&db).unwrap());
    let mut server = TestServer::start_on(test_config(), store).await;
    let cli = Profiles::new();
    let alice = server.register("+15551700001").await;
    cli.save(&alice, "alice");
    let bob = server.register("+15551700002").await;
    cli.save(&bob, "bob");
    let bob_phone = Peer::connect(&server, &bob, Transport::Ws).await;
    let bob_laptop = crate::devices::link(&server, &bob_phone, "laptop").await;
    drop(bob_phone);
    cli.save(&bob_laptop, "bob-laptop");
    let carol = server.register("+15551700003").await;
    cli.save(&carol, "carol");
    // Dave's only device never ran this CLI, so it publishes no keys.
    let _dave = server.register("+15551700004").await;

    // Any command publishes the device's key packages.
    for profile in ["alice", "bob", "bob-laptop", "carol"] {
        cli.run(profile, &["group", "list"]).await;
    }

    let out = cli.run("alice", &["group", "create", "Secret", "+15551700002", "+15551700003"]).await;
    assert!(out.contains("end-to-end encrypted") && !out.contains("NOT"), "{out}");
    let group: u64 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let g = group.to_string();
    let out = cli.run("alice", &["group", "send", &g, "e2ee-marker-one"]).await;
    assert!(out.contains("✓ 🔒 posted"), "{out}");

    // Every device of every member reads it.
    for profile in ["bob", "bob-laptop", "carol"] {
        let l = cli.listen(profile);
        l.expect("+15551700001: e2ee-marker-one");
    }
    // Bob answers from his laptop; Alice reads it, and her own post too.
    cli.run("bob-laptop", &["group", "send", &g, "e2ee-marker-two"]).await;
    let l = cli.listen("alice");
    l.expect("you: e2ee-marker-one");
    l.expect("+15551700002: e2ee-marker-two");
    drop(l);

    // Carol is removed: her devices leave the keys, the others read on.
    let out = cli.run("alice", &["group", "remove", &g, "+15551700003"]).await;
    assert!(out.contains("cannot read what is sent next"), "{out}");
    cli.run("alice", &["group", "send", &g, "e2ee-marker-three"]).await;
    let l = cli.listen("bob");
    let seen = l.expect("+15551700001: e2ee-marker-three");
    assert!(!seen.iter().any(|line| line.contains("cannot read")), "{seen:#?}");
    drop(l);

    // Bob leaves: Alice's next command takes his two devices out of the keys.
    cli.run("bob", &["group", "leave", &g]).await;
    cli.run("alice", &["group", "send", &g, "e2ee-marker-five"]).await;
    let members = skylark_client::e2ee::read_state(&cli.home().join("alice"))
        .unwrap()
        .members(&skylark_client::e2ee::group_conversation(group))
        .unwrap();
    assert!(members.iter().all(|d| d.account != bob.account_id), "{members:?}");
    assert_eq!(members.len(), 1, "only Alice's device is left: {members:?}");

    // A member whose device cannot encrypt is not added to an encrypted
    // group, and a new group with them says it is not encrypted.
    let refused = cli.output("alice", &["group", "add", &g, "+15551700004"]).await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("cannot encrypt yet"), "{refused:?}");
    let out = cli.run("alice", &["group", "create", "Open", "+15551700004"]).await;
    assert!(out.contains("NOT end-to-end encrypted"), "{out}");
    let open: String = out.split_whitespace().nth(1).unwrap().to_owned();
    cli.run("alice", &["group", "send", &open, "plain-marker-four"]).await;

    // The server's store holds none of the encrypted texts; the scan does
    // find the one sent in the clear, so it can see text when it is there.
    server.shutdown().await;
    drop(server);
    let bytes = std::fs::read(&db).unwrap();
    let found = |marker: &str| bytes.windows(marker.len()).any(|w| w == marker.as_bytes());
    for marker in ["e2ee-marker-one", "e2ee-marker-two", "e2ee-marker-three", "e2ee-marker-five"] {
        assert!(!found(marker), "{marker} is readable in the server's store");
    }
    assert!(found("plain-marker-four"), "the scan sees plaintext where there is some");
}

/// End-to-end encrypted 1:1 conversations with the real binary: the pair's
/// conversation group orders its keys, the sender's other device reads
/// what it sent, two first messages sent at once (two commits for the
/// conversation's first epoch) end in one conversation both can read, and
/// the store holds none of the texts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_one_to_one_from_the_command_line() {
    use crate::harness::{Peer, Transport, test_config};
    use skylark_store::redb_store::RedbStore;
    use std::sync::Arc;

    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("skylark.redb");
    let store: Arc<dyn skylark_store::Store> = Arc::new(RedbStore::open(&db).unwrap());
    let mut server = TestServer::start_on(test_config(), store).await;
    let cli = Profiles::new();
    let alice = server.register("+15551800001").await;
    cli.save(&alice, "alice");
    let alice_phone = Peer::connect(&server, &alice, Transport::Ws).await;
    let laptop = crate::devices::link(&server, &alice_phone, "laptop").await;
    drop(alice_phone);
    cli.save(&laptop, "alice-laptop");
    cli.save(&server.register("+15551800002").await, "bob");
    cli.save(&server.register("+15551800003").await, "carol");

    for profile in ["alice", "alice-laptop", "bob", "carol"] {
        cli.run(profile, &["group", "list"]).await;
    }

    let out = cli.run("alice", &["send", "+15551800002", "dm-marker-one"]).await;
    assert!(out.contains("✓ 🔒 sent to +15551800002"), "{out}");
    let out = cli.run("bob", &["send", "+15551800001", "dm-marker-two"]).await;
    assert!(out.contains("✓ 🔒 sent"), "{out}");
    let l = cli.listen("bob");
    l.expect("+15551800001: dm-marker-one");
    drop(l);
    // Alice's laptop reads both sides of the conversation.
    let l = cli.listen("alice-laptop");
    let mut seen = l.expect("you → +15551800002: dm-marker-one");
    seen.extend(l.expect("+15551800002: dm-marker-two"));
    // Receipts of the conversation name Bob, as a plain 1:1 chat's do. Bob's
    // `send` read Alice's message on its way to the commit of its fresh keys
    // (its first post), so the receipt may come before his message.
    let receipt = "✓✓ +15551800002 delivered your messages up to #";
    if !seen.iter().any(|line| line.contains(receipt)) {
        l.expect(receipt);
    }
    drop(l);

    // The safety number is the same on both sides (and on Alice's laptop).
    let from_alice = safety_number(&cli.run("alice", &["verify", "+15551800002"]).await);
    let from_bob = safety_number(&cli.run("bob", &["verify", "+15551800001"]).await);
    let from_laptop = safety_number(&cli.run("alice-laptop", &["verify", "+15551800002"]).await);
    assert_eq!(from_alice.replace(' ', "").len(), 60, "{from_alice}");
    assert_eq!(from_alice, from_bob);
    assert_eq!(from_alice, from_laptop);
    let with_carol = safety_number(&cli.run("alice", &["verify", "+15551800003"]).await);
    assert_ne!(with_carol, from_alice, "each pair has its own");

    // Bob and Carol write to each other for the first time at once: both
    // start the conversation's encryption, one commit wins, the other side
    // joins it and sends in it.
    let (from_bob, from_carol) = tokio::join!(
        cli.run("bob", &["send", "+15551800003", "dm-marker-three"]),
        cli.run("carol", &["send", "+15551800002", "dm-marker-four"])
    );
    assert!(from_bob.contains("🔒"));
    assert!(from_carol.contains("🔒"));
    let l = cli.listen("carol");
    let seen = l.expect("+15551800002: dm-marker-three");
    assert!(!seen.iter().any(|line| line.contains("cannot read")), "{seen:#?}");
    drop(l);
    let l = cli.listen("bob");
    let seen = l.expect("+15551800003: dm-marker-four");
    assert!(!seen.iter().any(|line| line.contains("cannot read")), "{seen:#?}");
    drop(l);

    server.shutdown().await;
    drop(server);
    let bytes = std::fs::read(&db).unwrap();
    for marker in ["dm-marker-one", "dm-marker-two", "dm-marker-three", "dm-marker-four"] {
        assert!(!bytes.windows(marker.len()).any(|w| w == marker.as_bytes()), "{marker} is readable in the store");
    }
}

/// A device linked to an account is added to its encrypted conversations
/// by the account's other device, and a removed one is taken out of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linked_and_removed_devices_follow_the_encrypted_conversations() {
    use crate::harness::{Peer, Transport};

    let server = TestServer::start().await;
    let cli = Profiles::new();
    let alice = server.register("+15551900001").await;
    cli.save(&alice, "alice");
    let bob = server.register("+15551900002").await;
    cli.save(&bob, "bob");
    cli.run("alice", &["group", "list"]).await;
    cli.run("bob", &["group", "list"]).await;
    let out = cli.run("alice", &["send", "+15551900002", "before the laptop"]).await;
    assert!(out.contains("🔒"), "{out}");

    // Alice links a laptop; it publishes its keys on its first command.
    let phone = Peer::connect(&server, &alice, Transport::Ws).await;
    let laptop = crate::devices::link(&server, &phone, "laptop").await;
    drop(phone);
    cli.save(&laptop, "alice-laptop");
    cli.run("alice-laptop", &["group", "list"]).await;
    // Alice's phone's next command adds the laptop to the conversation.
    let before = safety_number(&cli.run("bob", &["verify", "+15551900001"]).await);
    cli.run("alice", &["send", "+15551900002", "the laptop is in"]).await;
    cli.run("bob", &["send", "+15551900001", "hello laptop"]).await;
    // Bob is told, and his safety number with Alice changed.
    let l = cli.listen("bob");
    l.expect("🔑 the devices in your conversation with +15551900001 changed");
    drop(l);
    let after = safety_number(&cli.run("bob", &["verify", "+15551900001"]).await);
    assert_ne!(before, after, "a linked device changes the safety number");
    assert_eq!(after, safety_number(&cli.run("alice", &["verify", "+15551900002"]).await));
    let l = cli.listen("alice-laptop");
    let seen = l.expect("+15551900002: hello laptop");
    assert!(!seen.iter().any(|line| line.contains("cannot read")), "{seen:#?}");
    drop(l);

    // Alice removes the laptop; her phone takes it out of the conversation.
    let conversation = skylark_client::e2ee::group_conversation(
        skylark_core::AccountId::direct(
            skylark_core::AccountId(alice.account_id),
            skylark_core::AccountId(bob.account_id),
        )
        .unwrap()
        .0,
    );
    let members_seen_by_bob = || {
        let engine = skylark_client::e2ee::read_state(&cli.home().join("bob")).unwrap();
        engine.members(&conversation).unwrap().iter().map(|d| d.device).collect::<Vec<u64>>()
    };
    cli.run("bob", &["group", "list"]).await;
    assert!(members_seen_by_bob().contains(&laptop.device_id));
    cli.run("alice", &["devices", "remove", &laptop.device_id.to_string()]).await;
    cli.run("alice", &["send", "+15551900002", "the laptop is out"]).await;
    let l = cli.listen("bob");
    l.expect("+15551900001: the laptop is out");
    drop(l);
    let members = members_seen_by_bob();
    assert!(!members.contains(&laptop.device_id), "{members:?}");
    assert!(members.contains(&alice.device_id) && members.contains(&bob.device_id), "{members:?}");
}

/// A short command on the profile of a running `listen` takes the device's
/// one connection for a moment; `listen` takes it back and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_takes_its_connection_back_from_a_short_command() {
    use crate::harness::{Peer, Transport};
    let server = TestServer::start().await;
    let cli = Profiles::new();
    let alice = server.register("+15552100001").await;
    cli.save(&alice, "alice");
    let bob = server.register("+15552100002").await;
    let listen = cli.listen("alice");
    listen.expect("— caught up —");
    let out = cli.run("alice", &["whoami"]).await;
    assert!(out.contains("+15552100001"), "{out}");
    listen.expect("took it back");
    let bob = Peer::connect(&server, &bob, Transport::Ws).await;
    bob.handle().send("+15552100001", "b1", b"still there?".to_vec()).await.unwrap();
    listen.expect("+15552100002: still there?");
}

/// The PostgreSQL store holds none of the text of end-to-end encrypted
/// messages either (every table read back and searched, as text and as
/// the hex of a `bytea`), and does hold the text of a plain one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_holds_no_plaintext_of_encrypted_messages() {
    use skylark_store::postgres::throwaway::TestPostgres;
    use skylark_store::{PgOptions, PgStore, Store};
    use std::sync::Arc;

    let pg = TestPostgres::start().unwrap_or_else(|e| panic!("{e}"));
    let options = PgOptions { shards: vec![pg.url("postgres")], ..PgOptions::default() };
    let store: Arc<dyn Store> = Arc::new(PgStore::open(&options).await.unwrap());
    let mut server = TestServer::start_on(crate::harness::test_config(), store).await;
    let cli = Profiles::new();
    cli.save(&server.register("+15552200001").await, "alice");
    cli.save(&server.register("+15552200002").await, "bob");
    // Carol's device never ran this CLI: it cannot encrypt.
    let _carol = server.register("+15552200003").await;
    for profile in ["alice", "bob"] {
        cli.run(profile, &["group", "list"]).await;
    }
    assert!(cli.run("alice", &["send", "+15552200002", "pg-e2ee-marker-one"]).await.contains("🔒"));
    let out = cli.run("alice", &["group", "create", "Vault", "+15552200002"]).await;
    let group = out.split_whitespace().nth(1).unwrap().to_owned();
    cli.run("alice", &["group", "send", &group, "pg-e2ee-marker-two"]).await;
    let out = cli.run("alice", &["send", "+15552200003", "pg-plain-marker-three"]).await;
    assert!(out.contains("not end-to-end encrypted"), "{out}");
    let l = cli.listen("bob");
    l.expect("+15552200001: pg-e2ee-marker-one");
    l.expect("+15552200001: pg-e2ee-marker-two");
    drop(l);
    server.shutdown().await;

    let tables = pg.sql("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").unwrap();
    let mut everything = String::new();
    for table in tables.lines().filter(|t| !t.is_empty()) {
        everything.push_str(&pg.sql(&format!("SELECT t::text FROM \"{table}\" t")).unwrap());
        everything.push('\n');
    }
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    let found = |marker: &str| everything.contains(marker) || everything.contains(&hex(marker));
    assert!(found("pg-plain-marker-three"), "the search sees text where there is some");
    for marker in ["pg-e2ee-marker-one", "pg-e2ee-marker-two"] {
        assert!(!found(marker), "{marker} is readable in PostgreSQL");
    }
}

/// `serve --help` shows the defaults the server really uses.
#[test]
fn serve_help_shows_the_real_defaults() {
    let home = tempfile::tempdir().unwrap();
    let out = skylark(home.path()).args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    let defaults = skylark_gateway::config::Settings::default();
    for shown in [
        format!("[default: {}]", defaults.data_dir.display()),
        format!("[default: {}]", defaults.listen.http),
        format!("[default: {}]", defaults.listen.tcp),
    ] {
        assert!(help.contains(&shown), "{shown} missing from:\n{help}");
    }
}

/// Blocking from the command line, in an encrypted 1:1 conversation: the
/// blocked sender still gets its tick, the blocker's devices show nothing
/// of it, the blocker is told why it cannot write, and unblocking lets the
/// conversation go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_and_unblock_from_the_command_line() {
    let server = TestServer::start().await;
    let cli = Profiles::new();
    cli.save(&server.register("+15551900001").await, "alice");
    cli.save(&server.register("+15551900002").await, "bob");
    for profile in ["alice", "bob"] {
        cli.run(profile, &["group", "list"]).await;
    }
    let out = cli.run("alice", &["send", "+15551900002", "before-block"]).await;
    assert!(out.contains("✓ 🔒 sent"), "{out}");

    let out = cli.run("bob", &["block", "+15551900001"]).await;
    assert!(out.contains("Blocked +15551900001"), "{out}");
    let out = cli.run("bob", &["blocked"]).await;
    assert!(out.contains("+15551900001"), "{out}");
    let out = cli.run("alice", &["send", "+15551900002", "during-block"]).await;
    assert!(out.contains("✓ 🔒 sent"), "the blocked sender sees its tick: {out}");
    // The operator traces it by the id `send` printed: accepted, never stored for Bob.
    let id = out.split("message ").nth(1).and_then(|s| s.split(')').next()).unwrap_or_else(|| panic!("{out}"));
    let traced = admin_cli(&cli, &server, &["trace", id]).await;
    assert!(traced.contains("accepted and stored (one tick)"), "{traced}");
    assert!(traced.contains("member") && traced.contains("not yet"), "Bob never got it: {traced}");
    let refused = cli.output("bob", &["send", "+15551900001", "to-her"]).await;
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("you blocked this account") && said.contains("unblock"), "{said}");

    // Reporting: the operator lists it, without text.
    let out = cli.run("bob", &["report", "+15551900001"]).await;
    assert!(out.contains("Reported your conversation with +15551900001"), "{out}");
    let listed = admin_cli(&cli, &server, &["reports"]).await;
    assert!(listed.contains("+15551900002 reported +15551900001"), "{listed}");
    assert!(listed.contains("from +15551900001") && !listed.contains("before-block"), "{listed}");

    let out = cli.run("bob", &["unblock", "+15551900001"]).await;
    assert!(out.contains("Unblocked +15551900001"), "{out}");
    let out = cli.run("bob", &["contact", "+15551900001", "Alice A."]).await;
    assert!(out.contains("\"Alice A.\" on all your devices"), "{out}");
    let out = cli.run("bob", &["contacts"]).await;
    assert!(out.contains("+15551900001") && out.contains("Alice A."), "{out}");
    let out = cli.run("bob", &["blocked"]).await;
    assert!(out.contains("You have blocked nobody"), "{out}");
    cli.run("alice", &["send", "+15551900002", "after-block"]).await;
    let l = cli.listen("bob");
    let seen = l.expect("+15551900001: after-block");
    assert!(seen.iter().any(|line| line.contains("+15551900001: before-block")), "{seen:#?}");
    assert!(seen.iter().any(|line| line.contains("you blocked +15551900001")), "{seen:#?}");
    assert!(seen.iter().any(|line| line.contains("you named +15551900001 \"Alice A.\"")), "{seen:#?}");
    assert!(!seen.iter().any(|line| line.contains("during-block")), "{seen:#?}");
}

/// Two-step verification from the command line: `pin set` asks twice,
/// `pin` tells, and `register` on a new phone asks for the PIN after the
/// code (a slip costs nothing, a wrong one says how many are left).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pin_set_then_register_again_with_it_from_the_command_line() {
    let server = TestServer::start().await;
    let cli = Profiles::new();
    let phone = "+15551900101";
    cli.save(&server.register(phone).await, "old-phone");
    let out = cli.run("old-phone", &["pin"]).await;
    assert!(out.contains("Two-step verification is off"), "{out}");

    let home = cli.home().to_owned();
    let set = tokio::task::spawn_blocking(move || {
        let mut child = skylark(&home)
            .args(["pin", "set", "--profile", "old-phone"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        writeln!(child.stdin.take().unwrap(), "135790\n135790").unwrap();
        child.wait_with_output().unwrap()
    });
    let out = set.await.unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.contains("Two-step verification is on"), "{said}");
    assert!(said.contains("7 days"), "says when it lapses: {said}");
    let out = cli.run("old-phone", &["pin"]).await;
    assert!(out.contains("Two-step verification is on (since"), "{out}");

    let (home, base, sms) = (cli.home().to_owned(), server.http_base(), server.sms.clone());
    let register = tokio::task::spawn_blocking(move || {
        let mut child = skylark(&home)
            .args(["register", phone, "--server", &base, "--profile", "new-phone"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        let code = sms.last_code(phone);
        // The code, a slip, a wrong PIN, the right one.
        writeln!(child.stdin.take().unwrap(), "{code}\n12\n000000\n135790").unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
        (child.wait().unwrap().success(), rest)
    });
    let (ok, out) = register.await.unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("protected by two-step verification"), "{out}");
    assert!(out.contains("A PIN is 6 digits; nothing was checked"), "{out}");
    assert!(out.contains("Wrong PIN; 9 attempts left"), "{out}");
    assert!(out.contains(&format!("Registered {phone}")), "{out}");
    let out = cli.output("old-phone", &["pin"]).await;
    assert!(!out.status.success(), "the old phone was signed out by the takeover");
}

/// `account export` and `account delete` from the command line, and an
/// operator's `admin delete-account`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_export_and_delete_from_the_command_line() {
    let server = TestServer::start().await;
    let cli = Profiles::new();
    cli.save(&server.register("+15551900201").await, "dana");
    cli.save(&server.register("+15551900202").await, "eli");
    cli.run("dana", &["group", "create", "Trip", "+15551900202"]).await;

    let out = cli
        .run("dana", &["profile", "set", "--name", "Dana", "--about", "on a trip", "--visible-to", "contacts"])
        .await;
    assert!(out.contains("Your profile is set"), "{out}");
    let out = cli.run("dana", &["profile", "set", "--about", "back home"]).await;
    assert!(out.contains("Your profile is set"), "{out}");
    let out = cli.run("dana", &["profile", "show"]).await;
    assert!(out.contains("+15551900201: Dana") && out.contains("about: back home"), "{out}");
    assert!(out.contains("visible to: your contacts"), "the rest stays as it was: {out}");
    let out = cli.run("eli", &["profile", "show", "+15551900201"]).await;
    assert!(out.contains("no profile you may see"), "Dana never wrote to Eli: {out}");
    cli.run("dana", &["send", "+15551900202", "hello"]).await;
    let out = cli.run("eli", &["profile", "show", "+15551900201"]).await;
    assert!(out.contains("+15551900201: Dana") && !out.contains("visible to"), "{out}");

    let out = cli.run("dana", &["account", "export"]).await;
    let json: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(json["account"]["phone"], "+15551900201");
    assert_eq!(json["groups"][0]["subject"], "Trip");
    let file = cli.home().join("dana-export.json");
    let out = cli.run("dana", &["account", "export", "--out", file.to_str().unwrap()]).await;
    assert!(out.contains("Wrote your account's data"), "{out}");
    assert!(std::fs::read_to_string(&file).unwrap().contains("\"Trip\""));

    // A wrong confirmation deletes nothing.
    let wrong = cli.output("dana", &["account", "delete", "--confirm", "+15551900202"]).await;
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("nothing was deleted"));
    // Typed at the prompt.
    let home = cli.home().to_owned();
    let deleted = tokio::task::spawn_blocking(move || {
        let mut child = skylark(&home)
            .args(["account", "delete", "--profile", "dana"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        writeln!(child.stdin.take().unwrap(), "+1 555 190 0201").unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&deleted.stdout);
    assert!(deleted.status.success(), "{said}{}", String::from_utf8_lossy(&deleted.stderr));
    assert!(said.contains("cannot be undone") && said.contains("Deleted +15551900201"), "{said}");
    let phone = skylark_core::PhoneNumber::parse("+15551900201").unwrap();
    assert_eq!(server.store.account_by_phone(&phone).await.unwrap(), None);
    let l = cli.listen("eli");
    l.expect("left");
    drop(l);

    // The operator deletes Eli's.
    let said = admin_cli(&cli, &server, &["delete-account", "+15551900202"]).await;
    assert!(said.contains("Deleted +15551900202: 1 device(s) signed out, left 1 group(s)."), "{said}");
}

/// Replies, reactions, edits, deletions, forwards and disappearing
/// messages from the command line, in an encrypted 1:1 chat: each verb's
/// message shows on the other side — on a device that was offline while it
/// all happened — and a deleted message reads as deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_react_edit_delete_forward_and_disappear_from_the_command_line() {
    let server = TestServer::start().await;
    let cli = Profiles::new();
    let (alice, bob, carol) = ("+15552400001", "+15552400002", "+15552400003");
    cli.save(&server.register(alice).await, "alice");
    cli.save(&server.register(bob).await, "bob");
    cli.save(&server.register(carol).await, "carol");
    for profile in ["alice", "bob", "carol"] {
        cli.run(profile, &["group", "list"]).await;
    }
    let out = cli.run("alice", &["send", bob, "lunch at noon?"]).await;
    assert!(out.contains("✓ 🔒 sent"), "{out}");
    // The message's number in the chat: the sequence of "GROUP:SEQ".
    let id = out.split("message ").nth(1).and_then(|s| s.split(')').next()).unwrap().to_owned();
    let seq = id.split(':').nth(1).unwrap().to_owned();

    let out = cli.run("bob", &["reply", alice, &seq, "yes, noon works"]).await;
    assert!(out.contains(&format!("✓ 🔒 replied to #{seq}")), "{out}");
    let out = cli.run("bob", &["react", alice, &seq, "👍"]).await;
    assert!(out.contains(&format!("reacted 👍 to #{seq}")), "{out}");
    let out = cli.run("alice", &["edit", bob, &seq, "lunch at one?"]).await;
    assert!(out.contains(&format!("edited #{seq}")), "{out}");
    // Someone else's message is not yours to edit, in words.
    let refused = cli.output("bob", &["edit", alice, &seq, "mine now"]).await;
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("your own messages"), "{said}");
    let out = cli.run("alice", &["send", bob, "forward-me-marker"]).await;
    let fwd_seq = out.split("message ").nth(1).and_then(|s| s.split(')').next()).unwrap().split(':').nth(1).unwrap();
    let out = cli.run("bob", &["forward", alice, fwd_seq, carol]).await;
    assert!(out.contains(&format!("forwarded #{fwd_seq} to {carol}")), "{out}");
    let out = cli.run("alice", &["delete", bob, &seq]).await;
    assert!(out.contains(&format!("deleted #{seq} for everyone")), "{out}");
    let out = cli.run("alice", &["disappear", bob, "24h"]).await;
    assert!(out.contains("now disappear 24 hours after"), "{out}");
    let out = cli.run("alice", &["send", bob, "this one disappears"]).await;
    assert!(out.contains("disappears in 24 hours"), "the chat's timer applies: {out}");
    let refused = cli.output("alice", &["disappear", bob, "soon"]).await;
    assert!(String::from_utf8_lossy(&refused.stderr).contains("give off, 24h, 7d or 90d"));

    // Bob's listen shows each of them, in order.
    let listen = cli.listen("bob");
    listen.expect(&format!("🚫 this message was deleted  (#{seq})"));
    listen.expect(&format!("↪ replying to #{seq} \"lunch at noon?\": yes, noon works"));
    listen.expect(&format!("reacted 👍 to #{seq}"));
    listen.expect(&format!("✏️ edited #{seq} to: lunch at one?"));
    listen.expect(&format!("🚫 deleted #{seq} for everyone"));
    listen.expect("set disappearing messages to 24 hours");
    listen.expect("this one disappears ⏳");
    drop(listen);
    let listen = cli.listen("carol");
    listen.expect("(forwarded) forward-me-marker");
    drop(listen);

    // The same verbs in an encrypted group, named by its id.
    let out = cli.run("alice", &["group", "create", "Lunch", bob, carol]).await;
    let group =
        out.split("Group ").nth(1).and_then(|s| s.split(' ').next()).unwrap_or_else(|| panic!("{out}")).to_owned();
    let out = cli.run("alice", &["group", "send", &group, "group-lunch-marker"]).await;
    assert!(out.contains("🔒"), "{out}");
    let listen = cli.listen("carol");
    let seen = listen.expect("group-lunch-marker");
    let line = seen.last().unwrap();
    let post = line.split(&format!("group {group} #")).nth(1).and_then(|s| s.split(' ').next()).unwrap().to_owned();
    drop(listen);
    let out = cli.run("carol", &["react", &group, &post, "🎉"]).await;
    assert!(out.contains(&format!("✓ 🔒 reacted 🎉 to #{post}")), "{out}");
    // Carol's device kept the text it decrypted (MLS keys are used once),
    // in its journal…
    let kept = |profile: &str| {
        ["e2ee.state", "e2ee.changes", "e2ee.journal"].iter().any(|file| {
            let bytes = std::fs::read(cli.home().join(profile).join(file)).unwrap_or_default();
            bytes.windows(b"group-lunch-marker".len()).any(|w| w == b"group-lunch-marker")
        })
    };
    assert!(kept("carol"), "the device's files hold what it read");
    let out = cli.run("alice", &["delete", &group, &post]).await;
    assert!(out.contains(&format!("deleted #{post} for everyone")), "{out}");
    // …until the deletion reaches it.
    let listen = cli.listen("carol");
    listen.expect(&format!("🚫 deleted #{post} for everyone"));
    drop(listen);
    assert!(!kept("carol"), "a deleted post's text is forgotten by the devices that read it");
    let listen = cli.listen("bob");
    listen.expect("🚫 this message was deleted");
    listen.expect(&format!("reacted 🎉 to #{post}"));
    listen.expect(&format!("🚫 deleted #{post} for everyone"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_sent_from_the_command_line_is_saved_by_listen_and_forwarded_without_uploading_again() {
    let server = TestServer::start().await;
    let cli = Profiles::new();
    let (alice, bob, carol) = ("+15552400011", "+15552400012", "+15552400013");
    cli.save(&server.register(alice).await, "alice");
    cli.save(&server.register(bob).await, "bob");
    cli.save(&server.register(carol).await, "carol");
    for profile in ["alice", "bob", "carol"] {
        cli.run(profile, &["group", "list"]).await;
    }
    let photo = cli.home().join("photo.jpg");
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    std::fs::write(&photo, &bytes).unwrap();
    let out = cli.run("alice", &["send", bob, "holiday", "--file", photo.to_str().unwrap()]).await;
    assert!(out.contains("✓ 🔒 📎 photo.jpg (300.0 kB) sent to"), "{out}");

    let listen = cli.listen("bob");
    let seen = listen.expect("📎 photo.jpg (300.0 kB): holiday");
    let line = seen.last().unwrap().clone();
    let saved = listen.expect("📥 saved photo.jpg (300.0 kB) to ");
    drop(listen);
    let path = saved.last().unwrap().split(" to ").nth(1).unwrap().trim().to_owned();
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "Bob's copy is the file Alice sent");
    assert!(path.starts_with(cli.home().join("bob").join("files").to_str().unwrap()), "{path}");

    // Bob forwards it to Carol: the same blob, not a second upload.
    let seq = line.rsplit("(#").next().and_then(|s| s.split(')').next()).unwrap().to_owned();
    let out = cli.run("bob", &["forward", alice, &seq, carol]).await;
    assert!(out.contains(&format!("forwarded #{seq} to {carol}")), "{out}");
    let listen = cli.listen("carol");
    listen.expect("(forwarded) 📎 photo.jpg (300.0 kB): holiday");
    let saved = listen.expect("📥 saved photo.jpg");
    drop(listen);
    let path = saved.last().unwrap().split(" to ").nth(1).unwrap().trim().to_owned();
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    let media = server.media_dir.as_ref().unwrap().path().join("blobs").join("blobs");
    assert_eq!(std::fs::read_dir(&media).unwrap().count(), 1, "forwarding reuses the blob");
    // The server holds only ciphertext.
    let stored = std::fs::read(std::fs::read_dir(&media).unwrap().next().unwrap().unwrap().path()).unwrap();
    assert!(!stored.windows(64).any(|w| w == &bytes[1000..1064]), "the stored blob is not the file");

    // To a group, by its id: every member's listen saves it.
    let out = cli.run("alice", &["group", "create", "Trip", bob, carol]).await;
    let group =
        out.split("Group ").nth(1).and_then(|s| s.split(' ').next()).unwrap_or_else(|| panic!("{out}")).to_owned();
    let notes = cli.home().join("notes.txt");
    std::fs::write(&notes, "bring the tent").unwrap();
    let out = cli.run("alice", &["send", &group, "--file", notes.to_str().unwrap()]).await;
    assert!(out.contains("📎 notes.txt (14 bytes) sent to group"), "{out}");
    let listen = cli.listen("carol");
    let saved = listen.expect("📥 saved notes.txt");
    drop(listen);
    let path = saved.last().unwrap().split(" to ").nth(1).unwrap().trim().to_owned();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "bring the tent");

    // A file that is not there: said in words, nothing sent.
    let refused = cli.output("alice", &["send", bob, "--file", "/nonexistent/x.jpg"]).await;
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("cannot read /nonexistent/x.jpg"), "{said}");
}
