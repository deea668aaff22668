//! Encryption at rest: the envelope every sealed object uses, and the key slots that wrap a
//! repository's master keys under a password.
//!
//! ```text
//! envelope:  salt:16 nonce:12 ciphertext tag:16     AES-256-GCM under the session key of
//!                                                   `salt`; the associated data names what
//!                                                   the object is (a blob's id, "snapshot")
//! key slot:  JSON {version, kdf: {argon2id, memory_kib, iterations, parallelism, salt},
//!            wrapped: hex envelope of the 64 master-key bytes (id key, data key)}
//! ```
//!
//! A writer never seals under the data key itself: it draws a random 128-bit salt, derives a
//! session key from the data key and the salt (BLAKE3's key derivation), and numbers its
//! objects with a counter as the nonce. Nonces then never repeat under one key, however many
//! objects a fleet seals (a random 96-bit nonce under one key, AES-GCM's usual use, is safe
//! only up to about 2^32 objects, which a fleet passes in days), and AES-GCM runs at ring's
//! speed (8.9 GiB/s on one core of the reference machine, against 1.1 GiB/s for
//! XChaCha20-Poly1305, whose random nonces would need no counter; docs/PERFORMANCE.md). No I/O
//! and no randomness here: callers pass the salts and counters in.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use serde::{Deserialize, Serialize};

use crate::id::{from_hex, to_hex};
use crate::{Error, RepoKey, Result};

/// Bytes of the salt naming an envelope's session key.
pub const SALT_LEN: usize = 16;
/// Bytes of an envelope's nonce.
pub const NONCE_LEN: usize = 12;
/// Bytes of an envelope's authentication tag.
pub const TAG_LEN: usize = 16;
/// What sealing adds to an object.
pub const OVERHEAD: usize = SALT_LEN + NONCE_LEN + TAG_LEN;

/// The key from which a repository's session keys are derived.
#[derive(Clone)]
pub struct DataKey([u8; 32]);

impl DataKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The session key of `salt`.
    pub fn session(&self, salt: [u8; SALT_LEN]) -> SessionKey {
        let mut material = [0u8; 32 + SALT_LEN];
        material[..32].copy_from_slice(&self.0);
        material[32..].copy_from_slice(&salt);
        let key = blake3::derive_key("cbcr 2026 session key", &material);
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).expect("32 bytes is an AES-256 key"));
        SessionKey { salt, key }
    }
}

/// One writer's key: seals objects numbered by a counter the caller never repeats.
pub struct SessionKey {
    salt: [u8; SALT_LEN],
    key: LessSafeKey,
}

impl SessionKey {
    pub fn salt(&self) -> [u8; SALT_LEN] {
        self.salt
    }

    /// Appends the envelope of `plain` to `out`; `counter` must differ for every call on this
    /// session key.
    pub fn seal(&self, counter: u64, aad: &[u8], plain: &[u8], out: &mut Vec<u8>) {
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..8].copy_from_slice(&counter.to_le_bytes());
        out.reserve(OVERHEAD + plain.len());
        out.extend_from_slice(&self.salt);
        out.extend_from_slice(&nonce);
        let start = out.len();
        out.extend_from_slice(plain);
        let tag = self
            .key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut out[start..])
            .expect("AES-256-GCM seals any length a blob may have");
        out.extend_from_slice(tag.as_ref());
    }

    /// Appends the plaintext of envelope `sealed` (of this session key: see [`salt_of`]) to
    /// `out`; on failure `out` is as it was.
    pub fn open(&self, what: &'static str, aad: &[u8], sealed: &[u8], out: &mut Vec<u8>) -> Result<()> {
        if sealed.len() < OVERHEAD {
            return Err(Error::Truncated { what, need: OVERHEAD as u64, have: sealed.len() as u64 });
        }
        if sealed[..SALT_LEN] != self.salt {
            return Err(Error::Authentication { what });
        }
        let nonce: [u8; NONCE_LEN] = sealed[SALT_LEN..SALT_LEN + NONCE_LEN].try_into().expect("sliced to length");
        let start = out.len();
        out.extend_from_slice(&sealed[SALT_LEN + NONCE_LEN..]);
        let opened = self
            .key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut out[start..])
            .map(|p| p.len());
        match opened {
            Ok(len) => {
                out.truncate(start + len);
                Ok(())
            }
            Err(_) => {
                out.truncate(start);
                Err(Error::Authentication { what })
            }
        }
    }
}

/// The salt naming the session key an envelope was sealed under, if it is long enough to be one.
pub fn salt_of(sealed: &[u8]) -> Option<[u8; SALT_LEN]> {
    sealed.get(..SALT_LEN)?.try_into().ok()
}

/// A repository's two keys: one names blobs (keyed BLAKE3), one seals objects.
#[derive(Clone)]
pub struct MasterKeys {
    pub id: RepoKey,
    pub data: DataKey,
}

impl MasterKeys {
    pub fn from_bytes(bytes: &[u8; 64]) -> Self {
        let (id, data) = bytes.split_at(32);
        Self {
            id: RepoKey::from_bytes(id.try_into().expect("32 bytes")),
            data: DataKey::from_bytes(data.try_into().expect("32 bytes")),
        }
    }

    fn to_bytes(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        out[..32].copy_from_slice(self.id.as_bytes());
        out[32..].copy_from_slice(&self.data.0);
        out
    }
}

/// Argon2id's cost, stored in each slot so it can be raised for new slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl KdfParams {
    /// What new slots use: 64 MiB, 3 passes, one lane (about 0.2 s on one core of the
    /// reference machine; docs/PERFORMANCE.md).
    pub const DEFAULT: Self = Self { memory_kib: 64 << 10, iterations: 3, parallelism: 1 };

    /// Bounds a slot read from a store may ask for, so a planted slot cannot make an open
    /// allocate or spin without limit.
    fn check(&self) -> Result<()> {
        let ok = (8 << 10..=4 << 20).contains(&self.memory_kib)
            && (1..=64).contains(&self.iterations)
            && (1..=16).contains(&self.parallelism);
        if ok {
            Ok(())
        } else {
            Err(Error::Corrupt { what: "key slot", detail: format!("KDF parameters out of range: {self:?}") })
        }
    }

    fn derive(&self, secret: &[u8], salt: &[u8]) -> Result<[u8; 32]> {
        self.check()?;
        let params = argon2::Params::new(self.memory_kib, self.iterations, self.parallelism, Some(32))
            .map_err(|e| Error::Corrupt { what: "key slot", detail: format!("KDF parameters: {e}") })?;
        let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut kek = [0u8; 32];
        argon
            .hash_password_into(secret, salt, &mut kek)
            .map_err(|e| Error::Corrupt { what: "key slot", detail: format!("KDF: {e}") })?;
        Ok(kek)
    }
}

/// `REPO/keys/<name>` of an encrypted repository: the master keys wrapped under a key derived
/// from one password (or a KMS's secret). Several slots open the same repository.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySlot {
    pub version: u32,
    pub kdf: Kdf,
    /// Hex of the envelope of the 64 master-key bytes.
    pub wrapped: String,
    /// RFC 3339, UTC: when the slot was added (for `key list`).
    pub created: String,
    /// Who added it (host and user), for `key list`.
    pub label: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kdf {
    /// Always `argon2id`.
    pub algorithm: String,
    #[serde(flatten)]
    pub params: KdfParams,
    /// Hex of [`SALT_LEN`] bytes.
    pub salt: String,
}

/// The version field of a key slot.
pub const SLOT_VERSION: u32 = 2;
const SLOT_AAD: &[u8] = b"cbcr key slot";

impl KeySlot {
    /// Wraps `keys` under `secret`.
    /// Wraps `keys` under `secret`; `salt` (random) salts both the KDF and the envelope.
    pub fn wrap(
        keys: &MasterKeys,
        secret: &[u8],
        params: KdfParams,
        salt: [u8; SALT_LEN],
        created: String,
        label: String,
    ) -> Result<Self> {
        let kek = DataKey::from_bytes(params.derive(secret, &salt)?).session(salt);
        let mut wrapped = Vec::new();
        kek.seal(0, SLOT_AAD, &keys.to_bytes(), &mut wrapped);
        Ok(Self {
            version: SLOT_VERSION,
            kdf: Kdf { algorithm: "argon2id".into(), params, salt: to_hex(&salt) },
            wrapped: to_hex(&wrapped),
            created,
            label,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        crate::codec::to_json(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        crate::codec::check_version("key slot", bytes, SLOT_VERSION..=SLOT_VERSION)?;
        let slot: Self = crate::codec::from_json("key slot", bytes)?;
        let corrupt = |detail: &str| Error::Corrupt { what: "key slot", detail: detail.into() };
        if slot.kdf.algorithm != "argon2id" {
            return Err(corrupt(&format!("unknown KDF {:?}", slot.kdf.algorithm)));
        }
        slot.kdf.params.check()?;
        if from_hex(&slot.kdf.salt).is_none_or(|s| s.len() != SALT_LEN) {
            return Err(corrupt("the salt is not 16 bytes of hex"));
        }
        if from_hex(&slot.wrapped).is_none_or(|w| w.len() != OVERHEAD + 64) {
            return Err(corrupt(&format!("the wrapped keys are not {} bytes of hex", OVERHEAD + 64)));
        }
        Ok(slot)
    }

    /// The master keys, if `secret` is this slot's password (an `Authentication` error if not).
    pub fn unwrap(&self, secret: &[u8]) -> Result<MasterKeys> {
        let salt: [u8; SALT_LEN] = from_hex(&self.kdf.salt).and_then(|s| s.try_into().ok()).unwrap_or_default();
        let wrapped = from_hex(&self.wrapped).unwrap_or_default();
        let kek = DataKey::from_bytes(self.kdf.params.derive(secret, &salt)?).session(salt);
        let mut plain = Vec::with_capacity(64);
        kek.open("key slot", SLOT_AAD, &wrapped, &mut plain)?;
        let bytes: [u8; 64] = plain
            .try_into()
            .map_err(|_| Error::Corrupt { what: "key slot", detail: "the wrapped keys are not 64 bytes".into() })?;
        Ok(MasterKeys::from_bytes(&bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CHEAP: KdfParams = KdfParams { memory_kib: 8 << 10, iterations: 1, parallelism: 1 };

    fn keys(n: u8) -> MasterKeys {
        MasterKeys::from_bytes(&[n; 64])
    }

    #[test]
    fn a_slot_opens_with_its_password_only() {
        let slot = KeySlot::wrap(&keys(7), b"hunter2", CHEAP, [1; 16], "t".into(), "l".into()).unwrap();
        let decoded = KeySlot::decode(&slot.encode()).unwrap();
        assert_eq!(decoded, slot);
        let opened = decoded.unwrap(b"hunter2").unwrap();
        assert_eq!(opened.to_bytes(), keys(7).to_bytes());
        assert!(matches!(decoded.unwrap(b"hunter3"), Err(Error::Authentication { .. })));
    }

    #[test]
    fn a_slot_asking_for_unbounded_work_is_refused() {
        let mut slot = KeySlot::wrap(&keys(1), b"pw", CHEAP, [1; 16], "t".into(), "l".into()).unwrap();
        slot.kdf.params.memory_kib = u32::MAX;
        assert!(KeySlot::decode(&slot.encode()).is_err());
        slot.kdf.params = CHEAP;
        slot.kdf.params.iterations = 1_000_000;
        assert!(KeySlot::decode(&slot.encode()).is_err());
    }

    proptest! {
        #[test]
        fn envelopes_round_trip_and_any_change_fails(plain in proptest::collection::vec(any::<u8>(), 0..2000), flip in any::<usize>(), salt in any::<[u8; 16]>(), counter in any::<u64>()) {
            let key = keys(3).data.session(salt);
            let mut sealed = Vec::new();
            key.seal(counter, b"aad", &plain, &mut sealed);
            prop_assert_eq!(sealed.len(), plain.len() + OVERHEAD);
            prop_assert_eq!(salt_of(&sealed), Some(salt));
            let mut out = vec![9];
            key.open("blob", b"aad", &sealed, &mut out).unwrap();
            prop_assert_eq!(&out[1..], &plain[..]);
            let mut bad = sealed.clone();
            let at = flip % bad.len();
            bad[at] ^= 1 << (flip % 8);
            let mut out = vec![9];
            prop_assert!(key.open("blob", b"aad", &bad, &mut out).is_err());
            prop_assert_eq!(out, vec![9], "nothing is appended on failure");
            prop_assert!(key.open("blob", b"other", &sealed, &mut Vec::new()).is_err());
            prop_assert!(keys(4).data.session(salt).open("blob", b"aad", &sealed, &mut Vec::new()).is_err());
            prop_assert!(key.open("blob", b"aad", &sealed[..sealed.len().min(OVERHEAD) - 1], &mut Vec::new()).is_err());
        }

        #[test]
        fn garbage_never_opens_and_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let key = keys(5).data.session([0; 16]);
            prop_assert!(key.open("blob", b"", &bytes, &mut Vec::new()).is_err());
        }

        #[test]
        fn key_slot_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = KeySlot::decode(&bytes);
            let mut json = br#"{"version":2,"kdf":"#.to_vec();
            json.extend_from_slice(&bytes);
            let _ = KeySlot::decode(&json);
        }
    }
}
