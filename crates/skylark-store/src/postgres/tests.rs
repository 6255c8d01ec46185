//! The PostgreSQL backend against throwaway servers of its own.

use super::throwaway::TestPostgres;
use super::*;
use crate::conformance;

fn server() -> TestPostgres {
    TestPostgres::start().unwrap_or_else(|e| panic!("{e}"))
}

fn options(shards: Vec<String>) -> PgOptions {
    PgOptions { shards, acquire_timeout: Duration::from_secs(2), ..PgOptions::default() }
}

async fn open(shards: Vec<String>) -> PgStore {
    PgStore::open(&options(shards)).await.unwrap_or_else(|e| panic!("{e}"))
}

fn unusable(result: Result<PgStore, StoreError>) -> String {
    match result {
        Err(StoreError::Unusable(message)) => message,
        Err(other) => panic!("expected an unusable store, got {other:?}"),
        Ok(_) => panic!("the store was opened"),
    }
}

fn phone(s: &str) -> PhoneNumber {
    PhoneNumber::parse(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conforms_on_one_shard() {
    let pg = server();
    let store = open(vec![pg.create_database("one").unwrap()]).await;
    conformance::run_all(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conforms_on_three_shards_each_account_on_one() {
    let pg = server();
    let urls: Vec<String> = (0..3).map(|i| pg.create_database(&format!("s{i}")).unwrap()).collect();
    let store = open(urls.clone()).await;
    conformance::run_all(&store).await;
    // Every account's log is on its own shard and only there.
    let mut per_shard = [0i64; 3];
    for (i, url) in urls.iter().enumerate() {
        let pool = PgPool::connect(url).await.unwrap();
        let accounts: Vec<i64> = sqlx::query_scalar("SELECT DISTINCT account FROM log").fetch_all(&pool).await.unwrap();
        for a in &accounts {
            assert_eq!(shard_of(AccountId(*a as u64), 3), i, "account {a} is on shard {i}");
        }
        per_shard[i] = accounts.len() as i64;
        if i > 0 {
            let directory: i64 = sqlx::query_scalar("SELECT count(*) FROM accounts").fetch_one(&pool).await.unwrap();
            assert_eq!(directory, 0, "the directory lives on the first shard only");
        }
    }
    assert!(per_shard.iter().all(|n| *n > 5), "accounts spread over the shards: {per_shard:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_newer_than_the_binary_is_refused_untouched() {
    let pg = server();
    let url = pg.create_database("newer").unwrap();
    drop(open(vec![url.clone()]).await);
    let pool = PgPool::connect(&url).await.unwrap();
    let next = schema_version() + 1;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES ($1, 'from the future', true, '\\x00', 1)",
    )
    .bind(next)
    .execute(&pool)
    .await
    .unwrap();
    let message = unusable(PgStore::open(&options(vec![url.clone()])).await);
    assert!(message.contains(&format!("schema version {next}")) && message.contains("newer binary"), "{message}");
    let newest: i64 = sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations").fetch_one(&pool).await.unwrap();
    assert_eq!(newest, next, "nothing was changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_list_that_does_not_match_is_refused() {
    let pg = server();
    let urls: Vec<String> = (0..3).map(|i| pg.create_database(&format!("m{i}")).unwrap()).collect();
    {
        let store = open(urls.clone()).await;
        let new = NewDevice { public_key: [1; 32], name: "a".into() };
        store.register(&phone("+15550100001"), new, 1).await.unwrap();
    }
    let swapped = vec![urls[0].clone(), urls[2].clone(), urls[1].clone()];
    let message = unusable(PgStore::open(&options(swapped)).await);
    assert!(message.contains("shard 1") && message.contains("is shard 2"), "{message}");
    let fewer = unusable(PgStore::open(&options(urls[..2].to_vec())).await);
    assert!(fewer.contains("3 shards, but 2 are configured"), "{fewer}");
    let mut replaced = urls.clone();
    replaced[2] = pg.create_database("empty").unwrap();
    let empty = unusable(PgStore::open(&options(replaced)).await);
    assert!(empty.contains("shard 2") && empty.contains("empty database"), "{empty}");
    // The right list still opens, with the data.
    let store = open(urls).await;
    assert!(store.account_by_phone(&phone("+15550100001")).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_named_in_words() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("postgres://skylark:hunter2@127.0.0.1:{port}/nothing");
    let message = unusable(PgStore::open(&options(vec![url])).await);
    assert!(message.contains("cannot reach") && message.contains(&port.to_string()), "{message}");
    assert!(!message.contains("hunter2"), "the password is hidden: {message}");
    let off = PgOptions { synchronous_commit: "off".into(), ..options(vec!["postgres://x/y".into()]) };
    assert!(unusable(PgStore::open(&off).await).contains("\"off\" would acknowledge"));
}

fn message_write(account: AccountId, seq: u64) -> AccountWrite {
    let mut w = AccountWrite::new(account);
    w.appends.push((seq, Arc::new(LogEntry::ReadSync { peer: AccountId(1), up_to: seq, at_ms: seq })));
    w.counters = Some(Counters { next_seq: seq + 1, next_outbox: 1 });
    w
}

/// PostgreSQL killed with SIGKILL: writes fail (never succeed) while it is
/// down, the store works again once it is back, and what was acknowledged
/// before is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_postgres_being_killed_and_restarted() {
    let mut pg = server();
    let store = open(vec![pg.create_database("crash").unwrap()]).await;
    let a = AccountId(42);
    store.apply(message_write(a, 1)).await.unwrap();
    pg.kill();
    assert!(store.apply(message_write(a, 2)).await.is_err(), "no ack while the database is down");
    assert!(store.read_log(a, 1, 10).await.is_err());
    pg.restart().unwrap();
    let mut recovered = false;
    for _ in 0..100 {
        if store.read_log(a, 1, 10).await.is_ok() {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recovered, "the store reconnects by itself");
    assert_eq!(store.read_log(a, 1, 10).await.unwrap().len(), 1, "the acknowledged write survived");
    store.apply(message_write(a, 2)).await.unwrap();
    assert_eq!(store.read_log(a, 1, 10).await.unwrap().len(), 2);
}

/// A primary with a synchronous standby: every acknowledged write is on
/// both; the primary is killed, the standby promoted, and the store, given
/// both hosts with `target_session_attrs=read-write`, carries on there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_to_a_promoted_synchronous_standby() {
    let mut primary = server();
    primary.create_database("chat").unwrap();
    let standby = primary.standby(true).unwrap();
    let url = format!(
        "postgres://{}@127.0.0.1:{},127.0.0.1:{}/chat?target_session_attrs=read-write",
        super::throwaway::USER,
        primary.port(),
        standby.port()
    );
    let store = open(vec![url]).await;
    let a = AccountId(7);
    for seq in 1..=20 {
        store.apply(message_write(a, seq)).await.unwrap();
    }
    primary.kill();
    assert!(store.apply(message_write(a, 21)).await.is_err(), "no primary, no ack");
    standby.promote().unwrap();
    let mut next = 21;
    for _ in 0..200 {
        if store.apply(message_write(a, next)).await.is_ok() {
            next += 1;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(next, 22, "writes go to the promoted standby");
    let log = store.read_log(a, 1, 100).await.unwrap();
    assert_eq!(log.iter().map(|(s, _)| *s).collect::<Vec<_>>(), (1..=21).collect::<Vec<_>>(), "nothing acked was lost");
}

/// With a synchronous standby, an ack means the write is on both servers:
/// while the standby is down, a write waits (it is not acknowledged); when
/// the standby is back, it completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_synchronous_standby_down_nothing_is_acknowledged() {
    let mut primary = server();
    let url = primary.create_database("chat").unwrap();
    let mut standby = primary.standby(true).unwrap();
    let store = open(vec![url]).await;
    let a = AccountId(9);
    store.apply(message_write(a, 1)).await.unwrap();
    standby.kill();
    let pending = tokio::spawn({
        let store = store.clone();
        async move { store.apply(message_write(a, 2)).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!pending.is_finished(), "a write is not acknowledged while the synchronous standby is down");
    standby.restart().unwrap();
    let done = tokio::time::timeout(Duration::from_secs(30), pending).await;
    done.expect("acknowledged once the standby is back").unwrap().unwrap();
}

/// TLS to the database: with `sslmode=verify-full` and the server's CA the
/// store's connections are encrypted (PostgreSQL says so in pg_stat_ssl);
/// without the CA the certificate is refused, in words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_over_tls_and_checks_the_certificate() {
    let mut pg = server();
    let plain = pg.create_database("tls").unwrap();
    // A CA, and the server's certificate for 127.0.0.1 signed by it.
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
    pg.enable_tls(&cert.pem(), &key.serialize_pem()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ca_cert.pem()).unwrap();

    let url = format!("{plain}?sslmode=verify-full&sslrootcert={}", ca.display());
    let store = open(vec![url]).await;
    let conn = store.shard_conns().next().unwrap();
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&conn.pool)
        .await
        .unwrap();
    assert!(ssl, "the connection is encrypted");
    conformance::run_all(&store).await;

    let other = pg.create_database("tls2").unwrap();
    let message = unusable(PgStore::open(&options(vec![format!("{other}?sslmode=verify-full")])).await);
    assert!(message.contains("cannot reach") && message.to_lowercase().contains("certificate"), "{message}");
}

fn log_write(account: AccountId, seq: u64, epoch: Option<u64>) -> AccountWrite {
    let mut w = AccountWrite::new(account);
    let entry = LogEntry::ReadSync { peer: AccountId(99), up_to: seq, at_ms: seq };
    w.appends.push((seq, std::sync::Arc::new(entry)));
    w.counters = Some(Counters { next_seq: seq + 1, next_outbox: 1 });
    w.epoch = epoch;
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_with_a_stale_epoch_is_refused_and_the_rest_of_its_commit_lands() {
    let pg = server();
    let urls: Vec<String> = (0..2).map(|i| pg.create_database(&format!("f{i}")).unwrap()).collect();
    let store = open(urls).await;
    let (a, b) = (AccountId(11), AccountId(12));
    let live = vec!["n1".to_string(), "n2".to_string()];
    let Acquired::Owned(old) = store.acquire(a, "n1", &live).await.unwrap() else { panic!("a was free") };
    assert_eq!(store.acquire(a, "n2", &live).await.unwrap(), Acquired::HeldBy("n1".into()), "a live owner keeps it");
    store.apply(log_write(a, 1, Some(old))).await.unwrap();
    // n1 is presumed dead: n2 takes a over with the next epoch.
    let Acquired::Owned(new) = store.acquire(a, "n2", &["n2".to_string()]).await.unwrap() else { panic!("takeover") };
    assert!(new > old);
    let Acquired::Owned(eb) = store.acquire(b, "n1", &live).await.unwrap() else { panic!("b was free") };
    // The former owner's write and a current one race into one commit.
    let (stale, fine, current) = tokio::join!(
        store.apply(log_write(a, 2, Some(old))),
        store.apply(log_write(b, 1, Some(eb))),
        store.apply(log_write(a, 2, Some(new))),
    );
    assert!(matches!(stale, Err(StoreError::Fenced)), "stale epoch refused: {stale:?}");
    fine.unwrap();
    current.unwrap();
    let log = store.read_log(a, 1, 10).await.unwrap();
    assert_eq!(log.len(), 2, "the new owner's entry, once: {log:?}");
    assert_eq!(store.read_log(b, 1, 10).await.unwrap().len(), 1);
    // Released, a is free for anyone; a release with a stale epoch is a no-op.
    store.release(a, old).await.unwrap();
    assert_eq!(store.acquire(a, "n1", &live).await.unwrap(), Acquired::HeldBy("n2".into()));
    store.release(a, new).await.unwrap();
    assert!(matches!(store.acquire(a, "n1", &live).await.unwrap(), Acquired::Owned(e) if e > new));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_make_a_membership_that_forgets_silent_nodes() {
    let pg = server();
    let store = open(vec![pg.create_database("members").unwrap()]).await;
    let first = store.beat("n1", "127.0.0.1:1", 400).await.unwrap();
    assert!(!first.lapsed && !first.draining);
    store.beat("n2", "127.0.0.1:2", 60_000).await.unwrap();
    let ids = |b: &Beat| b.live.iter().map(|n| n.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&store.beat("n2", "127.0.0.1:2", 60_000).await.unwrap()), ["n1", "n2"]);
    assert!(store.set_draining("n2", true).await.unwrap());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let later = store.beat("n2", "127.0.0.1:2", 60_000).await.unwrap();
    assert_eq!(ids(&later), ["n2"], "n1 stopped beating and is out");
    assert!(later.draining && later.live[0].draining);
    assert!(store.beat("n1", "127.0.0.1:1", 400).await.unwrap().lapsed, "n1 learns it was presumed dead");
    store.leave("n1").await.unwrap();
    assert_eq!(ids(&store.beat("n2", "127.0.0.1:2", 60_000).await.unwrap()), ["n2"]);
}
