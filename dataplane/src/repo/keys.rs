//! A repository's keys: how its objects are sealed ([`Sealing`]: plaintext, or AES-256-GCM
//! envelopes), and the key objects under `keys/` they come from (password slots, or a
//! plaintext repository's key file).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use wire::crypto::{salt_of, KdfParams, KeySlot, MasterKeys, SessionKey, SALT_LEN};
use wire::repo::{Encryption, KeyFile, RepoConfig};
use wire::RepoKey;

use crate::error::{Error, Result};
use crate::store::{ObjectKind, Store};

/// A password, or a key command's secret.
pub type Secret = Vec<u8>;

/// A password file's secret: its first line, without the line end.
pub fn first_line(mut bytes: Vec<u8>) -> Secret {
    if let Some(end) = bytes.iter().position(|&b| b == b'\n') {
        bytes.truncate(end);
    }
    if bytes.last() == Some(&b'\r') {
        bytes.pop();
    }
    bytes
}

/// Asked for the secret only when a repository needs one (an encrypted one).
pub type PasswordSource<'a> = &'a dyn Fn() -> Result<Secret>;

/// Associated data of a sealed snapshot record.
pub(crate) const SNAPSHOT_AAD: &[u8] = b"cbcr snapshot";

/// How objects whose content comes from a source (blobs, snapshot records) are stored.
pub(crate) trait Sealing: Send + Sync {
    /// The stored form of `plain`: `plain` itself, or its envelope written into `scratch`.
    fn seal<'a>(&self, aad: &[u8], plain: &'a [u8], scratch: &'a mut Vec<u8>) -> Result<&'a [u8]>;
    /// The plaintext of `stored`: itself, or opened into `scratch`; `what` names it in errors.
    fn open<'a>(
        &self,
        what: &'static str,
        aad: &[u8],
        stored: &'a [u8],
        scratch: &'a mut OpenScratch,
    ) -> wire::Result<&'a [u8]>;
    /// A new password slot for these keys: its object name and bytes.
    fn new_slot(&self, secret: &[u8]) -> Result<(String, Vec<u8>)>;
    /// Whether objects can be opened here (a receiver serving an encrypted repository without
    /// its password cannot).
    fn holds_keys(&self) -> bool;
}

/// Version-1 repositories and `init --insecure-no-encryption`.
struct Plaintext;

impl Sealing for Plaintext {
    fn seal<'a>(&self, _aad: &[u8], plain: &'a [u8], _scratch: &'a mut Vec<u8>) -> Result<&'a [u8]> {
        Ok(plain)
    }

    fn open<'a>(&self, _: &'static str, _: &[u8], stored: &'a [u8], _: &'a mut OpenScratch) -> wire::Result<&'a [u8]> {
        Ok(stored)
    }

    fn new_slot(&self, _secret: &[u8]) -> Result<(String, Vec<u8>)> {
        Err(Error::Usage("this repository is not encrypted (created with --insecure-no-encryption, or by a cbcr before encryption): it has no password slots".into()))
    }

    fn holds_keys(&self) -> bool {
        true
    }
}

/// An encrypted repository opened without its password: a receiver that stores and serves
/// sealed objects as they are and never opens one.
struct Locked;

const LOCKED: &str = "this process holds no key for the encrypted repository (a receiver started without its password)";

impl Sealing for Locked {
    fn seal<'a>(&self, _aad: &[u8], _plain: &'a [u8], _scratch: &'a mut Vec<u8>) -> Result<&'a [u8]> {
        Err(Error::Usage(LOCKED.into()))
    }

    fn open<'a>(&self, what: &'static str, _: &[u8], _: &'a [u8], _: &'a mut OpenScratch) -> wire::Result<&'a [u8]> {
        Err(wire::Error::Corrupt { what, detail: LOCKED.into() })
    }

    fn new_slot(&self, _secret: &[u8]) -> Result<(String, Vec<u8>)> {
        Err(Error::Usage(LOCKED.into()))
    }

    fn holds_keys(&self) -> bool {
        false
    }
}

/// The keys of an encrypted repository opened without its password: none. Its id key is never
/// used (such a repository writes no blob and verifies nothing), so it is zero.
pub(crate) fn locked() -> Unlocked {
    Unlocked { key: RepoKey::from_bytes([0; 32]), sealing: Arc::new(Locked), slot: None }
}

/// What one reader keeps between opens: the plaintext buffer, and the session keys of the
/// envelopes opened last, most recent first (an incremental's blobs come from the sessions of
/// a few backups, so deriving one is rare).
#[derive(Default)]
pub(crate) struct OpenScratch {
    buf: Vec<u8>,
    keys: Vec<SessionKey>,
}

/// Session keys one reader keeps: deriving one takes 0.59 µs, as long as opening 2.4 KiB
/// (measured with ring and BLAKE3 on the reference machine).
const SESSION_KEYS_KEPT: usize = 16;

/// An encrypted repository's keys and this process's session: every object it seals is
/// numbered by one counter under one session key drawn at open.
struct Sealed {
    master: MasterKeys,
    session: SessionKey,
    counter: AtomicU64,
}

impl Sealed {
    fn new(master: MasterKeys) -> Self {
        let session = master.data.session(random());
        Self { master, session, counter: AtomicU64::new(0) }
    }
}

impl Sealing for Sealed {
    fn seal<'a>(&self, aad: &[u8], plain: &'a [u8], scratch: &'a mut Vec<u8>) -> Result<&'a [u8]> {
        scratch.clear();
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.session.seal(n, aad, plain, scratch);
        Ok(scratch)
    }

    fn open<'a>(
        &self,
        what: &'static str,
        aad: &[u8],
        stored: &'a [u8],
        scratch: &'a mut OpenScratch,
    ) -> wire::Result<&'a [u8]> {
        let salt = salt_of(stored).ok_or(wire::Error::Truncated {
            what,
            need: wire::crypto::OVERHEAD as u64,
            have: stored.len() as u64,
        })?;
        let OpenScratch { buf, keys } = scratch;
        buf.clear();
        if salt == self.session.salt() {
            self.session.open(what, aad, stored, buf)?;
            return Ok(buf);
        }
        match keys.iter().position(|k| k.salt() == salt) {
            Some(0) => {}
            Some(at) => keys[..=at].rotate_right(1),
            None => {
                keys.truncate(SESSION_KEYS_KEPT - 1);
                keys.insert(0, self.master.data.session(salt));
            }
        }
        keys[0].open(what, aad, stored, buf)?;
        Ok(buf)
    }

    fn new_slot(&self, secret: &[u8]) -> Result<(String, Vec<u8>)> {
        let created = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let user = std::env::var("USER").unwrap_or_else(|_| "?".into());
        let label = format!("{user}@{}", crate::source::hostname());
        let slot = KeySlot::wrap(&self.master, secret, KdfParams::DEFAULT, random::<SALT_LEN>(), created, label)
            .map_err(|e| Error::Internal(format!("wrapping the keys: {e}")))?;
        Ok((wire::id::to_hex(&random::<8>()), slot.encode()))
    }

    fn holds_keys(&self) -> bool {
        true
    }
}

fn random<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    getrandom::getrandom(&mut out).expect("the OS random source works");
    out
}

/// A repository's keys, once opened.
pub(crate) struct Unlocked {
    pub(crate) key: RepoKey,
    pub(crate) sealing: Arc<dyn Sealing>,
    /// The slot the password opened, if encrypted.
    pub(crate) slot: Option<String>,
}

/// The keys of a plaintext repository whose id key is `key`.
pub(crate) fn plaintext(key: RepoKey) -> Unlocked {
    Unlocked { key, sealing: Arc::new(Plaintext), slot: None }
}

/// New keys for a repository being created: encrypted under `secret`, or (with `None`) a
/// plaintext one. Returns the keys, the config's `encryption`, and the key object to store.
pub(crate) fn create(secret: Option<&[u8]>) -> Result<(Unlocked, Encryption, (String, Vec<u8>))> {
    let master = MasterKeys::from_bytes(&random());
    let key = master.id.clone();
    match secret {
        Some(secret) => {
            let sealed = Sealed::new(master);
            let (name, bytes) = sealed.new_slot(secret)?;
            let unlocked = Unlocked { key, sealing: Arc::new(sealed), slot: Some(name.clone()) };
            Ok((unlocked, Encryption::Aes256Gcm, (name, bytes)))
        }
        None => {
            let object = (key.key_id(), KeyFile::encode(&key));
            Ok((plaintext(key), Encryption::None, object))
        }
    }
}

/// The key objects of the repository in `store`, by name: the key file of a plaintext
/// repository, or every password slot of an encrypted one.
pub(crate) fn key_objects(store: &dyn Store, config: &RepoConfig) -> Result<Vec<(String, Vec<u8>)>> {
    let location = store.location();
    let names = match config.encryption {
        Encryption::None => vec![config.key_id.clone()],
        Encryption::Aes256Gcm => store.list(ObjectKind::Key)?.into_iter().map(|o| o.name).collect(),
    };
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        match store.get(ObjectKind::Key, &name)? {
            Some(bytes) => out.push((name, bytes)),
            None => {
                return Err(Error::Integrity(format!(
                    "{location}/{}: the repository's key is missing",
                    ObjectKind::Key.key(&name)
                )))
            }
        }
    }
    Ok(out)
}

/// Opens the keys of a repository with this config from its key objects, asking `password`
/// for the secret when it is encrypted. `location` names it in errors.
pub(crate) fn unlock(
    location: &str,
    config: &RepoConfig,
    objects: Vec<(String, Vec<u8>)>,
    password: PasswordSource<'_>,
) -> Result<Unlocked> {
    let at = |name: &str| std::path::PathBuf::from(format!("{location}/{}", ObjectKind::Key.key(name)));
    let mismatch =
        |name: &str| Error::Integrity(format!("{}: key does not match the repository config", at(name).display()));
    if config.encryption == Encryption::None {
        let (name, bytes) =
            objects.into_iter().next().ok_or_else(|| Error::Integrity(format!("{location}: no key")))?;
        let key = KeyFile::decode(&bytes).map_err(|e| Error::format(&at(&name), e))?;
        if key.key_id() != config.key_id {
            return Err(mismatch(&name));
        }
        return Ok(plaintext(key));
    }
    let secret = password()?;
    let mut tried = 0;
    let mut damaged = None;
    for (name, bytes) in &objects {
        let slot = match KeySlot::decode(bytes) {
            Ok(slot) => slot,
            Err(e) => {
                damaged.get_or_insert_with(|| Error::format(&at(name), e));
                continue;
            }
        };
        tried += 1;
        match slot.unwrap(&secret) {
            Ok(master) if master.id.key_id() == config.key_id => {
                let key = master.id.clone();
                return Ok(Unlocked { key, sealing: Arc::new(Sealed::new(master)), slot: Some(name.clone()) });
            }
            Ok(_) => return Err(mismatch(name)),
            Err(wire::Error::Authentication { .. }) => {}
            Err(e) => {
                damaged.get_or_insert_with(|| Error::format(&at(name), e));
            }
        }
    }
    match (tried, damaged) {
        (0, Some(e)) => Err(e),
        (0, None) => Err(Error::Integrity(format!("{location}: the repository has no key slots"))),
        _ => Err(Error::WrongPassword(location.into(), tried)),
    }
}
