//! A bounds-checked cursor for the variable-length encodings (trees, chunk lists), and the JSON
//! helpers of the records (config, snapshots, key slots).

use serde::{Deserialize, Serialize};

use crate::Error;

pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, pos: 0, what }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let have = self.buf.len() - self.pos;
        if n > have {
            return Err(Error::Truncated { what: self.what, need: n as u64, have: have as u64 });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.array::<1>()?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub(crate) fn i64(&mut self) -> Result<i64, Error> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    /// Checks the 4-byte magic and the version field that open every variable-length encoding.
    pub(crate) fn preamble(&mut self, magic: &[u8; 4], version: u16) -> Result<(), Error> {
        if &self.array::<4>()? != magic {
            return Err(Error::BadMagic { what: self.what });
        }
        let found = self.u16()?;
        if found != version {
            return Err(Error::UnsupportedVersion { what: self.what, found: found.into(), supported: version.into() });
        }
        if self.u16()? != 0 {
            return Err(self.corrupt("reserved bytes are not zero".into()));
        }
        Ok(())
    }

    /// A count of records of at least `min_record` bytes each, checked against the limit and
    /// against the bytes left, so that a corrupt count can't make the caller over-allocate.
    pub(crate) fn count(&mut self, limit: u32, min_record: usize) -> Result<usize, Error> {
        let n = self.u32()?;
        if n > limit {
            return Err(self.corrupt(format!("{n} entries, more than the limit {limit}")));
        }
        let need = n as usize * min_record;
        if need > self.remaining() {
            return Err(Error::Truncated { what: self.what, need: need as u64, have: self.remaining() as u64 });
        }
        Ok(n as usize)
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn finish(self) -> Result<(), Error> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(self.corrupt(format!("{n} trailing bytes"))),
        }
    }

    pub(crate) fn corrupt(&self, detail: String) -> Error {
        Error::Corrupt { what: self.what, detail }
    }
}

pub(crate) fn preamble(out: &mut Vec<u8>, magic: &[u8; 4], version: u16) {
    out.extend_from_slice(magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
}

/// A JSON record (config, snapshot, key slot) as stored: pretty, one trailing newline.
pub(crate) fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(v).expect("plain structs always serialize");
    out.push(b'\n');
    out
}

pub(crate) fn from_json<T: for<'de> Deserialize<'de>>(what: &'static str, bytes: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupt { what, detail: e.to_string() })
}

/// Reads only the version first, so a newer format is reported as such, not as a field error.
pub(crate) fn check_version(
    what: &'static str,
    bytes: &[u8],
    supported: std::ops::RangeInclusive<u32>,
) -> Result<u32, Error> {
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let v: Versioned = from_json(what, bytes)?;
    if !supported.contains(&v.version) {
        return Err(Error::UnsupportedVersion { what, found: v.version, supported: *supported.end() });
    }
    Ok(v.version)
}
