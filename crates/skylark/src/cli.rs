//! The command-line client: `register` and `whoami`.

use anyhow::{Context, Result, bail};
use clap::Args;
use skylark_client::api::Api;
use skylark_client::e2ee::Crypto;
use skylark_client::identity::generate_key;
use skylark_client::session::Event;
use skylark_client::{ClientError, Endpoint, Identity, Session, TlsClient};
use skylark_protocol::CloseCode;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[derive(Args)]
pub struct ProfileArgs {
    /// Profile name (kept under $SKYLARK_HOME, default ~/.skylark) or a
    /// directory path; one profile per identity.
    #[arg(long, env = "SKYLARK_PROFILE", default_value = "default", global = true)]
    profile: String,
}

impl ProfileArgs {
    pub fn dir(&self) -> Result<PathBuf> {
        if self.profile.contains('/') || self.profile.contains(std::path::MAIN_SEPARATOR) {
            return Ok(PathBuf::from(&self.profile));
        }
        if self.profile.is_empty() || self.profile.starts_with('.') {
            bail!("profile name {:?} is not allowed", self.profile);
        }
        Ok(crate::skylark_home().join(&self.profile))
    }
}

#[derive(Args)]
pub struct TransportArgs {
    /// Connect over raw TCP to this address instead of WebSocket (several,
    /// comma-separated, are tried in turn).
    #[arg(long, global = true)]
    tcp: Option<String>,
    /// Use the JSON mapping on the WebSocket (for debugging).
    #[arg(long, global = true)]
    json: bool,
    /// With --tcp: the server's TCP listener speaks TLS.
    #[arg(long, global = true)]
    tls: bool,
    /// Also trust the CA certificate(s) in this PEM file, for a server with
    /// its own or a self-signed certificate (`serve --dev-tls` prints it).
    #[arg(long, env = "SKYLARK_CA", global = true)]
    ca: Option<PathBuf>,
}

/// What to trust for TLS: the web PKI roots, plus `ca` if given.
pub fn trust(ca: Option<&Path>) -> Result<TlsClient> {
    Ok(TlsClient::new(ca)?)
}

/// The HTTP API of the first of `servers` (a comma-separated list: the
/// nodes of a cluster), and the list as a profile keeps it (connections
/// try each in turn).
pub fn api_for(servers: &str, ca: Option<&Path>) -> Result<(Api, String)> {
    let list: Vec<&str> = addresses(servers).collect();
    let Some(first) = list.first() else { bail!("no server address given (--server)") };
    let api = Api::with_tls(first, &trust(ca)?)?;
    let mut kept = vec![api.base().to_owned()];
    kept.extend(list[1..].iter().map(|s| s.trim_end_matches('/').to_owned()));
    Ok((api, kept.join(",")))
}

/// The addresses of a comma-separated list (the nodes of a cluster).
pub fn addresses(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|a| !a.is_empty())
}

/// A session of a profile's device, with its end-to-end encryption ready:
/// commits a previous run left half-sent are finished, and the device's
/// published key packages are topped up when low.
pub struct Connected {
    pub session: Session,
    pub events: tokio::sync::mpsc::Receiver<skylark_client::session::Event>,
    pub crypto: Crypto,
}

pub async fn connect(profile: &Path, transport: &TransportArgs) -> Result<Connected> {
    let identity = Identity::load(profile)?;
    let endpoint = transport.endpoint(&identity)?;
    let (session, events) = open_session(&endpoint, &identity)
        .await
        .map_err(explain)
        .with_context(|| format!("connecting to {endpoint}"))?;
    let crypto = Crypto::open(profile, &identity).map_err(explain)?;
    prepare_crypto(&crypto, &session.handle()).await;
    Ok(Connected { session, events, crypto })
}

/// Finishes half-sent commits and tops up key packages. Failing that is
/// worth a warning, not the command: the next run tries again.
pub async fn prepare_crypto(crypto: &Crypto, h: &skylark_client::session::SessionHandle) {
    if let Err(e) = crypto.resume(h).await {
        eprintln!("warning: could not finish an earlier encryption change ({e}); the next command tries again");
    }
    if let Err(e) = crypto.replenish(h).await {
        eprintln!("warning: could not publish this device's encryption keys ({e}); the next command tries again");
    }
}

/// Right after `register` or `link`: publishes the new device's key
/// packages, so others can add it to encrypted groups while it is offline.
pub async fn publish_keys(profile: &Path, identity: &Identity, ca: Option<&Path>) {
    let transport = TransportArgs { tcp: None, json: false, tls: false, ca: ca.map(Path::to_owned) };
    let published = async {
        let endpoint = transport.endpoint(identity)?;
        let (session, _events) = open_session(&endpoint, identity).await.map_err(explain)?;
        let crypto = Crypto::open(profile, identity).map_err(explain)?;
        let uploaded = crypto.replenish(&session.handle()).await.map_err(explain);
        session.close().await;
        uploaded
    };
    if let Err(e) = published.await {
        eprintln!("warning: could not publish this device's encryption keys yet ({e:#}); any later command does");
    }
}

/// How long a command waits for an account the cluster is moving between
/// nodes (or a server restarting) before it gives up.
const ATTACH_PATIENCE: Duration = Duration::from_secs(20);

/// Opens a session of `identity` and waits until the server has attached it
/// to its account: the server answers a request only after that, so a ping
/// answered proves it. When the server says "try again in a moment" (its
/// account moving to another node, or the server restarting), the command
/// says so once and tries again, with growing pauses, for a while.
/// One short command's request: connects as the profile's device, asks,
/// closes the session (whatever the answer), and gives the answer in words.
pub async fn one_request<T>(
    profile: &Path,
    transport: &TransportArgs,
    ask: impl AsyncFnOnce(&skylark_client::session::SessionHandle) -> Result<T, ClientError>,
) -> Result<(Identity, T)> {
    let identity = Identity::load(profile)?;
    let (session, _events) = open_session(&transport.endpoint(&identity)?, &identity).await.map_err(explain)?;
    let answer = ask(&session.handle()).await;
    session.close().await;
    Ok((identity, answer.map_err(explain)?))
}

pub async fn open_session(
    endpoint: &Endpoint,
    identity: &Identity,
) -> Result<(Session, tokio::sync::mpsc::Receiver<Event>), ClientError> {
    let gave_up = tokio::time::Instant::now() + ATTACH_PATIENCE;
    let mut pause = Duration::from_millis(250);
    let mut told = false;
    loop {
        let error = match Session::open(endpoint, identity).await {
            Ok((session, events)) => match session.handle().ping().await {
                Ok(_) => return Ok((session, events)),
                Err(e) => {
                    session.close().await;
                    e
                }
            },
            Err(e) => e,
        };
        let passing =
            matches!(error, ClientError::Closed { code: Some(CloseCode::TryAgainLater | CloseCode::GoingAway), .. });
        if !passing || tokio::time::Instant::now() + pause > gave_up {
            return Err(error);
        }
        if !told {
            eprintln!("{error}; trying again");
            told = true;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

impl TransportArgs {
    /// Where to connect: the profile's server (or `--tcp`), each address of
    /// a comma-separated list tried in turn when there are several.
    /// The CA file given with --ca, if any.
    pub fn ca(&self) -> Option<&Path> {
        self.ca.as_deref()
    }

    pub fn endpoint(&self, identity: &Identity) -> Result<Endpoint> {
        // --ca for this command, else the one the profile keeps.
        let tls = trust(self.ca.as_deref().or(identity.ca.as_deref()))?;
        let endpoints: Vec<Endpoint> = match &self.tcp {
            Some(list) => addresses(list)
                .map(|addr| match self.tls {
                    true => Endpoint::Tls(Box::new(Endpoint::Tcp(addr.to_owned())), tls.clone()),
                    false => Endpoint::Tcp(addr.to_owned()),
                })
                .collect(),
            None => addresses(&identity.server)
                .map(|server| match Endpoint::websocket_for(server, self.json) {
                    ws @ Endpoint::WebSocket { .. } if server.starts_with("https://") => {
                        Endpoint::Tls(Box::new(ws), tls.clone())
                    }
                    ws => ws,
                })
                .collect(),
        };
        Ok(match <[Endpoint; 1]>::try_from(endpoints) {
            Ok([one]) => one,
            Err(many) if many.is_empty() => bail!("no server address (give --server or --tcp)"),
            Err(many) => Endpoint::Any(many),
        })
    }
}

async fn prompt(lines: &mut tokio::io::Lines<BufReader<tokio::io::Stdin>>, text: &str) -> Result<String> {
    let mut out = tokio::io::stdout();
    out.write_all(text.as_bytes()).await?;
    out.flush().await?;
    match lines.next_line().await? {
        Some(line) => Ok(line.trim().to_owned()),
        None => bail!("no input (stdin closed)"),
    }
}

/// Before `register` or `link` writes a new identity into `profile`: a
/// profile whose device still works is refused; one whose device was
/// removed (or whose number was registered again elsewhere) is moved aside,
/// so a dead profile never blocks starting over.
pub async fn make_room(profile: &Path, ca: Option<&Path>) -> Result<()> {
    if !profile.join("identity.json").exists() {
        return Ok(());
    }
    let identity = Identity::load(profile)?;
    let transport = TransportArgs { tcp: None, json: false, tls: false, ca: ca.map(Path::to_owned) };
    let gone = match Session::open(&transport.endpoint(&identity)?, &identity).await {
        Ok((session, _events)) => {
            session.close().await;
            false
        }
        Err(ClientError::Closed { code: Some(skylark_protocol::CloseCode::DeviceRemoved), .. }) => true,
        Err(e) => matches!(
            e.error_code(),
            Some(skylark_protocol::ErrorCode::DeviceRemoved | skylark_protocol::ErrorCode::UnknownDevice)
        ),
    };
    if !gone {
        bail!(
            "profile {} already holds device {} of {}, which still works (or its server could not be asked); \
             use another --profile, or remove that device first (`skylark devices remove {}`)",
            profile.display(),
            identity.device_id,
            identity.phone,
            identity.device_id
        );
    }
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let aside = profile.with_file_name(format!(
        "{}.removed-{secs}",
        profile.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    ));
    std::fs::rename(profile, &aside)
        .with_context(|| format!("moving the old profile {} aside to {}", profile.display(), aside.display()))?;
    println!(
        "This profile's device ({} of {}) was removed from its account, or the number was registered again \
         elsewhere; its old files are kept in {}. Starting over.",
        identity.device_id,
        identity.phone,
        aside.display()
    );
    Ok(())
}

pub async fn register(phone: &str, server: &str, name: &str, profile: &Path, ca: Option<&Path>) -> Result<()> {
    make_room(profile, ca).await?;
    let (api, servers) = api_for(server, ca)?;
    let session = api.start_verification(phone).await.map_err(explain)?;
    match session.sms.status.as_str() {
        "sent" => println!("A code was sent to {} by SMS.", session.phone),
        _ => println!(
            "Sending the code to {} failed ({}). Type `resend` to try again.",
            session.phone,
            session.sms.error.as_deref().unwrap_or("unknown error")
        ),
    }

    let key = generate_key();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    // The number's two-step verification PIN, once asked for.
    let mut pin: Option<String> = None;
    let registered = 'code: loop {
        let code = prompt(&mut lines, "Enter the 6-digit code (or `resend`): ").await?;
        if code == "resend" {
            match api.resend(&session.session_id).await {
                Ok(v) => println!("A new code was sent to {} ({}).", v.phone, v.sms.status),
                Err(e) => println!("{}", explain(e)),
            }
            continue;
        }
        // A slip (empty, too short, not digits) is not worth an attempt.
        let code: String = code.chars().filter(|c| !c.is_whitespace() && *c != '-').collect();
        if code.len() != 6 || !code.chars().all(|c| c.is_ascii_digit()) {
            println!("A code is 6 digits, as in the SMS; nothing was checked, so no attempt was used.");
            continue;
        }
        loop {
            let key_bytes = key.verifying_key().to_bytes();
            match api.verify_with_pin(&session.session_id, &code, &key_bytes, name, pin.as_deref()).await {
                Ok(registered) => break 'code registered,
                Err(ClientError::Api { error, body, .. }) if error == "wrong_code" => {
                    let left = body["attempts_left"].as_u64().unwrap_or(0);
                    if left == 0 {
                        println!("Wrong code, and that was the last attempt for it: type `resend` for a new code.");
                    } else {
                        println!("Wrong code; {} left.", skylark_core::words::count(left, "attempt", "attempts"));
                    }
                    continue 'code;
                }
                // The code was right; the number also needs its PIN.
                Err(ClientError::Api { error, message, .. })
                    if error == "registration_locked" || error == "wrong_pin" =>
                {
                    println!("{}.", upper_first(&message));
                    pin = Some(ask_pin(&mut lines).await?);
                }
                Err(e) => return Err(explain(e)),
            }
        }
    };
    let mut identity = Identity::new(servers, registered.account_id, registered.device_id, registered.phone, &key);
    identity.ca = kept_ca(ca)?;
    let path = identity.save(profile)?;
    println!(
        "Registered {} as account {}, device {} ({}). Identity saved in {}.",
        identity.phone,
        identity.account_id,
        identity.device_id,
        registered.device_name,
        path.display()
    );
    publish_keys(profile, &identity, ca).await;
    Ok(())
}

/// Asks for a two-step verification PIN until one has its form (a slip
/// costs no attempt).
async fn ask_pin(lines: &mut tokio::io::Lines<BufReader<tokio::io::Stdin>>) -> Result<String> {
    loop {
        let pin = prompt(lines, "Enter the number's 6-digit PIN: ").await?;
        if skylark_core::pin::valid_pin(pin.trim()) {
            return Ok(pin.trim().to_owned());
        }
        println!("A PIN is 6 digits; nothing was checked, so no attempt was used.");
    }
}

fn upper_first(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map(|c| c.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

pub async fn whoami(profile: &Path, transport: &TransportArgs) -> Result<()> {
    let identity = Identity::load(profile)?;
    let endpoint = transport.endpoint(&identity)?;
    let (session, _events) = open_session(&endpoint, &identity)
        .await
        .map_err(explain)
        .with_context(|| format!("connecting to {endpoint}"))?;
    let me = session.who_am_i().await.map_err(explain)?;
    println!("phone:    {}", me.phone);
    println!("account:  {}", me.account_id);
    println!("device:   {} ({})", me.device_id, me.device_name);
    // The address this connection used (the --tcp one, when given).
    println!("server:   {endpoint} (protocol v{})", session.info.version);
    session.close().await;
    Ok(())
}

/// The CA file a profile remembers: as an absolute path, so commands run
/// from any directory find it.
pub fn kept_ca(ca: Option<&Path>) -> Result<Option<PathBuf>> {
    ca.map(|p| std::path::absolute(p).with_context(|| format!("the CA file {}", p.display()))).transpose()
}

/// `profile server`: points a profile at another address of its server
/// (a new host name, TLS switched on, more nodes), and what CA to trust.
pub async fn set_server(profile: &Path, servers: &str, ca: Option<&Path>) -> Result<()> {
    let mut identity = Identity::load(profile)?;
    let (_, kept) = api_for(servers, ca.or(identity.ca.as_deref()))?;
    identity.server = kept;
    if ca.is_some() {
        identity.ca = kept_ca(ca)?;
    }
    let transport = TransportArgs { tcp: None, json: false, tls: false, ca: None };
    let endpoint = transport.endpoint(&identity)?;
    // Saved only if the device can sign in there: a typo must not strand the profile.
    match open_session(&endpoint, &identity).await {
        Ok((session, _events)) => session.close().await,
        Err(e) => {
            return Err(explain(e))
                .with_context(|| format!("this device could not sign in at {endpoint}; the profile is unchanged"));
        }
    }
    identity.save(profile)?;
    println!("Profile {} now connects to {endpoint}.", profile.display());
    if let Some(ca) = &identity.ca {
        println!("It trusts the CA in {} (besides the usual ones).", ca.display());
    }
    Ok(())
}

/// Client errors in words a person can act on.
pub fn explain(e: ClientError) -> anyhow::Error {
    // The SDK's errors are in words already (the server's own, with the
    // wait where there is one).
    anyhow::anyhow!(e)
}
