//! Content addresses: the sha256 of a blob, computed while it streams.

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::ArchiveError;

/// A blob's content address. Written and parsed as `sha256:<64 lowercase
/// hex digits>`, the form stored and sent on the wire.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BlobDigest([u8; 32]);

/// A blob's digest and its length in bytes, as [`HashingWriter`] saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlobInfo {
    pub digest: BlobDigest,
    pub size: u64,
}

const PREFIX: &str = "sha256:";

impl BlobDigest {
    /// The digest of a blob already in memory; streams go through
    /// [`HashingWriter`] instead.
    pub fn of(bytes: &[u8]) -> Self {
        BlobDigest(Sha256::digest(bytes).into())
    }

    /// The 64 lowercase hex digits, without the `sha256:` prefix (for file
    /// names in a blob store).
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for BlobDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", self.hex())
    }
}

impl fmt::Debug for BlobDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobDigest({self})")
    }
}

impl FromStr for BlobDigest {
    type Err = ArchiveError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || ArchiveError::InvalidDigest {
            text: text.to_owned(),
        };
        let digits = text.strip_prefix(PREFIX).ok_or_else(invalid)?;
        // `hex` also accepts upper case; one spelling per digest keeps
        // string comparisons and store keys unambiguous.
        let lowercase_hex = |c: u8| c.is_ascii_digit() || (b'a'..=b'f').contains(&c);
        if digits.len() != 64 || !digits.bytes().all(lowercase_hex) {
            return Err(invalid());
        }
        let mut bytes = [0; 32];
        hex::decode_to_slice(digits, &mut bytes).map_err(|_| invalid())?;
        Ok(BlobDigest(bytes))
    }
}

impl TryFrom<String> for BlobDigest {
    type Error = ArchiveError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<BlobDigest> for String {
    fn from(digest: BlobDigest) -> String {
        digest.to_string()
    }
}

/// A [`Write`] adapter that hashes and counts exactly the bytes the inner
/// writer accepted, so an upload and its digest come from one pass.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            size: 0,
        }
    }

    /// The inner writer (not flushed: flush before calling this if it
    /// buffers) and what passed through.
    pub fn finish(self) -> (W, BlobInfo) {
        let info = BlobInfo {
            digest: BlobDigest(self.hasher.finalize().into()),
            size: self.size,
        };
        (self.inner, info)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.hasher.update(&buf[..written]);
        self.size += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The digest and size of a file, read in a stream.
pub fn sha256_file(path: &Path) -> Result<BlobInfo, ArchiveError> {
    let context = || format!("hashing `{}`", path.display());
    let mut file = File::open(path).map_err(|e| ArchiveError::io(context(), e))?;
    let mut hashing = HashingWriter::new(io::sink());
    io::copy(&mut file, &mut hashing).map_err(|e| ArchiveError::io(context(), e))?;
    Ok(hashing.finish().1)
}

#[cfg(test)]
mod tests {
    use super::*;

    // sha256 of "abc", from FIPS 180-2.
    const ABC: &str = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn hashing_writer_matches_known_digest_and_counts_bytes() {
        let mut hashing = HashingWriter::new(Vec::new());
        hashing.write_all(b"a").unwrap();
        hashing.write_all(b"bc").unwrap();
        let (inner, info) = hashing.finish();
        assert_eq!(inner, b"abc");
        assert_eq!(info.size, 3);
        assert_eq!(info.digest.to_string(), ABC);
        assert_eq!(info.digest, BlobDigest::of(b"abc"));
    }

    #[test]
    fn sha256_file_streams_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, b"abc").unwrap();
        let info = sha256_file(&path).unwrap();
        assert_eq!((info.digest.to_string().as_str(), info.size), (ABC, 3));
        let missing = sha256_file(&dir.path().join("nope")).unwrap_err();
        assert!(missing.to_string().contains("nope"), "{missing}");
    }

    #[test]
    fn parse_accepts_only_the_canonical_form() {
        let digest: BlobDigest = ABC.parse().unwrap();
        assert_eq!(digest.to_string(), ABC);
        assert_eq!(digest.hex(), &ABC[7..]);
        // serde goes through these two conversions.
        assert_eq!(String::from(digest), ABC);
        assert_eq!(BlobDigest::try_from(ABC.to_owned()).unwrap(), digest);

        let bad = [
            "",
            &ABC[7..],             // no prefix
            &ABC[..ABC.len() - 1], // 63 digits
            &format!("{ABC}0"),    // 65 digits
            &ABC.to_uppercase(),   // upper-case prefix and digits
            &format!("sha256:{}", &ABC[7..].to_uppercase()),
            &format!("sha256:{}", ABC[7..].replace('a', "g")), // not hex
            &ABC.replace("sha256", "sha512"),
        ];
        for text in bad {
            let err = text.parse::<BlobDigest>().unwrap_err();
            assert!(
                err.to_string().contains("64 lowercase hex"),
                "{text}: {err}"
            );
        }
    }
}
