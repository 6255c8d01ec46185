//! Attachments from the client's side: encrypt a file with a fresh key,
//! upload the ciphertext resumably (tus 1.0), and the reverse.
//!
//! The server stores and serves only ciphertext; what reads it — the
//! blob's id, its key, the digest of its ciphertext, its name and type, a
//! thumbnail — travels in the (end-to-end encrypted) message as a
//! [`FileRef`] (`skylark_client::content`'s `file` content).
//!
//! Encryption: AES-256-GCM with a random 32-byte key and a random 12-byte
//! nonce per file; the digest is SHA-256 of the ciphertext (tag included),
//! checked before decrypting, so a file the server (or anyone between)
//! altered is refused in words. The web client (`web/app.js`) does the
//! same with WebCrypto.

use crate::ClientError;
use crate::api::Api;
use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::time::Duration;

/// A file as a message carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// The blob's id on the server.
    pub id: String,
    /// AES-256-GCM key and nonce, base64.
    pub key: String,
    pub iv: String,
    /// SHA-256 of the ciphertext, base64.
    pub sha256: String,
    /// The file's size in bytes (before encryption).
    pub size: u64,
    /// Its name as the sender had it (no directories).
    pub name: String,
    /// Its media type, such as `image/jpeg` or `audio/webm`.
    pub mime: String,
    /// A small preview image made by the sender (a `data:` URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumb: Option<String>,
    /// A voice note recorded in the app (played inline).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub voice: bool,
    /// Length of a voice note or video, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ms: Option<u64>,
}

/// Why an attachment could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FileError {
    #[error("the downloaded file does not match its digest: it was altered or damaged on the way; nothing was saved")]
    DigestMismatch,
    #[error("the file's key does not open it: the message or the file is damaged; nothing was saved")]
    Undecryptable,
    #[error("the message's file description is damaged ({0})")]
    BadRef(&'static str),
}

/// A file encrypted for upload.
#[derive(Debug)]
pub struct Sealed {
    pub ciphertext: Vec<u8>,
    pub key: [u8; 32],
    pub iv: [u8; 12],
    pub sha256: [u8; 32],
}

impl Sealed {
    /// The reference a message carries, once uploaded as `id`.
    pub fn reference(&self, id: &str, name: &str, mime: &str, size: u64) -> FileRef {
        FileRef {
            id: id.to_owned(),
            key: BASE64.encode(self.key),
            iv: BASE64.encode(self.iv),
            sha256: BASE64.encode(self.sha256),
            size,
            name: name.to_owned(),
            mime: mime.to_owned(),
            thumb: None,
            voice: false,
            ms: None,
        }
    }
}

/// Encrypts `plain` with a fresh key.
pub fn seal(plain: &[u8]) -> Sealed {
    use rand::RngCore;
    let mut key = [0u8; 32];
    let mut iv = [0u8; 12];
    rand::rng().fill_bytes(&mut key);
    rand::rng().fill_bytes(&mut iv);
    let cipher = Aes256Gcm::new_from_slice(&key).expect("a 32-byte key");
    let ciphertext = cipher.encrypt(Nonce::from_slice(&iv), plain).expect("AES-GCM encrypts any length we allow");
    let sha256 = Sha256::digest(&ciphertext).into();
    Sealed { ciphertext, key, iv, sha256 }
}

/// Checks the digest of `ciphertext`, then decrypts it.
pub fn open(file: &FileRef, ciphertext: &[u8]) -> Result<Vec<u8>, FileError> {
    let decode = |field: &str, what: &'static str, len: usize| -> Result<Vec<u8>, FileError> {
        BASE64.decode(field).ok().filter(|b| b.len() == len).ok_or(FileError::BadRef(what))
    };
    let digest = decode(&file.sha256, "digest", 32)?;
    let key = decode(&file.key, "key", 32)?;
    let iv = decode(&file.iv, "nonce", 12)?;
    if Sha256::digest(ciphertext).as_slice() != digest.as_slice() {
        return Err(FileError::DigestMismatch);
    }
    let cipher = Aes256Gcm::new_from_slice(&key).map_err(|_| FileError::BadRef("key"))?;
    cipher.decrypt(Nonce::from_slice(&iv), ciphertext).map_err(|_| FileError::Undecryptable)
}

/// A media type for a file name, by its extension.
pub fn mime_of(name: &str) -> &'static str {
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mp3" => "audio/mpeg",
        "ogg" | "opus" => "audio/ogg",
        "m4a" => "audio/mp4",
        "wav" => "audio/wav",
        "pdf" => "application/pdf",
        "txt" => "text/plain",
        "zip" => "application/zip",
        _ => "application/octet-stream",
    }
}

/// A size in words: "512 bytes", "3.2 MB".
pub fn size_words(bytes: u64) -> String {
    match bytes {
        b if b < 1_000 => format!("{b} bytes"),
        b if b < 1_000_000 => format!("{:.1} kB", b as f64 / 1e3),
        b if b < 1_000_000_000 => format!("{:.1} MB", b as f64 / 1e6),
        b => format!("{:.2} GB", b as f64 / 1e9),
    }
}

/// Bytes sent per PATCH: the points an interrupted upload resumes from.
pub const CHUNK: usize = 4 << 20;
/// Attempts at one chunk (or the download) before giving up.
const ATTEMPTS: u32 = 5;

/// An upload refused for starting too many at once waits for the server's
/// `Retry-After` when it is at most this many seconds…
const UPLOAD_WAIT_SECS: u64 = 10;

/// …at most this many times (at the default limit, an upload each 2 s
/// once 30 were started, enough for 90 more: a 1,024-device group's start
/// uploads about 64).
pub const UPLOAD_WAITS: u32 = 60;

/// Uploads and downloads with one media token.
#[derive(Debug)]
pub struct Transfer<'a> {
    api: &'a Api,
    token: String,
}

fn api_error(status: u16, body: &[u8], retry_after_secs: Option<u64>) -> ClientError {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
    let text = |k: &str| value.get(k).and_then(serde_json::Value::as_str).unwrap_or_default().to_owned();
    let message = match text("message") {
        m if m.is_empty() => format!("the server answered HTTP {status}"),
        m => m,
    };
    ClientError::Api { status, error: text("error"), message, retry_after_secs, body: value }
}

/// Whether trying again may help (the connection broke, or the server
/// was briefly unavailable).
fn transient(e: &ClientError) -> bool {
    matches!(e, ClientError::Io(_)) || matches!(e, ClientError::Api { status: 502..=504, .. })
}

impl<'a> Transfer<'a> {
    /// `token` from `GetMediaToken` on the device's connection.
    pub fn new(api: &'a Api, token: &str) -> Transfer<'a> {
        Transfer { api, token: token.to_owned() }
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.api.base()))
            .header("authorization", format!("Bearer {}", self.token));
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let request = request.body(http_body_util::Full::new(body)).map_err(|e| ClientError::Io(e.to_string()))?;
        self.api.client().request(request).await.map_err(|e| ClientError::Io(crate::api::error_chain(&e)))
    }

    /// Fails with the server's words unless the answer is `want`.
    async fn expect(
        response: hyper::Response<hyper::body::Incoming>,
        want: &[u16],
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let status = response.status().as_u16();
        if want.contains(&status) {
            return Ok(response);
        }
        let retry_after =
            response.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        Err(api_error(status, &body, retry_after))
    }

    fn header_u64(response: &hyper::Response<hyper::body::Incoming>, name: &str) -> Option<u64> {
        response.headers().get(name)?.to_str().ok()?.parse().ok()
    }

    /// Starts an upload of `length` bytes; returns its id.
    /// Started faster than the server's limit of uploads per account
    /// allows (a large group's commits, many files at once), it waits as
    /// long as the server says, when that is a few seconds, up to
    /// [`UPLOAD_WAITS`] times.
    pub async fn create(&self, length: u64) -> Result<String, ClientError> {
        let headers = [("tus-resumable", "1.0.0".to_owned()), ("upload-length", length.to_string())];
        let mut waits = 0;
        let response = loop {
            let answer = self.request("POST", "/v1/uploads", &headers, Bytes::new()).await?;
            match Self::expect(answer, &[201]).await {
                Ok(response) => break response,
                // (Not the daily quota: that one is said at once.)
                Err(ClientError::Api { status: 429, error, retry_after_secs: Some(secs), .. })
                    if error == "rate_limited" && secs <= UPLOAD_WAIT_SECS && waits < UPLOAD_WAITS =>
                {
                    waits += 1;
                    tokio::time::sleep(Duration::from_secs(secs.max(1))).await;
                }
                Err(e) => return Err(e),
            }
        };
        let location = response.headers().get("location").and_then(|v| v.to_str().ok()).unwrap_or_default();
        location
            .rsplit('/')
            .next()
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| ClientError::Protocol("an upload was created without a Location".to_owned()))
    }

    /// How far upload `id` got.
    pub async fn offset(&self, id: &str) -> Result<u64, ClientError> {
        let headers = [("tus-resumable", "1.0.0".to_owned())];
        let response =
            Self::expect(self.request("HEAD", &format!("/v1/uploads/{id}"), &headers, Bytes::new()).await?, &[200])
                .await?;
        Self::header_u64(&response, "upload-offset")
            .ok_or_else(|| ClientError::Protocol("an upload's offset was missing".to_owned()))
    }

    /// Sends `bytes` (the whole upload) from wherever upload `id` stands,
    /// in chunks, resuming after a broken connection; `progress` hears
    /// (sent, total) after each chunk.
    pub async fn resume(
        &self,
        id: &str,
        bytes: &[u8],
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<(), ClientError> {
        let total = bytes.len() as u64;
        let mut offset = self.offset(id).await?;
        progress(offset, total);
        let mut failures = 0;
        while offset < total {
            let end = (offset as usize + CHUNK).min(bytes.len());
            let chunk = Bytes::copy_from_slice(&bytes[offset as usize..end]);
            let headers = [
                ("tus-resumable", "1.0.0".to_owned()),
                ("upload-offset", offset.to_string()),
                ("content-type", "application/offset+octet-stream".to_owned()),
            ];
            let sent = async {
                let response = self.request("PATCH", &format!("/v1/uploads/{id}"), &headers, chunk).await?;
                let response = Self::expect(response, &[204]).await?;
                Self::header_u64(&response, "upload-offset")
                    .ok_or_else(|| ClientError::Protocol("a PATCH answer had no Upload-Offset".to_owned()))
            }
            .await;
            match sent {
                Ok(next) => {
                    offset = next;
                    failures = 0;
                    progress(offset, total);
                }
                Err(e)
                    if (transient(&e) || matches!(e, ClientError::Api { status: 409, .. })) && failures < ATTEMPTS =>
                {
                    failures += 1;
                    tokio::time::sleep(Duration::from_millis(200 << failures)).await;
                    offset = self.offset(id).await?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Uploads `bytes`; returns the blob's id.
    pub async fn upload(
        &self,
        bytes: &[u8],
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<String, ClientError> {
        let id = self.create(bytes.len() as u64).await?;
        self.resume(&id, bytes, progress).await?;
        Ok(id)
    }

    /// Downloads blob `id`, resuming with a byte range after a broken
    /// connection; `progress` hears (received, total).
    pub async fn download(
        &self,
        id: &str,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<Vec<u8>, ClientError> {
        let mut out: Vec<u8> = Vec::new();
        let mut total: Option<u64> = None;
        let mut failures = 0;
        loop {
            let headers: Vec<(&str, String)> =
                if out.is_empty() { Vec::new() } else { vec![("range", format!("bytes={}-", out.len()))] };
            let attempt = async {
                let response = self.request("GET", &format!("/v1/blobs/{id}"), &headers, Bytes::new()).await?;
                let response = Self::expect(response, &[200, 206]).await?;
                if response.status().as_u16() == 200 {
                    // A whole answer (first attempt, or a server ignoring the range).
                    out.clear();
                    total = Self::header_u64(&response, "content-length");
                } else if total.is_none() {
                    total = response
                        .headers()
                        .get("content-range")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.rsplit('/').next()?.parse().ok());
                }
                let mut body = response.into_body();
                while let Some(frame) = body.frame().await {
                    let frame = frame.map_err(|e| ClientError::Io(crate::api::error_chain(&e)))?;
                    if let Ok(data) = frame.into_data() {
                        out.extend_from_slice(&data);
                        progress(out.len() as u64, total.unwrap_or(0));
                    }
                }
                Ok::<(), ClientError>(())
            }
            .await;
            match attempt {
                Ok(()) if total.is_none_or(|t| out.len() as u64 >= t) => return Ok(out),
                Ok(()) => failures += 1,
                Err(e) if transient(&e) && failures < ATTEMPTS => failures += 1,
                Err(e) => return Err(e),
            }
            if failures > ATTEMPTS {
                return Err(ClientError::Io("the download kept breaking off; try again later".to_owned()));
            }
            tokio::time::sleep(Duration::from_millis(200 << failures)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_file_opens_with_its_reference_and_not_when_altered() {
        let plain = b"a photo's bytes".repeat(1000);
        let sealed = seal(&plain);
        assert_ne!(sealed.ciphertext[..plain.len()], plain[..], "the ciphertext is not the plaintext");
        let file = sealed.reference("00112233445566778899aabbccddeeff", "photo.jpg", "image/jpeg", plain.len() as u64);
        assert_eq!(open(&file, &sealed.ciphertext).unwrap(), plain);
        let mut altered = sealed.ciphertext.clone();
        altered[10] ^= 1;
        assert_eq!(open(&file, &altered), Err(FileError::DigestMismatch));
        let other = seal(&plain);
        let wrong_key = FileRef { key: BASE64.encode(other.key), ..file.clone() };
        assert_eq!(open(&wrong_key, &sealed.ciphertext), Err(FileError::Undecryptable));
        assert_eq!(open(&FileRef { key: "x".into(), ..file }, &sealed.ciphertext), Err(FileError::BadRef("key")));
    }

    #[test]
    fn sizes_and_types_read_as_people_expect() {
        assert_eq!(size_words(512), "512 bytes");
        assert_eq!(size_words(3_200_000), "3.2 MB");
        assert_eq!(mime_of("IMG_001.JPG"), "image/jpeg");
        assert_eq!(mime_of("notes"), "application/octet-stream");
    }
}
