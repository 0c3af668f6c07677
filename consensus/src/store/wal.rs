//! The Raft log's write-ahead files: numbered segment files of checksummed records, written in
//! place into space that was zero-filled and synced when the segment was made, and made durable
//! with `fdatasync`.
//!
//! Why not a database: a flush of sled (our previous log) cost 360–570 µs on this hardware,
//! most of the 1-client write latency; `fdatasync` after overwriting blocks that are already
//! allocated and written costs ~100 µs, because it changes no file-system metadata (no journal
//! commit). Appending to a growing file, or writing into `fallocate`d (unwritten) extents, does.
//!
//! Layout of `raft-wal/`:
//!
//! * `{first:020}.wal`: a segment whose first record has index `first`. It starts with a
//!   16-byte header, the magic `PLZWAL1\0` and `prev: u64 LE`, the index that came next in the
//!   log when the segment was started (so a missing segment file is told from a gap the log
//!   really had). Records follow with no gaps between them and contiguous indexes. Only the
//!   last segment is written to; a segment is synced before the next one is started.
//! * `spare.tmp`: the next segment, being zero-filled in the background; removed at open.
//!
//! A record is a 16-byte header, `len: u32 LE`, `crc: u32 LE` (CRC-32 of the index bytes and
//! the payload), `index: u64 LE`, then `len` payload bytes. Payloads are never empty, so a zero
//! header is the end of a segment's records.
//!
//! Raft appends contiguous indexes. Only openraft's storage suite appends past a gap; the gap
//! then starts a segment (whose `prev` records it).
//!
//! Invariants:
//! * Past the last record of a segment there are only zeros. At open, a last segment whose
//!   records end in a torn or damaged record (a crash during a write nobody was told was
//!   durable) is cut there and zeroed to its end, so a stale record can never reappear past a
//!   newer, shorter one; `truncate` zeroes what it removes the same way, synced before it
//!   returns.
//! * A damaged record anywhere but at the end of the last segment, a gap between segments or a
//!   record out of index order is corruption: open refuses, it does not guess.

use std::fs::File;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;

use super::StoreError;

/// Default size of a segment file.
pub(crate) const SEGMENT_BYTES: u64 = 8 << 20;
const HEADER: usize = 16;
const MAGIC: &[u8; 8] = b"PLZWAL1\0";
/// The segment header's length: records start here.
const START: u64 = 16;
const SPARE: &str = "spare.tmp";
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

struct Segment {
    first: u64,
    /// The index that came next when this segment was started.
    prev: u64,
    path: PathBuf,
    file: Arc<File>,
    /// The file's length.
    size: u64,
    /// Where each record starts: record `first + i` at `offsets[i]`.
    offsets: Vec<u64>,
    /// The first byte past the last record.
    end: u64,
}

impl Segment {
    fn next_index(&self) -> u64 {
        self.first + self.offsets.len() as u64
    }

    fn last_index(&self) -> Option<u64> {
        (!self.offsets.is_empty()).then(|| self.next_index() - 1)
    }
}

/// The segment files of one log. Not synchronized: the log store holds it behind a mutex.
pub(crate) struct Wal {
    dir: PathBuf,
    segment_bytes: u64,
    /// Ordered, contiguous; the last one is written to.
    segments: Vec<Segment>,
    /// Indexes below this were purged: never read, though their segment may still hold them.
    floor: u64,
    /// The next segment, being zero-filled in the background.
    spare: Option<std::thread::JoinHandle<io::Result<()>>>,
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.wal")
}

fn corrupt(path: &Path, what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!(
        "log segment {}: {what}; restore this node from a snapshot or re-join it",
        path.display()
    ))
}

fn crc(index: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&index.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// A record header's `(len, crc, index)`; `h` holds at least [`HEADER`] bytes.
fn header(h: &[u8]) -> (usize, u32, u64) {
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    let index = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
    (len as usize, crc, index)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes zeros over `[from, to)` of `file`.
fn zero(file: &File, mut from: u64, to: u64) -> io::Result<()> {
    while from < to {
        let n = (to - from).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], from)?;
        from += n as u64;
    }
    Ok(())
}

/// Creates `path` as a zero-filled, synced file of `size` bytes.
fn make_zeroed(path: &Path, size: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    zero(&file, 0, size)?;
    file.sync_all()?;
    Ok(file)
}

impl Wal {
    /// Opens the log in `dir` (created if missing), recovering from a crash as the module
    /// docs say. Indexes below `floor` count as purged.
    pub(crate) fn open(dir: &Path, segment_bytes: u64, floor: u64) -> Result<Wal, StoreError> {
        std::fs::create_dir_all(dir)?;
        let mut firsts = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name == SPARE {
                std::fs::remove_file(entry.path())?;
            } else if let Some(first) = name.strip_suffix(".wal") {
                let first = first
                    .parse::<u64>()
                    .map_err(|_| corrupt(&entry.path(), "file name is not an index"))?;
                firsts.push(first);
            }
        }
        firsts.sort_unstable();
        let mut segments: Vec<Segment> = Vec::with_capacity(firsts.len());
        let count = firsts.len();
        for (i, first) in firsts.into_iter().enumerate() {
            let path = dir.join(segment_name(first));
            let seg = Self::scan(path, first, i + 1 == count)?;
            if let Some(prev) = segments.last() {
                if prev.next_index() != seg.prev || seg.first < seg.prev {
                    return Err(corrupt(
                        &seg.path,
                        format_args!(
                            "was started after index {} and at {}, but the previous segment \
                             ends before {} (a segment file is missing or out of place)",
                            seg.prev,
                            seg.first,
                            prev.next_index()
                        ),
                    ));
                }
            }
            segments.push(seg);
        }
        Ok(Wal {
            dir: dir.to_path_buf(),
            segment_bytes,
            segments,
            floor,
            spare: None,
        })
    }

    /// Reads a segment's records. In the last segment the records end at the first torn or
    /// damaged one, and whatever follows is zeroed; elsewhere that is corruption.
    fn scan(path: PathBuf, first: u64, last: bool) -> Result<Segment, StoreError> {
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let bytes = std::fs::read(&path)?;
        let size = bytes.len() as u64;
        if bytes.get(..8) != Some(MAGIC.as_slice()) {
            return Err(corrupt(&path, "not a log segment (bad magic)"));
        }
        let prev = u64::from_le_bytes(bytes[8..16].try_into().unwrap_or_default());
        let mut offsets = Vec::new();
        let mut at = START as usize;
        let mut damaged = None;
        while at + HEADER <= bytes.len() {
            let head = &bytes[at..at + HEADER];
            if head.iter().all(|&b| b == 0) {
                break;
            }
            let (len, sum, index) = header(head);
            let expected = first + offsets.len() as u64;
            let body = at + HEADER;
            let problem = if len == 0 || body + len > bytes.len() {
                Some(format!("record at byte {at} has a bad length {len}"))
            } else if crc(index, &bytes[body..body + len]) != sum {
                Some(format!("record at byte {at} fails its checksum"))
            } else if index != expected {
                Some(format!(
                    "record at byte {at} has index {index}, expected {expected}"
                ))
            } else {
                None
            };
            if let Some(problem) = problem {
                damaged = Some(problem);
                break;
            }
            offsets.push(at as u64);
            at = body + len;
        }
        let end = at as u64;
        let dirty = bytes[at..].iter().any(|&b| b != 0);
        if dirty {
            if !last {
                let problem = damaged.unwrap_or_else(|| format!("non-zero bytes after {at}"));
                return Err(corrupt(&path, problem));
            }
            tracing::warn!(
                segment = %path.display(),
                problem = damaged.as_deref().unwrap_or("stale bytes"),
                records = offsets.len(),
                "log ends in a torn write; cutting it there"
            );
            zero(&file, end, size)?;
            file.sync_data()?;
        }
        Ok(Segment {
            first,
            prev,
            path,
            file: Arc::new(file),
            size,
            offsets,
            end,
        })
    }

    /// The lowest readable index and the highest, if any record is readable.
    pub(crate) fn bounds(&self) -> Option<(u64, u64)> {
        let first = self.segments.first()?.first.max(self.floor);
        let last = self.last_index()?;
        (first <= last).then_some((first, last))
    }

    /// The file appends go to, for a sync; every other segment is already synced.
    pub(crate) fn active(&self) -> Option<Arc<File>> {
        self.segments.last().map(|s| s.file.clone())
    }

    fn next_index(&self) -> Option<u64> {
        self.segments.last().map(Segment::next_index)
    }

    /// The index of the last record, purged or not.
    pub(crate) fn last_index(&self) -> Option<u64> {
        self.segments.iter().rev().find_map(Segment::last_index)
    }

    /// Appends records; the first must follow the last record (any index if the log is empty)
    /// and the rest each other. Written, not yet durable: sync [`Wal::active`] for that.
    pub(crate) fn append<'a>(
        &mut self,
        records: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) -> Result<(), StoreError> {
        let mut buf: Vec<u8> = Vec::new();
        let mut starts: Vec<u64> = Vec::new();
        let mut next = self.next_index();
        for (index, payload) in records {
            let gap = match next {
                Some(n) if index < n => {
                    self.write_out(&mut buf, &mut starts)?;
                    return Err(StoreError::Corrupt(format!(
                        "log append of index {index} where {n} is next (truncate first)"
                    )));
                }
                Some(n) => index > n,
                None => false,
            };
            let len = u32::try_from(payload.len())
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "log entry {index} of {} bytes: must be 1 byte to 4 GiB",
                        payload.len()
                    ))
                })?;
            let need = (HEADER + payload.len()) as u64;
            let fits = self
                .segments
                .last()
                .is_some_and(|s| s.end + buf.len() as u64 + need <= s.size);
            if gap || !fits {
                self.write_out(&mut buf, &mut starts)?;
                self.roll(index, need)?;
            }
            let end = self.segments.last().map_or(0, |s| s.end);
            starts.push(end + buf.len() as u64);
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&crc(index, payload).to_le_bytes());
            buf.extend_from_slice(&index.to_le_bytes());
            buf.extend_from_slice(payload);
            next = Some(index + 1);
        }
        self.write_out(&mut buf, &mut starts)?;
        self.prepare_spare();
        Ok(())
    }

    /// Writes the buffered records at the end of the last segment.
    fn write_out(&mut self, buf: &mut Vec<u8>, starts: &mut Vec<u64>) -> Result<(), StoreError> {
        if buf.is_empty() {
            return Ok(());
        }
        let seg = self
            .segments
            .last_mut()
            .ok_or_else(|| StoreError::Corrupt("log write with no segment".into()))?;
        if let Err(e) = seg.file.write_all_at(buf, seg.end) {
            // Keep "only zeros past the last record" if we can; open cuts a torn record anyway.
            let _ = zero(&seg.file, seg.end, seg.end + buf.len() as u64);
            return Err(e.into());
        }
        seg.end += buf.len() as u64;
        seg.offsets.append(starts);
        buf.clear();
        Ok(())
    }

    /// Starts a segment whose first record is `first` and that has room for `need` bytes,
    /// after syncing the one before it.
    fn roll(&mut self, first: u64, need: u64) -> Result<(), StoreError> {
        let prev = match self.segments.last() {
            // An empty segment (a crash right after it was made, or a record too big for it):
            // the new one takes its place, and its name if they start at the same index.
            Some(seg) if seg.offsets.is_empty() => {
                let prev = seg.prev;
                if seg.first != first {
                    std::fs::remove_file(&seg.path)?;
                }
                self.segments.pop();
                prev
            }
            Some(seg) => {
                seg.file.sync_data()?;
                seg.next_index()
            }
            None => first,
        };
        let size = self.segment_bytes.max(need + START);
        let spare = self.dir.join(SPARE);
        let ready = match self.spare.take() {
            Some(h) => matches!(h.join(), Ok(Ok(()))) && size == self.segment_bytes,
            None => false,
        };
        let file = match ready {
            true => OpenOptions::new().read(true).write(true).open(&spare)?,
            false => make_zeroed(&spare, size)?,
        };
        let mut header = [0u8; START as usize];
        header[..8].copy_from_slice(MAGIC);
        header[8..].copy_from_slice(&prev.to_le_bytes());
        file.write_all_at(&header, 0)?;
        file.sync_data()?;
        let path = self.dir.join(segment_name(first));
        std::fs::rename(&spare, &path)?;
        sync_dir(&self.dir)?;
        self.segments.push(Segment {
            first,
            prev,
            path,
            file: Arc::new(file),
            size,
            offsets: Vec::new(),
            end: START,
        });
        Ok(())
    }

    /// Once the last segment is half full, zero-fills the next one in the background.
    fn prepare_spare(&mut self) {
        let half_full = self.segments.last().is_some_and(|s| s.end > s.size / 2);
        if half_full && self.spare.is_none() {
            let (path, size) = (self.dir.join(SPARE), self.segment_bytes);
            self.spare = Some(std::thread::spawn(move || {
                make_zeroed(&path, size).map(drop)
            }));
        }
    }

    /// The payloads of the readable records with index in `[start, end)`.
    pub(crate) fn read(&self, start: u64, end: u64) -> Result<Vec<Vec<u8>>, StoreError> {
        self.read_raw(start.max(self.floor), end)
    }

    /// The payload of record `index`, purged or not.
    pub(crate) fn read_any(&self, index: u64) -> Result<Vec<u8>, StoreError> {
        self.read_raw(index, index.saturating_add(1))?
            .pop()
            .ok_or_else(|| StoreError::Corrupt(format!("log has no record {index}")))
    }

    fn read_raw(&self, start: u64, end: u64) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut out = Vec::new();
        for seg in &self.segments {
            let (s, e) = (start.max(seg.first), end.min(seg.next_index()));
            if s >= e {
                continue;
            }
            let from = seg.offsets[(s - seg.first) as usize];
            let to = match seg.offsets.get((e - seg.first) as usize) {
                Some(&at) => at,
                None => seg.end,
            };
            let mut bytes = vec![0u8; (to - from) as usize];
            seg.file.read_exact_at(&mut bytes, from)?;
            let mut at = 0usize;
            for index in s..e {
                let head = bytes
                    .get(at..at + HEADER)
                    .ok_or_else(|| corrupt(&seg.path, format_args!("record {index} is cut")))?;
                let (len, sum, got) = header(head);
                let payload = bytes
                    .get(at + HEADER..at + HEADER + len)
                    .ok_or_else(|| corrupt(&seg.path, format_args!("record {index} is cut")))?;
                if got != index || crc(index, payload) != sum {
                    return Err(corrupt(
                        &seg.path,
                        format_args!("record {index} changed on disk since it was written"),
                    ));
                }
                out.push(payload.to_vec());
                at += HEADER + len;
            }
        }
        Ok(out)
    }

    /// Removes the records with index `>= index`, durably (zeroed and synced) before it
    /// returns.
    pub(crate) fn truncate(&mut self, index: u64) -> Result<(), StoreError> {
        let mut removed = false;
        while self.segments.last().is_some_and(|s| s.first >= index) {
            if let Some(seg) = self.segments.pop() {
                std::fs::remove_file(&seg.path)?;
                removed = true;
            }
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        if let Some(seg) = self.segments.last_mut() {
            if index < seg.next_index() {
                let keep = (index - seg.first) as usize;
                let at = seg.offsets[keep];
                zero(&seg.file, at, seg.end)?;
                seg.file.sync_data()?;
                seg.offsets.truncate(keep);
                seg.end = at;
            }
        }
        Ok(())
    }

    /// Forgets the records with index `<= index`: they are never read again, and segments
    /// holding only such records are removed. Purging past the last record removes every
    /// segment: the next append may start anywhere.
    pub(crate) fn purge(&mut self, index: u64) -> Result<(), StoreError> {
        self.floor = self.floor.max(index.saturating_add(1));
        let removed = if self.last_index().is_none_or(|last| last <= index) {
            std::mem::take(&mut self.segments)
        } else {
            let keep_from = self
                .segments
                .iter()
                .rposition(|s| s.first <= index.saturating_add(1))
                .unwrap_or(0);
            self.segments.drain(..keep_from).collect()
        };
        for seg in &removed {
            std::fs::remove_file(&seg.path)?;
        }
        if !removed.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Removes every segment (an unfinished migration's output).
    pub(crate) fn clear(&mut self) -> Result<(), StoreError> {
        for seg in self.segments.drain(..) {
            std::fs::remove_file(&seg.path)?;
        }
        sync_dir(&self.dir)?;
        Ok(())
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        if let Some(h) = self.spare.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: u64 = 256;

    fn payload(index: u64, tag: u8) -> Vec<u8> {
        let mut v = format!("entry {index:04} ").into_bytes();
        v.resize(40, tag);
        v
    }

    fn append(wal: &mut Wal, from: u64, to: u64, tag: u8) {
        let payloads: Vec<(u64, Vec<u8>)> = (from..=to).map(|i| (i, payload(i, tag))).collect();
        wal.append(payloads.iter().map(|(i, p)| (*i, p.as_slice())))
            .unwrap();
    }

    fn all(wal: &Wal) -> Vec<(u64, u8)> {
        let Some((first, last)) = wal.bounds() else {
            return Vec::new();
        };
        wal.read(first, last + 1)
            .unwrap()
            .into_iter()
            .map(|p| {
                let index = std::str::from_utf8(&p[6..10]).unwrap().parse().unwrap();
                (index, p[39])
            })
            .collect()
    }

    fn segments(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".wal"))
            .collect();
        names.sort();
        names
    }

    /// Flips a byte inside record `index`'s payload.
    fn damage(dir: &Path, wal: &Wal, index: u64) {
        let seg = wal
            .segments
            .iter()
            .find(|s| s.first <= index && index < s.next_index())
            .unwrap();
        let at = seg.offsets[(index - seg.first) as usize] + HEADER as u64 + 3;
        let file = OpenOptions::new()
            .write(true)
            .open(dir.join(segment_name(seg.first)))
            .unwrap();
        file.write_all_at(b"X", at).unwrap();
    }

    #[test]
    fn records_span_segments_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), SMALL, 0).unwrap();
        assert_eq!(wal.bounds(), None);
        append(&mut wal, 3, 12, b'a');
        assert_eq!(wal.bounds(), Some((3, 12)));
        assert!(segments(dir.path()).len() > 2, "{:?}", segments(dir.path()));
        assert_eq!(wal.read(5, 8).unwrap().len(), 3);
        assert_eq!(wal.read(5, 8).unwrap()[0], payload(5, b'a'));
        drop(wal);
        let wal = Wal::open(dir.path(), SMALL, 0).unwrap();
        assert_eq!(all(&wal), (3..=12).map(|i| (i, b'a')).collect::<Vec<_>>());
        let mut wal = wal;
        let err = wal.append([(12, b"x".as_slice())]).unwrap_err();
        assert!(err.to_string().contains("13 is next"), "{err}");
    }

    #[test]
    fn a_gap_the_log_really_has_is_told_from_a_missing_segment() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), 4096, 0).unwrap();
        append(&mut wal, 1, 3, b'a');
        append(&mut wal, 7, 8, b'b');
        drop(wal);
        let wal = Wal::open(dir.path(), 4096, 0).unwrap();
        assert_eq!(
            all(&wal),
            vec![(1, b'a'), (2, b'a'), (3, b'a'), (7, b'b'), (8, b'b')]
        );
        assert_eq!(segments(dir.path()).len(), 2);
    }

    #[test]
    fn a_record_bigger_than_a_segment_gets_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), SMALL, 0).unwrap();
        append(&mut wal, 1, 2, b'a');
        let big = vec![7u8; 1000];
        wal.append([(3, big.as_slice())]).unwrap();
        append(&mut wal, 4, 4, b'b');
        drop(wal);
        let wal = Wal::open(dir.path(), SMALL, 0).unwrap();
        assert_eq!(wal.read(3, 4).unwrap(), vec![big]);
        assert_eq!(wal.bounds(), Some((1, 4)));
    }

    #[test]
    fn a_torn_tail_is_cut_and_never_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), 4096, 0).unwrap();
        append(&mut wal, 1, 4, b'a');
        // Record 2 torn, 3 and 4 written whole (pages reach the disk in any order).
        damage(dir.path(), &wal, 2);
        drop(wal);
        let mut wal = Wal::open(dir.path(), 4096, 0).unwrap();
        assert_eq!(all(&wal), vec![(1, b'a')]);
        // Records of the same size at the same offsets: only zeroing at open keeps the old
        // record 3 from reading back as valid after them.
        append(&mut wal, 2, 2, b'b');
        drop(wal);
        let wal = Wal::open(dir.path(), 4096, 0).unwrap();
        assert_eq!(all(&wal), vec![(1, b'a'), (2, b'b')]);
    }

    #[test]
    fn truncated_records_never_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), SMALL, 0).unwrap();
        append(&mut wal, 1, 9, b'a');
        wal.truncate(7).unwrap();
        append(&mut wal, 7, 7, b'b');
        assert_eq!(wal.bounds(), Some((1, 7)));
        drop(wal);
        let mut wal = Wal::open(dir.path(), SMALL, 0).unwrap();
        let mut want: Vec<(u64, u8)> = (1..=6).map(|i| (i, b'a')).collect();
        want.push((7, b'b'));
        assert_eq!(all(&wal), want);
        // Truncating at a segment's first record removes the segment.
        let before = segments(dir.path()).len();
        let first_of_last = wal.segments.last().unwrap().first;
        wal.truncate(first_of_last).unwrap();
        assert_eq!(segments(dir.path()).len(), before - 1);
        assert_eq!(wal.bounds(), Some((1, first_of_last - 1)));
        wal.truncate(0).unwrap();
        assert_eq!(wal.bounds(), None);
        append(&mut wal, 20, 21, b'c');
        drop(wal);
        let wal = Wal::open(dir.path(), SMALL, 0).unwrap();
        assert_eq!(all(&wal), vec![(20, b'c'), (21, b'c')]);
    }

    #[test]
    fn purge_hides_records_and_drops_whole_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), SMALL, 0).unwrap();
        append(&mut wal, 1, 12, b'a');
        let before = segments(dir.path()).len();
        wal.purge(5).unwrap();
        assert_eq!(wal.bounds(), Some((6, 12)));
        assert!(segments(dir.path()).len() < before);
        assert_eq!(wal.read(1, 13).unwrap().len(), 7);
        drop(wal);
        // The floor comes from the caller's record of the purge point.
        let mut wal = Wal::open(dir.path(), SMALL, 6).unwrap();
        assert_eq!(wal.bounds(), Some((6, 12)));
        // Past the end: every segment goes, and the log may restart anywhere after it.
        wal.purge(40).unwrap();
        assert_eq!(wal.bounds(), None);
        assert!(segments(dir.path()).is_empty());
        append(&mut wal, 41, 42, b'b');
        drop(wal);
        let wal = Wal::open(dir.path(), SMALL, 41).unwrap();
        assert_eq!(all(&wal), vec![(41, b'b'), (42, b'b')]);
    }

    #[test]
    fn damage_before_the_tail_or_a_missing_segment_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), SMALL, 0).unwrap();
        append(&mut wal, 1, 12, b'a');
        let middle = wal.segments[1].first;
        damage(dir.path(), &wal, middle);
        drop(wal);
        let err = Wal::open(dir.path(), SMALL, 0).err().unwrap();
        assert!(err.to_string().contains("checksum"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), SMALL, 0).unwrap();
        append(&mut wal, 1, 12, b'a');
        let middle = wal.segments[1].first;
        drop(wal);
        std::fs::remove_file(dir.path().join(segment_name(middle))).unwrap();
        let err = Wal::open(dir.path(), SMALL, 0).err().unwrap();
        assert!(err.to_string().contains("segment file is missing"), "{err}");
    }
}
