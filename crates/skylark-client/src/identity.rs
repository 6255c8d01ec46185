//! A device's identity: its Ed25519 key, ids and server, kept in a profile
//! directory as `identity.json` (readable by its owner only).

use crate::ClientError;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signer, SigningKey};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const FILE: &str = "identity.json";

#[derive(Clone, Serialize, Deserialize)]
pub struct Identity {
    /// The server's HTTP base URL, such as `http://127.0.0.1:7480`.
    pub server: String,
    pub account_id: u64,
    pub device_id: u64,
    pub phone: String,
    /// Base64 of the 32-byte Ed25519 secret key.
    secret_key: String,
    /// A CA certificate file (PEM) to trust for this server, besides the
    /// web PKI roots (a server with its own or a self-signed certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// The key, once made from `secret_key`: making it derives the public
    /// key, which costs as much as a signature.
    #[serde(skip)]
    key: OnceLock<SigningKey>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret key stays out of logs and panics.
        f.debug_struct("Identity")
            .field("server", &self.server)
            .field("account_id", &self.account_id)
            .field("device_id", &self.device_id)
            .field("phone", &self.phone)
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

/// A fresh device key from the operating system's random source.
pub fn generate_key() -> SigningKey {
    let mut seed = [0u8; 32];
    rand::rng().fill_bytes(&mut seed);
    SigningKey::from_bytes(&seed)
}

impl Identity {
    pub fn new(server: String, account_id: u64, device_id: u64, phone: String, key: &SigningKey) -> Self {
        let secret_key = BASE64.encode(key.to_bytes());
        Self { server, account_id, device_id, phone, secret_key, ca: None, key: OnceLock::from(key.clone()) }
    }

    pub fn signing_key(&self) -> Result<SigningKey, ClientError> {
        if let Some(key) = self.key.get() {
            return Ok(key.clone());
        }
        let bytes = BASE64.decode(&self.secret_key).map_err(|e| ClientError::Profile(format!("bad key: {e}")))?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| ClientError::Profile("key is not 32 bytes".into()))?;
        Ok(self.key.get_or_init(|| SigningKey::from_bytes(&bytes)).clone())
    }

    /// Signs the authentication transcript for a challenge.
    pub fn sign_challenge(&self, server_id: &[u8], nonce: &[u8]) -> Result<Vec<u8>, ClientError> {
        let transcript = skylark_protocol::auth_transcript(server_id, nonce, self.device_id);
        Ok(self.signing_key()?.sign(&transcript).to_bytes().to_vec())
    }

    pub fn load(profile: &Path) -> Result<Identity, ClientError> {
        let path = profile.join(FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            ClientError::Profile(format!(
                "no identity at {} ({e}); run `skylark register +<number>` first",
                path.display()
            ))
        })?;
        serde_json::from_str(&text).map_err(|e| ClientError::Profile(format!("{} is corrupt: {e}", path.display())))
    }

    /// Writes the identity atomically (temporary file, then rename), with
    /// owner-only permissions on Unix.
    pub fn save(&self, profile: &Path) -> Result<PathBuf, ClientError> {
        let fail = |e: std::io::Error| ClientError::Profile(format!("cannot write {}: {e}", profile.display()));
        std::fs::create_dir_all(profile).map_err(fail)?;
        let path = profile.join(FILE);
        let tmp = profile.join(format!("{FILE}.tmp"));
        let text = serde_json::to_string_pretty(self).map_err(|e| ClientError::Profile(e.to_string()))?;
        {
            use std::io::Write;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            let mut file = options.open(&tmp).map_err(fail)?;
            file.write_all(text.as_bytes()).map_err(fail)?;
            file.sync_all().map_err(fail)?;
        }
        std::fs::rename(&tmp, &path).map_err(fail)?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_and_load_round_trip() {
        let dir = std::env::temp_dir().join(format!("skylark-identity-test-{}", std::process::id()));
        let key = generate_key();
        let id = Identity::new("http://127.0.0.1:1".into(), 3, 4, "+15550000000".into(), &key);
        id.save(&dir).unwrap();
        let loaded = Identity::load(&dir).unwrap();
        assert_eq!(loaded.signing_key().unwrap().to_bytes(), key.to_bytes());
        assert_eq!((loaded.account_id, loaded.device_id), (3, 4));
        assert!(!format!("{loaded:?}").contains(&loaded.secret_key), "debug output hides the key");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join(FILE)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
