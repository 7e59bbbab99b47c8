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

use crate::frame::{Frame, FrameError, MAX_FRAME};
use bytes::{Bytes, BytesMut};
use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

const PREFIX: &str = "agentrun-spool-";
const SUFFIX: &str = ".bin";
/// Mode of every spool file: the sidecar, another user, must be able to read it.
const SPOOL_MODE: u32 = 0o644;

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

/// A spool file being written (and drained) by its owner.
pub struct SpoolFile {
    path: PathBuf,
    writer: Flock<File>,
    reader: BufReader<File>,
    written: u64,
    read: u64,
    /// Frames appended and not yet read back.
    frames: usize,
}

impl SpoolFile {
    /// Creates (or truncates) the spool of `producer` in `dir` and locks it.
    pub fn create(dir: &Path, producer: &str) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{PREFIX}{producer}{SUFFIX}"));
        let file = create_readable(&path, true)?;
        let writer = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| std::io::Error::from(errno))?;
        let reader = BufReader::with_capacity(256 * 1024, File::open(&path)?);
        Ok(Self {
            path,
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

    pub fn append(&mut self, frame: &Frame) -> std::io::Result<()> {
        let bytes = frame.to_bytes();
        self.writer.seek(SeekFrom::Start(self.written))?;
        self.writer.write_all(&bytes)?;
        self.written += bytes.len() as u64;
        self.frames += 1;
        Ok(())
    }

    /// The next frame not yet read back, if any.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.read >= self.written {
            return Ok(None);
        }
        match read_frame_sync(&mut self.reader)? {
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
    /// the entrypoint exits before the sidecar took everything.
    pub fn persist(mut self, front: &[Frame], back: &[Frame]) -> std::io::Result<PathBuf> {
        let tmp = self.path.with_extension("tmp");
        let mut out = std::io::BufWriter::new(create_readable(&tmp, false)?);
        for f in front {
            out.write_all(&f.to_bytes())?;
        }
        let mut rest = Vec::new();
        self.reader.read_to_end(&mut rest)?;
        out.write_all(&rest)?;
        for f in back {
            out.write_all(&f.to_bytes())?;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
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
pub fn write_spool(dir: &Path, producer: &str, frames: &[Frame]) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{PREFIX}{producer}{SUFFIX}"));
    let tmp = path.with_extension("tmp");
    let mut out = std::io::BufWriter::new(create_readable(&tmp, false)?);
    for f in frames {
        out.write_all(&f.to_bytes())?;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

fn read_frame_sync<R: Read>(r: &mut R) -> Result<Option<(Frame, usize)>, FrameError> {
    let mut len = [0u8; 4];
    if let Err(e) = r.read_exact(&mut len) {
        return if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Ok(None)
        } else {
            Err(e.into())
        };
    }
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_FRAME {
        return Err(FrameError::TooLarge(n));
    }
    let mut body = BytesMut::zeroed(n);
    if let Err(e) = r.read_exact(&mut body) {
        return if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Ok(None)
        } else {
            Err(e.into())
        };
    }
    Ok(Some((Frame::decode(Bytes::from(body))?, n + 4)))
}

/// A spool left behind by an entrypoint that has exited, locked by the caller. It is read one
/// frame at a time, so that adopting a spool of any size takes no more memory than a frame.
pub struct OrphanSpool {
    pub path: PathBuf,
    lock: Flock<File>,
    reader: Option<BufReader<File>>,
}

impl OrphanSpool {
    /// The next frame, from the start of the file (a torn last frame ends the spool).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.reader.is_none() {
            let mut file = self.lock.try_clone()?;
            file.seek(SeekFrom::Start(0))?;
            self.reader = Some(BufReader::with_capacity(256 * 1024, file));
        }
        match self.reader.as_mut() {
            Some(r) => Ok(read_frame_sync(r)?.map(|(f, _)| f)),
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
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(PREFIX) && name.ends_with(SUFFIX)
        })
        .map(|e| e.path())
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
        let mut s = SpoolFile::create(dir.path(), "p").unwrap();
        s.append(&data(1, "a")).unwrap();
        s.append(&data(2, "b")).unwrap();
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
        let mut s = SpoolFile::create(dir.path(), "p").unwrap();
        s.append(&data(3, "c")).unwrap();
        s.persist(&[data(1, "a"), data(2, "b")], &[data(4, "d")])
            .unwrap();
        let mut orphans = orphan_spools(dir.path());
        assert_eq!(orphans.len(), 1);
        let mut frames = Vec::new();
        while let Some(f) = orphans[0].next_frame().unwrap() {
            frames.push(f);
        }
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
        let mut s = SpoolFile::create(dir.path(), "p").unwrap();
        s.append(&data(1, "a")).unwrap();
        let live_mode = std::fs::metadata(s.path()).unwrap().permissions().mode();
        let path = s.persist(&[], &[]).unwrap();
        let persisted_mode = std::fs::metadata(&path).unwrap().permissions().mode();
        let written = write_spool(dir.path(), "q", &[data(1, "b")]).unwrap();
        let written_mode = std::fs::metadata(&written).unwrap().permissions().mode();
        nix::sys::stat::umask(old);
        assert_eq!(live_mode & 0o777, 0o644);
        assert_eq!(persisted_mode & 0o777, 0o644);
        assert_eq!(written_mode & 0o777, 0o644);
    }
}
