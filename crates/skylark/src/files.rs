//! Attachments in the CLI: `send --file` encrypts and uploads a file (with
//! a progress bar) and sends what reads it inside the message; `listen`
//! downloads, checks and decrypts what arrives and saves it to a folder.

use crate::cli::{TransportArgs, api_for};
use anyhow::{Context, Result, bail};
use skylark_client::Identity;
use skylark_client::content::{Content, FileRef};
use skylark_client::e2ee::Shown;
use skylark_client::media::{Transfer, mime_of, open, seal, size_words};
use skylark_client::session::SessionHandle;
use skylark_protocol::v1::{self, event::Body};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A progress bar on stderr while a transfer runs (a terminal only; a log
/// gets one line when it is done).
struct Bar {
    label: String,
    tty: bool,
    drawn: Option<Instant>,
}

impl Bar {
    fn new(label: String) -> Bar {
        Bar { label, tty: std::io::IsTerminal::is_terminal(&std::io::stderr()), drawn: None }
    }

    fn update(&mut self, done: u64, total: u64) {
        if !self.tty || self.drawn.is_some_and(|t| t.elapsed() < Duration::from_millis(100) && done < total) {
            return;
        }
        self.drawn = Some(Instant::now());
        const WIDTH: u64 = 30;
        let filled = (done * WIDTH).checked_div(total).unwrap_or(WIDTH) as usize;
        let percent = (done * 100).checked_div(total).unwrap_or(100);
        let bar = format!("{}{}", "█".repeat(filled), "░".repeat(WIDTH as usize - filled));
        let mut err = std::io::stderr();
        let _ = write!(err, "\r{} {bar} {percent:>3}% {} of {}", self.label, size_words(done), size_words(total));
        let _ = err.flush();
    }

    fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

/// The session's media token and the HTTP API to use it on.
async fn transfer_api(
    h: &SessionHandle,
    identity: &Identity,
    transport: &TransportArgs,
) -> Result<(v1::MediaToken, skylark_client::api::Api)> {
    let token = h.media_token().await.map_err(crate::cli::explain)?;
    let (api, _) = api_for(&identity.server, transport.ca().or(identity.ca.as_deref()))?;
    Ok((token, api))
}

/// Encrypts and uploads the file at `path` (with a progress bar on a
/// terminal, when `bar`); returns what a message carries.
pub async fn upload(
    h: &SessionHandle,
    identity: &Identity,
    transport: &TransportArgs,
    path: &Path,
    bar: bool,
) -> Result<FileRef> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a file; give the path of the file to send", path.display());
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".to_owned());
    let (token, api) = transfer_api(h, identity, transport).await?;
    if meta.len() > token.max_upload_bytes {
        bail!(
            "{name} is {}; this server takes files up to {}, so nothing was sent",
            size_words(meta.len()),
            size_words(token.max_upload_bytes)
        );
    }
    let plain = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let sealed = seal(&plain);
    let mut progress = Bar::new(format!("⬆ {name}"));
    progress.tty &= bar;
    let id = Transfer::new(&api, &token.token)
        .upload(&sealed.ciphertext, &mut |done, total| progress.update(done, total))
        .await
        .map_err(crate::cli::explain)?;
    progress.finish();
    let mime = mime_of(&name);
    let mut file = sealed.reference(&id, &name, mime, plain.len() as u64);
    file.thumb = thumbnail(&plain, mime);
    Ok(file)
}

/// The longest preview carried in a message (a data: URL), in bytes.
const THUMB_MAX: usize = 24_000;

/// A small JPEG preview (at most 160 px a side) of a PNG or JPEG picture,
/// as a `data:` URL; `None` for anything else, or a picture that does not
/// decode.
fn thumbnail(bytes: &[u8], mime: &str) -> Option<String> {
    use base64::Engine;
    if !matches!(mime, "image/png" | "image/jpeg") {
        return None;
    }
    let small = image::load_from_memory(bytes).ok()?.thumbnail(160, 160).to_rgb8();
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 60).encode_image(&small).ok()?;
    let url = format!("data:image/jpeg;base64,{}", base64::engine::general_purpose::STANDARD.encode(jpeg));
    (url.len() <= THUMB_MAX).then_some(url)
}

/// Downloads, checks and decrypts `file` into `dir` (under a name not
/// taken yet); returns where it went.
pub async fn save(
    h: &SessionHandle,
    identity: &Identity,
    transport: &TransportArgs,
    file: &FileRef,
    dir: &Path,
) -> Result<PathBuf> {
    let (token, api) = transfer_api(h, identity, transport).await?;
    let mut bar = Bar::new(format!("⬇ {}", file.name));
    let ciphertext = Transfer::new(&api, &token.token)
        .download(&file.id, &mut |done, total| bar.update(done, total))
        .await
        .map_err(crate::cli::explain)?;
    bar.finish();
    let plain = open(file, &ciphertext)?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = free_name(dir, &safe_name(&file.name));
    std::fs::write(&path, plain).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// A sender's file name reduced to one harmless path component.
fn safe_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let cleaned: String = base.chars().filter(|c| !c.is_control()).collect();
    let cleaned = cleaned.trim().trim_start_matches('.').to_owned();
    if cleaned.is_empty() { "file".to_owned() } else { cleaned }
}

/// `name` in `dir`, or `name (2)`, `name (3)`… when taken.
fn free_name(dir: &Path, name: &str) -> PathBuf {
    let first = dir.join(name);
    if !first.exists() {
        return first;
    }
    let (stem, ext) = match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => (stem.to_owned(), format!(".{ext}")),
        _ => (name.to_owned(), String::new()),
    };
    (2..).map(|n| dir.join(format!("{stem} ({n}){ext}"))).find(|p| !p.exists()).unwrap_or(first)
}

/// The file a log entry brings from someone else, if any (not one deleted,
/// edited or sent by this account).
pub fn incoming_file(event: &v1::Event, me: u64, open: &dyn Fn(&v1::Event) -> Option<Shown>) -> Option<FileRef> {
    let text = match event.body.as_ref()? {
        Body::Message(m) => {
            let sender = m.id.map(|id| id.sender).unwrap_or_default();
            if sender == me || m.purged || m.deletes.is_some() {
                return None;
            }
            String::from_utf8_lossy(&m.payload).into_owned()
        }
        Body::Group(g) => {
            let Some(v1::group_event::Body::Message(m)) = &g.body else { return None };
            if g.by == me || m.purged || m.deletes.is_some() {
                return None;
            }
            match open(event)? {
                Shown::Encrypted(text) | Shown::Plain(text) => text,
                _ => return None,
            }
        }
        _ => return None,
    };
    match Content::parse(&text) {
        Content::File { file, .. } => Some(file),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_picture_gets_a_small_jpeg_preview_and_other_files_none() {
        use base64::Engine;
        let picture = image::RgbImage::from_fn(400, 300, |x, y| image::Rgb([x as u8, y as u8, 128]));
        let mut png = std::io::Cursor::new(Vec::new());
        picture.write_to(&mut png, image::ImageFormat::Png).unwrap();
        let url = thumbnail(png.get_ref(), "image/png").expect("a preview");
        let jpeg = base64::engine::general_purpose::STANDARD
            .decode(url.strip_prefix("data:image/jpeg;base64,").expect("a JPEG data URL"))
            .unwrap();
        let preview = image::load_from_memory(&jpeg).unwrap();
        assert_eq!((preview.width(), preview.height()), (160, 120));
        assert_eq!(thumbnail(b"not a picture", "image/png"), None);
        assert_eq!(thumbnail(png.get_ref(), "application/pdf"), None);
    }

    #[test]
    fn a_senders_file_name_cannot_leave_the_folder() {
        assert_eq!(safe_name("../../.bashrc"), "bashrc");
        assert_eq!(safe_name("C:\\x\\photo.jpg"), "photo.jpg");
        assert_eq!(safe_name(""), "file");
        assert_eq!(safe_name("a\nb.txt"), "ab.txt");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "1").unwrap();
        assert_eq!(free_name(dir.path(), "a.txt"), dir.path().join("a (2).txt"));
        assert_eq!(free_name(dir.path(), "b.txt"), dir.path().join("b.txt"));
    }
}
