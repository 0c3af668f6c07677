//! Snapshot files: the state machine streamed to a file, record by record, never held in
//! memory as a whole.
//!
//! ```text
//! "PLZSNAP1"                          magic, 8 bytes
//! u32 BE len, JSON SnapshotMeta       the snapshot's meta (log position, membership, id)
//! records, each starting with a tag byte:
//!   1  u32 BE len, key, u32 BE len, value      a raw state-machine pair (`b:` buckets,
//!                                              `t:` remembered transaction ids)
//!   2  u16 BE len, bucket, u32 BE len, key,    one stored entry of a key (`h:`), in key
//!      u64 BE revision, u64 BE created_ms,     order, so every key's entries are adjacent
//!      u8 op (0 put, 1 delete, 2 purge),       and its last one is its latest
//!      u32 BE len, value
//!   255 u64 BE record count, u32 BE CRC-32     end: the count of records before it and the
//!                                              CRC-32 of every byte before the CRC
//! ```
//!
//! Everything else the tree holds (`l:`, `r:`, `c:`, `x:`, `last_applied`, the membership) is
//! derived from these records and the meta when the snapshot is installed.

use std::fs::File;
use std::io::BufReader;
use std::io::BufWriter;
use std::io::Read;
use std::io::Write;
use std::path::Path;

use super::StoreError;
use crate::kv::Entry;
use crate::kv::EntryOp;
use crate::NodeId;
use crate::PloyzNode;

pub(crate) type Meta = openraft::SnapshotMeta<NodeId, PloyzNode>;

const MAGIC: &[u8; 8] = b"PLZSNAP1";
const TAG_RAW: u8 = 1;
const TAG_ENTRY: u8 = 2;
const TAG_END: u8 = 255;
const BUF: usize = 1 << 20;

/// Whether `head` (the first bytes of a snapshot) is this format rather than the JSON one
/// of releases before it.
pub(crate) fn is_binary(head: &[u8]) -> bool {
    head.starts_with(MAGIC)
}

fn bad(msg: impl Into<String>) -> StoreError {
    StoreError::Corrupt(format!("snapshot file: {}", msg.into()))
}

fn io(e: std::io::Error) -> StoreError {
    StoreError::Io(e)
}

/// Writes a snapshot file, record by record, through a 1 MiB buffer.
pub(crate) struct Writer {
    out: BufWriter<File>,
    crc: crc32fast::Hasher,
    records: u64,
    bytes: u64,
}

impl Writer {
    pub(crate) fn create(path: &Path, meta: &Meta) -> Result<Self, StoreError> {
        let file = File::create(path).map_err(io)?;
        let mut w = Writer {
            out: BufWriter::with_capacity(BUF, file),
            crc: crc32fast::Hasher::new(),
            records: 0,
            bytes: 0,
        };
        w.put(MAGIC)?;
        let meta = super::encode("snapshot meta", meta)?;
        w.len32(meta.len())?;
        w.put(&meta)?;
        Ok(w)
    }

    fn put(&mut self, b: &[u8]) -> Result<(), StoreError> {
        self.crc.update(b);
        self.bytes += b.len() as u64;
        self.out.write_all(b).map_err(io)
    }

    fn len32(&mut self, n: usize) -> Result<(), StoreError> {
        let n = u32::try_from(n).map_err(|_| bad("a field is longer than 4 GiB"))?;
        self.put(&n.to_be_bytes())
    }

    /// A raw state-machine pair.
    pub(crate) fn raw(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.put(&[TAG_RAW])?;
        self.len32(key.len())?;
        self.put(key)?;
        self.len32(value.len())?;
        self.put(value)?;
        self.records += 1;
        Ok(())
    }

    /// One stored entry.
    pub(crate) fn entry(&mut self, e: &Entry) -> Result<(), StoreError> {
        let bucket_len =
            u16::try_from(e.bucket.len()).map_err(|_| bad("bucket name longer than 64 KiB"))?;
        self.put(&[TAG_ENTRY])?;
        self.put(&bucket_len.to_be_bytes())?;
        self.put(e.bucket.as_bytes())?;
        self.len32(e.key.len())?;
        self.put(e.key.as_bytes())?;
        self.put(&e.revision.to_be_bytes())?;
        self.put(&e.created_ms.to_be_bytes())?;
        self.put(&[match e.op {
            EntryOp::Put => 0,
            EntryOp::Delete => 1,
            EntryOp::Purge => 2,
        }])?;
        self.len32(e.value.len())?;
        self.put(&e.value)?;
        self.records += 1;
        Ok(())
    }

    /// Writes the end record and makes the file durable; returns its size in bytes.
    pub(crate) fn finish(mut self) -> Result<u64, StoreError> {
        self.put(&[TAG_END])?;
        let records = self.records;
        self.put(&records.to_be_bytes())?;
        let crc = self.crc.clone().finalize();
        self.out.write_all(&crc.to_be_bytes()).map_err(io)?;
        let file = self.out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        Ok(self.bytes + 4)
    }
}

/// A record of a snapshot file.
pub(crate) enum Record {
    Raw { key: Vec<u8>, value: Vec<u8> },
    Entry(Entry),
}

/// Reads a snapshot file record by record; the end record's count and CRC are checked when
/// it is reached, so a caller must read until `None` before trusting what it read.
pub(crate) struct Reader<R: Read> {
    inp: BufReader<R>,
    crc: crc32fast::Hasher,
    records: u64,
    done: bool,
}

impl<R: Read> Reader<R> {
    /// Opens a snapshot stream positioned at its start and reads its meta.
    pub(crate) fn open(inp: R) -> Result<(Self, Meta), StoreError> {
        let mut r = Reader {
            inp: BufReader::with_capacity(BUF, inp),
            crc: crc32fast::Hasher::new(),
            records: 0,
            done: false,
        };
        let mut magic = [0u8; 8];
        r.take(&mut magic)?;
        if !is_binary(&magic) {
            return Err(bad("not a Ployz snapshot (wrong magic)"));
        }
        let len = r.u32()? as usize;
        let meta = r.bytes(len)?;
        let meta = super::decode("snapshot meta", &meta)?;
        Ok((r, meta))
    }

    fn take(&mut self, buf: &mut [u8]) -> Result<(), StoreError> {
        self.inp.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                bad("truncated")
            } else {
                io(e)
            }
        })?;
        self.crc.update(buf);
        Ok(())
    }

    fn bytes(&mut self, len: usize) -> Result<Vec<u8>, StoreError> {
        let mut v = vec![0u8; len];
        self.take(&mut v)?;
        Ok(v)
    }

    fn u8(&mut self) -> Result<u8, StoreError> {
        let mut b = [0u8; 1];
        self.take(&mut b)?;
        Ok(b[0])
    }

    fn u16(&mut self) -> Result<u16, StoreError> {
        let mut b = [0u8; 2];
        self.take(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }

    fn u32(&mut self) -> Result<u32, StoreError> {
        let mut b = [0u8; 4];
        self.take(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, StoreError> {
        let mut b = [0u8; 8];
        self.take(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    fn string(&mut self, len: usize) -> Result<String, StoreError> {
        String::from_utf8(self.bytes(len)?).map_err(|_| bad("a name is not UTF-8"))
    }

    /// The next record; `None` after the end record, whose count and CRC matched.
    pub(crate) fn next_record(&mut self) -> Result<Option<Record>, StoreError> {
        if self.done {
            return Ok(None);
        }
        let record = match self.u8()? {
            TAG_RAW => {
                let len = self.u32()? as usize;
                let key = self.bytes(len)?;
                let len = self.u32()? as usize;
                let value = self.bytes(len)?;
                Record::Raw { key, value }
            }
            TAG_ENTRY => {
                let len = self.u16()? as usize;
                let bucket = self.string(len)?;
                let len = self.u32()? as usize;
                let key = self.string(len)?;
                let revision = self.u64()?;
                let created_ms = self.u64()?;
                let op = match self.u8()? {
                    0 => EntryOp::Put,
                    1 => EntryOp::Delete,
                    2 => EntryOp::Purge,
                    other => return Err(bad(format!("unknown entry op {other}"))),
                };
                let len = self.u32()? as usize;
                let value = self.bytes(len)?;
                Record::Entry(Entry {
                    bucket,
                    key,
                    value,
                    revision,
                    created_ms,
                    op,
                })
            }
            TAG_END => {
                let records = self.u64()?;
                let expected = self.crc.clone().finalize();
                let mut crc = [0u8; 4];
                self.inp
                    .read_exact(&mut crc)
                    .map_err(|_| bad("truncated"))?;
                if u32::from_be_bytes(crc) != expected {
                    return Err(bad("CRC mismatch"));
                }
                if records != self.records {
                    return Err(bad(format!(
                        "{} records, the end record says {records}",
                        self.records
                    )));
                }
                let mut rest = [0u8; 1];
                if self.inp.read(&mut rest).map_err(io)? != 0 {
                    return Err(bad("bytes after the end record"));
                }
                self.done = true;
                return Ok(None);
            }
            other => return Err(bad(format!("unknown record tag {other}"))),
        };
        self.records += 1;
        Ok(Some(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta {
            last_log_id: None,
            last_membership: Default::default(),
            snapshot_id: "t-1".into(),
        }
    }

    fn write(path: &Path) -> u64 {
        let mut w = Writer::create(path, &meta()).unwrap();
        w.raw(b"b:a", b"{}").unwrap();
        w.entry(&Entry {
            bucket: "a".into(),
            key: "k".into(),
            value: b"v".to_vec(),
            revision: 7,
            created_ms: 9,
            op: EntryOp::Delete,
        })
        .unwrap();
        w.finish().unwrap()
    }

    fn read_all(path: &Path) -> Result<(Meta, usize), StoreError> {
        let (mut r, meta) = Reader::open(File::open(path).unwrap())?;
        let mut n = 0;
        while let Some(rec) = r.next_record()? {
            if let Record::Entry(e) = rec {
                assert_eq!((e.revision, e.created_ms, e.op), (7, 9, EntryOp::Delete));
            }
            n += 1;
        }
        Ok((meta, n))
    }

    #[test]
    fn roundtrip_and_every_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let size = write(&path);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size);
        let (m, n) = read_all(&path).unwrap();
        assert_eq!((m, n), (meta(), 2));

        let good = std::fs::read(&path).unwrap();
        // Truncated anywhere, or one byte flipped anywhere: refused.
        for cut in [10, good.len() / 2, good.len() - 1] {
            std::fs::write(&path, &good[..cut]).unwrap();
            assert!(read_all(&path).is_err(), "cut at {cut}");
        }
        for at in [good.len() / 2, good.len() - 3, good.len() - 10] {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            std::fs::write(&path, &bad).unwrap();
            assert!(read_all(&path).is_err(), "flip at {at}");
        }
        let mut longer = good.clone();
        longer.push(0);
        std::fs::write(&path, &longer).unwrap();
        assert!(read_all(&path).is_err());
    }
}
