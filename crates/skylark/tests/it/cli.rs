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
        writeln!(stdin, "000000x").unwrap();
        writeln!(stdin, "{code}").unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
        assert!(child.wait().unwrap().success(), "{rest}");
        rest
    });
    let output = register.await.unwrap();
    assert!(output.contains("Wrong code; 4 attempts left."), "{output}");
    assert!(output.contains("Registered +15550500001"), "{output}");

    let home_path = home.path().to_owned();
    let tcp = server.gateway.as_ref().unwrap().tcp_addr().to_string();
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
    for out in outputs {
        assert!(out.contains("phone:    +15550500001"), "{out}");
        assert!(out.contains("(laptop)"), "{out}");
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
