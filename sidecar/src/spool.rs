//! Spool files: frames that could not go to the sidecar yet, kept on the shared volume.
//!
//! The entrypoint appends frames to its spool while the sidecar is away (or while Redis is down
//! and its in-memory window is full), and sends them, in order, when the sidecar is back. The
//! file holds an exclusive `flock` for as long as its writer lives; a spool whose lock can be
//! taken belongs to an entrypoint that has exited, and the sidecar publishes it and removes it.
//!
//! The entrypoint and the sidecar run as different users on a real kubelet (the agent as its
//! image's user, the sidecar as its own), so a spool is always made readable by every user of
//! the pod (mode 0644 whatever the agent's umask), and the sidecar only ever reads it: `flock`
//! works on a read-only descriptor, and removing the file needs write permission on the
//! volume's directory (an `emptyDir` is world-writable), not on the file.
//!
//! The volume is writable by the agent too, so every record is authenticated: a frame (its
//! usual encoding) followed by a [`MAC_LEN`]-byte MAC made with the pod's key over the
//! producer, the frame's byte offset in the file and the frame's bytes ([`Key::spool_mac`]).
//! Readers check every record and stop at the first one that does not verify; a file dropped
//! or changed by the agent is never published. A producer without a key writes the same format
//! with an empty key: unauthenticated, and refused by every sidecar.

use crate::auth::{Key, MAC_LEN};
use crate::frame::{Frame, FrameError, MAX_FRAME};
use bytes::BytesMut;
use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

const PREFIX: &str = "agentrun-spool-";
const SUFFIX: &str = ".bin";
/// Mode of every spool file: the sidecar, another user, must be able to read it.
const SPOOL_MODE: u32 = 0o644;

/// The spool file of `producer` in `dir`.
pub fn spool_path(dir: &Path, producer: &str) -> PathBuf {
    dir.join(format!("{PREFIX}{producer}{SUFFIX}"))
}

/// The producer a spool file belongs to, from its name.
pub fn producer_of(path: &Path) -> Option<&str> {
    path.file_name()?
        .to_str()?
        .strip_prefix(PREFIX)?
        .strip_suffix(SUFFIX)
}

/// Creates (or truncates) a file with [`SPOOL_MODE`], whatever the process's umask.
fn create_readable(path: &Path, read: bool) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .read(read)
        .write(true)
        .truncate(true)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(SPOOL_MODE))?;
    Ok(file)
}

/// Appends authenticated records; knows the offset of the next one.
struct RecordWriter<'k, W: Write> {
    out: W,
    offset: u64,
    key: &'k Key,
    producer: &'k str,
}

impl<W: Write> RecordWriter<'_, W> {
    /// Writes one record; returns its length.
    fn append(&mut self, frame: &Frame) -> std::io::Result<u64> {
        let bytes = frame.to_bytes();
        let mac = self.key.spool_mac(self.producer, self.offset, &bytes);
        let mut record = Vec::with_capacity(bytes.len() + MAC_LEN);
        record.extend_from_slice(&bytes);
        record.extend_from_slice(&mac);
        self.out.write_all(&record)?;
        let len = record.len() as u64;
        self.offset += len;
        Ok(len)
    }
}

impl<'k> RecordWriter<'k, std::io::BufWriter<File>> {
    /// A writer of a new file at `tmp`, which [`RecordWriter::install`] puts in place.
    fn create(tmp: &Path, key: &'k Key, producer: &'k str) -> std::io::Result<Self> {
        Ok(RecordWriter {
            out: std::io::BufWriter::new(create_readable(tmp, false)?),
            offset: 0,
            key,
            producer,
        })
    }

    /// Flushes the file at `tmp` to disk, then renames it to `path`.
    fn install(self, tmp: &Path, path: &Path) -> std::io::Result<()> {
        self.out
            .into_inner()
            .map_err(|e| e.into_error())?
            .sync_all()?;
        std::fs::rename(tmp, path)
    }
}

/// A spool file being written (and drained) by its owner.
pub struct SpoolFile {
    path: PathBuf,
    key: Key,
    producer: String,
    writer: Flock<File>,
    reader: BufReader<File>,
    written: u64,
    read: u64,
    /// Frames appended and not yet read back.
    frames: usize,
}

impl SpoolFile {
    /// Creates (or truncates) the spool of `producer` in `dir` and locks it; its records are
    /// authenticated with `key`.
    pub fn create(dir: &Path, producer: &str, key: &Key) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = spool_path(dir, producer);
        let file = create_readable(&path, true)?;
        let writer = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| std::io::Error::from(errno))?;
        let reader = BufReader::with_capacity(256 * 1024, File::open(&path)?);
        Ok(Self {
            path,
            key: key.clone(),
            producer: producer.to_owned(),
            writer,
            reader,
            written: 0,
            read: 0,
            frames: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes appended and not yet read back.
    pub fn unread(&self) -> u64 {
        self.written - self.read
    }

    /// Frames appended and not yet read back.
    pub fn unread_frames(&self) -> usize {
        self.frames
    }

    /// Appends one record. A write that fails part-way (a full disk) is cut back off, so the
    /// file always ends with a whole record: what a later append or a reader after a crash
    /// finds there verifies.
    pub fn append(&mut self, frame: &Frame) -> std::io::Result<()> {
        self.writer.seek(SeekFrom::Start(self.written))?;
        let mut w = RecordWriter {
            out: &mut *self.writer,
            offset: self.written,
            key: &self.key,
            producer: &self.producer,
        };
        match w.append(frame) {
            Ok(len) => {
                self.written += len;
                self.frames += 1;
                Ok(())
            }
            Err(e) => {
                if let Err(trim) = self.writer.set_len(self.written) {
                    tracing::warn!(spool = %self.path.display(), error = %trim, "could not cut a partly written record off the spool");
                }
                Err(e)
            }
        }
    }

    /// The next frame not yet read back, if any. A record that does not verify (another
    /// process of the agent's user changed the file) is an error: nothing after it is read.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.read >= self.written {
            return Ok(None);
        }
        match read_record(&mut self.reader, &self.key, &self.producer, self.read)? {
            Some((frame, len)) => {
                self.read += len as u64;
                self.frames = self.frames.saturating_sub(1);
                if self.read >= self.written {
                    self.reset()?;
                }
                Ok(Some(frame))
            }
            None => Ok(None),
        }
    }

    /// Empties the file once everything in it has been read back.
    fn reset(&mut self) -> std::io::Result<()> {
        self.writer.set_len(0)?;
        self.reader.seek(SeekFrom::Start(0))?;
        self.written = 0;
        self.read = 0;
        self.frames = 0;
        Ok(())
    }

    /// Rewrites the spool as `front`, then what has not been read yet, then `back`; used when
    /// the entrypoint exits before the sidecar took everything. Records move, so each is
    /// verified where it was and authenticated again where it goes; one that does not verify
    /// ends what is copied from the file (and is reported on stderr).
    pub fn persist(mut self, front: &[Frame], back: &[Frame]) -> std::io::Result<PathBuf> {
        let tmp = self.path.with_extension("tmp");
        let mut out = RecordWriter::create(&tmp, &self.key, &self.producer)?;
        for f in front {
            out.append(f)?;
        }
        let mut at = self.read;
        while at < self.written {
            match read_record(&mut self.reader, &self.key, &self.producer, at) {
                Ok(Some((frame, len))) => {
                    out.append(&frame)?;
                    at += len as u64;
                }
                Ok(None) => break,
                Err(e) => {
                    eprintln!(
                        "agentrun-entrypoint: the spool {} cannot be read past byte {at}: {e}; what follows there is not kept",
                        self.path.display()
                    );
                    break;
                }
            }
        }
        for f in back {
            out.append(f)?;
        }
        out.install(&tmp, &self.path)?;
        self.written = u64::MAX; // keep the file on drop
        Ok(self.path.clone())
    }
}

impl Drop for SpoolFile {
    fn drop(&mut self) {
        if self.written == 0 {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes `frames` as a new spool file for `producer` (used when there is no live spool).
pub fn write_spool(
    dir: &Path,
    producer: &str,
    frames: &[Frame],
    key: &Key,
) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = spool_path(dir, producer);
    let tmp = path.with_extension("tmp");
    let mut out = RecordWriter::create(&tmp, key, producer)?;
    for f in frames {
        out.append(f)?;
    }
    out.install(&tmp, &path)?;
    Ok(path)
}

/// Reads exactly `buf.len()` bytes; `false` at the end of the file (also in the middle).
fn read_or_eof<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<bool> {
    match r.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// Reads the record at `offset` (where `r` is): the frame and the record's length. A record
/// torn by a crash in the middle of a write ends the spool (`Ok(None)`); one whose MAC does
/// not verify is [`FrameError::Unauthentic`], checked before the frame is decoded.
fn read_record<R: Read>(
    r: &mut R,
    key: &Key,
    producer: &str,
    offset: u64,
) -> Result<Option<(Frame, usize)>, FrameError> {
    let mut len = [0u8; 4];
    if !read_or_eof(r, &mut len)? {
        return Ok(None);
    }
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_FRAME {
        return Err(FrameError::TooLarge(n));
    }
    let mut record = BytesMut::zeroed(4 + n + MAC_LEN);
    record[..4].copy_from_slice(&len);
    if !read_or_eof(r, &mut record[4..])? {
        return Ok(None);
    }
    let frame = &record[..4 + n];
    if !key.verify_spool_mac(producer, offset, frame, &record[4 + n..]) {
        return Err(FrameError::Unauthentic { offset });
    }
    let body = record.freeze().slice(4..4 + n);
    Ok(Some((Frame::decode(body)?, 4 + n + MAC_LEN)))
}

/// A spool left behind by an entrypoint that has exited, locked by the caller. It is read one
/// frame at a time, so that adopting a spool of any size takes no more memory than a frame.
pub struct OrphanSpool {
    pub path: PathBuf,
    lock: Flock<File>,
    reader: Option<BufReader<File>>,
    /// Where the next record starts.
    offset: u64,
}

impl OrphanSpool {
    /// The producer this spool belongs to (from its file name).
    pub fn producer(&self) -> &str {
        producer_of(&self.path).unwrap_or_default()
    }

    /// The next frame, from the start of the file, verified with `key` (a torn last frame ends
    /// the spool; a record that does not verify is an error, and nothing after it is read).
    pub fn next_frame(&mut self, key: &Key) -> Result<Option<Frame>, FrameError> {
        if self.reader.is_none() {
            let mut file = self.lock.try_clone()?;
            file.seek(SeekFrom::Start(0))?;
            self.reader = Some(BufReader::with_capacity(256 * 1024, file));
        }
        let producer = producer_of(&self.path).unwrap_or_default().to_owned();
        let Some(r) = self.reader.as_mut() else {
            return Ok(None);
        };
        match read_record(r, key, &producer, self.offset)? {
            Some((frame, len)) => {
                self.offset += len as u64;
                Ok(Some(frame))
            }
            None => Ok(None),
        }
    }

    pub fn remove(self) -> std::io::Result<()> {
        std::fs::remove_file(&self.path)
    }
}

/// A spool file found in a directory.
pub enum FoundSpool {
    /// Its writer is gone; the caller holds its lock.
    Orphan(OrphanSpool),
    /// Its writer (a running entrypoint) holds the lock.
    Live(PathBuf),
}

/// Every spool file in `dir`, in name order; unreadable ones are skipped with a warning (they
/// cannot be published by this process either way).
pub fn scan(dir: &Path) -> Vec<FoundSpool> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| producer_of(p).is_some())
        .collect();
    paths.sort();
    paths
        .into_iter()
        .filter_map(|path| {
            // Read-only: the file belongs to the entrypoint's user, often not ours.
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot open a spool file");
                    return None;
                }
            };
            Some(match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => FoundSpool::Orphan(OrphanSpool {
                    path,
                    lock,
                    reader: None,
                    offset: 0,
                }),
                Err(_) => FoundSpool::Live(path),
            })
        })
        .collect()
}

/// Spool files in `dir` whose writers are gone.
pub fn orphan_spools(dir: &Path) -> Vec<OrphanSpool> {
    scan(dir)
        .into_iter()
        .filter_map(|f| match f {
            FoundSpool::Orphan(o) => Some(o),
            FoundSpool::Live(_) => None,
        })
        .collect()
}

/// Spool files in `dir` that a running entrypoint is writing.
pub fn live_spools(dir: &Path) -> Vec<PathBuf> {
    scan(dir)
        .into_iter()
        .filter_map(|f| match f {
            FoundSpool::Live(p) => Some(p),
            FoundSpool::Orphan(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Pipe;
    use bytes::Bytes;

    fn key() -> Key {
        Key::from_bytes([3; crate::auth::KEY_LEN])
    }

    /// A live spool of producer `p` holding `frames`.
    fn spool_of(dir: &Path, frames: &[Frame]) -> SpoolFile {
        let mut s = SpoolFile::create(dir, "p", &key()).unwrap();
        for f in frames {
            s.append(f).unwrap();
        }
        s
    }

    fn read_orphan(o: &mut OrphanSpool, key: &Key) -> (Vec<Frame>, Option<FrameError>) {
        let mut frames = Vec::new();
        loop {
            match o.next_frame(key) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => return (frames, None),
                Err(e) => return (frames, Some(e)),
            }
        }
    }

    fn data(fseq: u64, text: &str) -> Frame {
        Frame::Data {
            fseq,
            pipe: Pipe::Stdout,
            pseq: fseq,
            ts: 0,
            bytes: Bytes::copy_from_slice(text.as_bytes()),
        }
    }

    #[test]
    fn appends_and_reads_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spool_of(dir.path(), &[data(1, "a"), data(2, "b")]);
        assert_eq!(s.next_frame().unwrap(), Some(data(1, "a")));
        s.append(&data(3, "c")).unwrap();
        assert_eq!(s.next_frame().unwrap(), Some(data(2, "b")));
        assert_eq!(s.next_frame().unwrap(), Some(data(3, "c")));
        assert_eq!(s.next_frame().unwrap(), None);
        assert_eq!(s.unread(), 0);
        // A live spool is locked, so it is not an orphan.
        assert!(orphan_spools(dir.path()).is_empty());
        assert_eq!(live_spools(dir.path()), vec![s.path().to_path_buf()]);
        drop(s);
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "an empty spool is removed"
        );
    }

    #[test]
    fn a_persisted_spool_is_an_orphan_with_the_front_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SpoolFile::create(dir.path(), "p", &key()).unwrap();
        s.append(&data(3, "c")).unwrap();
        s.persist(&[data(1, "a"), data(2, "b")], &[data(4, "d")])
            .unwrap();
        let mut orphans = orphan_spools(dir.path());
        assert_eq!(orphans.len(), 1);
        let (frames, error) = read_orphan(&mut orphans[0], &key());
        assert!(error.is_none(), "{error:?}");
        assert_eq!(
            frames,
            vec![data(1, "a"), data(2, "b"), data(3, "c"), data(4, "d")]
        );
        orphans.pop().unwrap().remove().unwrap();
        assert!(orphan_spools(dir.path()).is_empty());
    }

    #[test]
    fn spools_are_readable_by_other_users_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let mut s = SpoolFile::create(dir.path(), "p", &key()).unwrap();
        s.append(&data(1, "a")).unwrap();
        let live_mode = std::fs::metadata(s.path()).unwrap().permissions().mode();
        let path = s.persist(&[], &[]).unwrap();
        let persisted_mode = std::fs::metadata(&path).unwrap().permissions().mode();
        let written = write_spool(dir.path(), "q", &[data(1, "b")], &key()).unwrap();
        let written_mode = std::fs::metadata(&written).unwrap().permissions().mode();
        nix::sys::stat::umask(old);
        assert_eq!(live_mode & 0o777, 0o644);
        assert_eq!(persisted_mode & 0o777, 0o644);
        assert_eq!(written_mode & 0o777, 0o644);
    }

    #[test]
    fn a_spool_is_read_up_to_its_first_record_that_does_not_verify() {
        let dir = tempfile::tempdir().unwrap();
        let frames = [data(1, "a"), data(2, "b"), data(3, "c")];
        let path = write_spool(dir.path(), "ep-1", &frames, &key()).unwrap();
        let record = data(1, "a").to_bytes().len() + MAC_LEN;
        // Each record verifies where it is, for its producer and key only.
        let mut o = orphan_spools(dir.path()).pop().unwrap();
        let (got, error) = read_orphan(&mut o, &key());
        assert!(error.is_none(), "{error:?}");
        assert_eq!(got, frames.to_vec());
        drop(o);
        let mut o = orphan_spools(dir.path()).pop().unwrap();
        let (got, error) = read_orphan(&mut o, &Key::from_bytes([4; crate::auth::KEY_LEN]));
        assert!(got.is_empty());
        assert!(matches!(error, Some(FrameError::Unauthentic { offset: 0 })));
        drop(o);
        // A byte changed in the second record: the first is read, nothing after it.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[record + 30] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let mut o = orphan_spools(dir.path()).pop().unwrap();
        let (got, error) = read_orphan(&mut o, &key());
        assert_eq!(got, vec![data(1, "a")]);
        assert!(
            matches!(error, Some(FrameError::Unauthentic { offset }) if offset == record as u64)
        );
        drop(o);
        // Records swapped, or copied into another producer's spool, do not verify either.
        let good =
            std::fs::read(write_spool(dir.path(), "ep-1", &frames, &key()).unwrap()).unwrap();
        let mut swapped = good[record..2 * record].to_vec();
        swapped.extend_from_slice(&good[..record]);
        std::fs::write(&path, &swapped).unwrap();
        let mut o = orphan_spools(dir.path()).pop().unwrap();
        assert!(read_orphan(&mut o, &key()).0.is_empty());
        drop(o);
        std::fs::remove_file(&path).unwrap();
        std::fs::write(spool_path(dir.path(), "ep-2"), &good).unwrap();
        let mut o = orphan_spools(dir.path()).pop().unwrap();
        assert_eq!(o.producer(), "ep-2");
        assert!(read_orphan(&mut o, &key()).0.is_empty());
    }

    #[test]
    fn a_live_spool_changed_behind_its_writer_is_not_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spool_of(dir.path(), &[data(1, "a"), data(2, "b")]);
        let mut bytes = std::fs::read(s.path()).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(s.path(), &bytes).unwrap();
        assert_eq!(s.next_frame().unwrap(), Some(data(1, "a")));
        assert!(matches!(
            s.next_frame(),
            Err(FrameError::Unauthentic { .. })
        ));
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        /// Reads records from `bytes` until the end or an error.
        fn read_records(bytes: &[u8], key: &Key) -> (Vec<Frame>, Option<FrameError>) {
            let mut r = bytes;
            let mut offset = 0;
            let mut frames = Vec::new();
            loop {
                match read_record(&mut r, key, "p", offset) {
                    Ok(Some((f, len))) => {
                        offset += len as u64;
                        frames.push(f);
                    }
                    Ok(None) => return (frames, None),
                    Err(e) => return (frames, Some(e)),
                }
            }
        }

        fn frames() -> impl Strategy<Value = Vec<Frame>> {
            prop::collection::vec(
                (any::<u64>(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(
                    |(fseq, bytes)| Frame::Data {
                        fseq,
                        pipe: Pipe::Stderr,
                        pseq: fseq,
                        ts: 1,
                        bytes: Bytes::from(bytes),
                    },
                ),
                1..6,
            )
        }

        fn write(frames: &[Frame], key: &Key) -> Vec<u8> {
            let mut w = RecordWriter {
                out: Vec::new(),
                offset: 0,
                key,
                producer: "p",
            };
            for f in frames {
                w.append(f).unwrap();
            }
            w.out
        }

        proptest! {
            /// A spool file of arbitrary bytes (one dropped by a hostile agent) is refused or
            /// ends, never a panic, and none of it is taken as a frame: nothing verifies
            /// without the key. Records that do verify (a key that leaked) still only decode
            /// to frames or errors.
            #[test]
            fn any_spool_bytes_are_refused_or_end_never_a_panic(
                bytes in prop::collection::vec(any::<u8>(), 0..256),
                body in prop::collection::vec(any::<u8>(), 0..64),
            ) {
                let (frames, _) = read_records(&bytes, &key());
                prop_assert!(frames.is_empty());
                let mut framed = (body.len() as u32).to_be_bytes().to_vec();
                framed.extend_from_slice(&body);
                let mac = key().spool_mac("p", 0, &framed);
                framed.extend_from_slice(&mac);
                let (_, error) = read_records(&framed, &key());
                let unauthentic = matches!(error, Some(FrameError::Unauthentic { .. }));
                prop_assert!(!unauthentic, "{:?}", error);
            }

            /// Records read back as written; cut short anywhere they read back the whole ones
            /// and end; one byte changed anywhere, and nothing from that record on is taken.
            #[test]
            fn spool_records_read_back_cut_short_or_changed(
                frames in frames(),
                cut in any::<usize>(),
                flip in any::<usize>(),
                bit in 0u8..8,
            ) {
                let key = key();
                let bytes = write(&frames, &key);
                let (back, error) = read_records(&bytes, &key);
                prop_assert!(error.is_none());
                prop_assert_eq!(&back, &frames);

                let cut = cut % bytes.len();
                let (back, error) = read_records(&bytes[..cut], &key);
                prop_assert!(error.is_none());
                prop_assert!(frames.starts_with(&back));

                let flip = flip % bytes.len();
                let mut changed = bytes.clone();
                changed[flip] ^= 1 << bit;
                let (back, _) = read_records(&changed, &key);
                // The records that end before the changed byte, at most.
                let mut intact = 0;
                let mut end = 0;
                for f in &frames {
                    end += f.to_bytes().len() + MAC_LEN;
                    if end > flip {
                        break;
                    }
                    intact += 1;
                }
                prop_assert_eq!(&back[..], &frames[..intact]);
            }
        }
    }
}
