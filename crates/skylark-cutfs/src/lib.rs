//! A filesystem for tests that can lose power.
//!
//! Mounted with FUSE over a backing directory, it serves reads and writes
//! like any other filesystem, but only what has been made durable reaches
//! the backing directory: a file's data when the file is fsync'd (or
//! fdatasync'd), a directory's entries (files created, renamed, removed)
//! when the directory is fsync'd. Everything else is held in memory, where
//! [`Control::power_cut`] can throw it away — whole, or with a random part
//! of it written first, as a disk that lost power mid-write would leave it
//! (torn writes, in 512-byte sectors). After a cut the mount serves exactly
//! what was durable, as the machine would after a reboot.
//!
//! It can also make fsync fail with EIO ([`Control::fail_fsyncs`]), with
//! what Linux does then: the data the failed fsync covered is not written,
//! stays readable until the next cut, and a later fsync reports success
//! without writing it (the trap PostgreSQL's "fsyncgate" fell into); and it
//! can lie ([`Control::set_fsync_lies`]): fsync answers at once and makes
//! nothing durable, which a test uses to show that it can catch a server
//! that does not sync.
//!
//! The processes using the mount must be stopped before a cut (as a power
//! cut stops them); file handles they held are not valid across it.

use fuser::{
    AccessFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, SessionACL, TimeOrNow, WriteFlags,
};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

/// The unit the file data is held in while unsynced.
const PAGE: u64 = 4096;
/// What a torn write tears at: a disk writes a sector whole or not at all.
const SECTOR: usize = 512;
/// The kernel may not cache names or attributes: after a cut they change
/// under it.
const TTL: Duration = Duration::ZERO;
const ROOT: u64 = 1;

/// How a power cut treats what was not durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// All of it is lost.
    Clean,
    /// A random part reached the disk first (chosen from `seed`): of each
    /// file, a prefix of its unsynced pages in the order they were first
    /// written, the last of them torn at a sector boundary; of each
    /// directory, either all of its unsynced changes or none.
    Torn { seed: u64 },
}

/// What a cut threw away.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Unsynced pages dropped (the parts of torn ones that were written do
    /// not count).
    pub pages_dropped: usize,
    /// Files that kept a torn part of their unsynced data.
    pub files_torn: usize,
    /// Directories whose unsynced changes were undone.
    pub directories_reverted: usize,
}

/// Counters since the mount.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub fsyncs: u64,
    pub failed_fsyncs: u64,
    pub cuts: u64,
}

/// Commands for a mounted filesystem; cheap to clone.
#[derive(Clone)]
pub struct Control {
    state: Arc<Mutex<State>>,
}

impl Control {
    /// Loses power: what was not durable goes (see [`Cut`]). Stop every
    /// process using the mount first.
    pub fn power_cut(&self, how: Cut) -> std::io::Result<CutReport> {
        lock(&self.state).power_cut(how)
    }

    /// The next `n` fsyncs (of files or directories) fail with EIO.
    pub fn fail_fsyncs(&self, n: u64) {
        lock(&self.state).fail_next = n;
    }

    /// With `true`, fsync succeeds without making anything durable.
    pub fn set_fsync_lies(&self, lies: bool) {
        lock(&self.state).lies = lies;
    }

    /// With `true`, every successful fsync (of any file or directory) also
    /// makes every directory change made before it durable (creates,
    /// renames, removals), as a filesystem that journals its metadata in
    /// order (ext4, XFS) does in practice, though POSIX does not promise it.
    /// Off (the strict default), a directory's changes are durable only
    /// once that directory is fsync'd.
    pub fn set_metadata_journal(&self, on: bool) {
        lock(&self.state).journal = on;
    }

    pub fn stats(&self) -> Stats {
        lock(&self.state).stats
    }
}

/// A mounted filesystem; unmounted when dropped.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    control: Control,
    mountpoint: PathBuf,
}

impl Mounted {
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = session.umount_and_join();
        }
    }
}

/// Mounts an empty filesystem at `mountpoint` (an existing, empty
/// directory) whose durable data lives in `backing` (an existing, empty
/// directory). Needs /dev/fuse and the right to mount (root, or Debian's
/// `fuse3` package for `fusermount3`); the error says which is missing.
pub fn mount(backing: &Path, mountpoint: &Path) -> std::io::Result<Mounted> {
    if !Path::new("/dev/fuse").exists() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "/dev/fuse is missing: this machine (or container) has no FUSE; the power-cut tests need it",
        ));
    }
    let state = Arc::new(Mutex::new(State::new(backing.to_owned())?));
    let fs = CutFs { state: state.clone() };
    let mut config = Config::default();
    // The kernel checks permissions by the modes and owners served here, so
    // other users (PostgreSQL's) can be given a directory of their own.
    config.mount_options =
        vec![MountOption::FSName("skylark-cutfs".into()), MountOption::RW, MountOption::DefaultPermissions];
    if std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self")?) == 0 {
        config.acl = SessionACL::All;
    }
    config.n_threads = Some(2);
    let session = fuser::spawn_mount2(fs, mountpoint, &config).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "could not mount the power-cut filesystem at {} ({e}); it needs root (or the fuse3 package's \
                 fusermount3) and /dev/fuse",
                mountpoint.display()
            ),
        )
    })?;
    Ok(Mounted { session: Some(session), control: Control { state }, mountpoint: mountpoint.to_owned() })
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

struct CutFs {
    state: Arc<Mutex<State>>,
}

struct State {
    backing: PathBuf,
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    fail_next: u64,
    lies: bool,
    /// See [`Control::set_metadata_journal`].
    journal: bool,
    stats: Stats,
}

struct Node {
    perm: u16,
    uid: u32,
    gid: u32,
    mtime: SystemTime,
    kind: Kind,
}

enum Kind {
    Dir(Dir),
    File(Box<File>),
}

struct Dir {
    live: BTreeMap<OsString, u64>,
    durable: BTreeMap<OsString, u64>,
}

/// A file: its durable bytes in the backing file, and over them the pages
/// written since its last fsync.
struct File {
    backing: std::fs::File,
    durable_len: u64,
    live_len: u64,
    /// Pages written since the last fsync, as they read now.
    dirty: BTreeMap<u64, Box<[u8]>>,
    /// The same pages, in the order they were first written.
    order: Vec<u64>,
    /// Pages a failed fsync covered: readable, never written.
    lost: BTreeMap<u64, Box<[u8]>>,
    /// Durable bytes at or past this offset read as zero (a truncation not
    /// yet synced).
    zero_from: u64,
}

impl File {
    fn durable_page(&self, index: u64) -> std::io::Result<Box<[u8]>> {
        let mut page = vec![0u8; PAGE as usize].into_boxed_slice();
        let start = index * PAGE;
        let end = (start + PAGE).min(self.durable_len).min(self.zero_from);
        if end > start {
            self.backing.read_exact_at(&mut page[..(end - start) as usize], start)?;
        }
        Ok(page)
    }

    /// The page as it reads now (zero past the end of the file).
    fn page(&self, index: u64) -> std::io::Result<Box<[u8]>> {
        let mut page = match self.dirty.get(&index).or_else(|| self.lost.get(&index)) {
            Some(page) => page.clone(),
            None => self.durable_page(index)?,
        };
        let start = index * PAGE;
        if self.live_len < start + PAGE {
            let keep = self.live_len.saturating_sub(start) as usize;
            page[keep..].fill(0);
        }
        Ok(page)
    }

    fn page_mut(&mut self, index: u64) -> std::io::Result<&mut [u8]> {
        if !self.dirty.contains_key(&index) {
            let page = self.page(index)?;
            self.dirty.insert(index, page);
            self.order.push(index);
        }
        Ok(self.dirty.get_mut(&index).expect("just inserted"))
    }

    fn read(&self, offset: u64, size: u64) -> std::io::Result<Vec<u8>> {
        let end = (offset + size).min(self.live_len);
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut at = offset;
        while at < end {
            let (index, within) = (at / PAGE, (at % PAGE) as usize);
            let take = ((PAGE as usize) - within).min((end - at) as usize);
            out.extend_from_slice(&self.page(index)?[within..within + take]);
            at += take as u64;
        }
        Ok(out)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let (index, within) = (at / PAGE, (at % PAGE) as usize);
            let take = ((PAGE as usize) - within).min(data.len() - done);
            // The size grows before the page is taken, so the new bytes'
            // page is not clipped; bytes past the old end read as zero.
            let old_len = self.live_len;
            self.live_len = self.live_len.max(at + take as u64);
            if old_len < at {
                self.hide_durable_from(old_len)?;
            }
            self.page_mut(index)?[within..within + take].copy_from_slice(&data[done..done + take]);
            done += take;
        }
        Ok(())
    }

    /// Durable bytes from `from` on no longer show (the file was cut short
    /// there, or a hole now starts there): the page holding `from` is
    /// taken with its tail zeroed, later ones read as zero.
    fn hide_durable_from(&mut self, from: u64) -> std::io::Result<()> {
        if from >= self.durable_len.min(self.zero_from) {
            return Ok(());
        }
        let index = from / PAGE;
        let within = (from % PAGE) as usize;
        if within > 0 {
            let saved = self.live_len;
            self.live_len = self.live_len.max((index + 1) * PAGE);
            let page = self.page_mut(index)?;
            page[within..].fill(0);
            self.live_len = saved;
        }
        self.zero_from = self.zero_from.min(from);
        Ok(())
    }

    fn truncate(&mut self, size: u64) -> std::io::Result<()> {
        if size < self.live_len {
            let first_gone = size.div_ceil(PAGE);
            self.dirty.retain(|index, _| *index < first_gone);
            self.lost.retain(|index, _| *index < first_gone);
            self.order.retain(|index| *index < first_gone);
            if !size.is_multiple_of(PAGE) {
                let within = (size % PAGE) as usize;
                self.page_mut(size / PAGE)?[within..].fill(0);
            }
            self.zero_from = self.zero_from.min(size);
            self.live_len = size;
        } else {
            let old = self.live_len;
            self.live_len = size;
            self.hide_durable_from(old)?;
        }
        Ok(())
    }

    /// Makes what reads now durable (the pages a failed fsync lost stay lost).
    fn sync(&mut self) -> std::io::Result<()> {
        if self.zero_from < self.durable_len {
            self.backing.set_len(self.zero_from)?;
        }
        for (index, page) in &self.dirty {
            let start = index * PAGE;
            let len = self.live_len.saturating_sub(start).min(PAGE) as usize;
            self.backing.write_all_at(&page[..len], start)?;
        }
        self.backing.set_len(self.live_len)?;
        self.backing.sync_all()?;
        self.durable_len = self.live_len;
        self.zero_from = u64::MAX;
        self.dirty.clear();
        self.order.clear();
        Ok(())
    }

    /// The power went: what was not synced is gone, but for the first
    /// `keep_pages` pages in write order, of which the last is torn after
    /// `last_sectors` sectors.
    fn cut(&mut self, keep_pages: usize, last_sectors: usize) -> std::io::Result<usize> {
        let kept = self.order.iter().take(keep_pages).copied().collect::<Vec<_>>();
        for (n, index) in kept.iter().enumerate() {
            let page = &self.dirty[index];
            let start = index * PAGE;
            let mut len = self.live_len.saturating_sub(start).min(PAGE) as usize;
            if n + 1 == kept.len() {
                len = len.min(last_sectors * SECTOR);
            }
            self.backing.write_all_at(&page[..len], start)?;
            self.durable_len = self.durable_len.max(start + len as u64);
        }
        self.backing.sync_all()?;
        let dropped = self.order.len() - kept.len();
        self.dirty.clear();
        self.order.clear();
        self.lost.clear();
        self.zero_from = u64::MAX;
        self.live_len = self.durable_len;
        Ok(dropped)
    }
}

impl State {
    fn new(backing: PathBuf) -> std::io::Result<State> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&backing)?;
        let root = Node {
            perm: 0o755,
            uid: meta.uid(),
            gid: meta.gid(),
            mtime: SystemTime::now(),
            kind: Kind::Dir(Dir { live: BTreeMap::new(), durable: BTreeMap::new() }),
        };
        Ok(State {
            backing,
            nodes: HashMap::from([(ROOT, root)]),
            next_ino: ROOT + 1,
            fail_next: 0,
            lies: false,
            journal: false,
            stats: Stats::default(),
        })
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let node = self.nodes.get(&ino).ok_or(Errno::ENOENT)?;
        let (kind, size) = match &node.kind {
            Kind::Dir(d) => (FileType::Directory, d.live.len() as u64),
            Kind::File(f) => (FileType::RegularFile, f.live_len),
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: node.mtime,
            mtime: node.mtime,
            ctime: node.mtime,
            crtime: node.mtime,
            kind,
            perm: node.perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: node.uid,
            gid: node.gid,
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        })
    }

    fn dir_mut(&mut self, ino: u64) -> Result<&mut Dir, Errno> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.kind) {
            Some(Kind::Dir(d)) => Ok(d),
            Some(Kind::File(_)) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Result<&mut File, Errno> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.kind) {
            Some(Kind::File(f)) => Ok(f),
            Some(Kind::Dir(_)) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn lookup(&mut self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        self.dir_mut(parent)?.live.get(name).copied().ok_or(Errno::ENOENT)
    }

    /// Adds a new node under `parent` (live only: durable once the
    /// directory is fsync'd).
    fn add(&mut self, parent: u64, name: &OsStr, perm: u16, owner: (u32, u32), file: bool) -> Result<u64, Errno> {
        if self.dir_mut(parent)?.live.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let kind = if file {
            let backing = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(self.backing.join(ino.to_string()))
                .map_err(|_| Errno::EIO)?;
            Kind::File(Box::new(File {
                backing,
                durable_len: 0,
                live_len: 0,
                dirty: BTreeMap::new(),
                order: Vec::new(),
                lost: BTreeMap::new(),
                zero_from: u64::MAX,
            }))
        } else {
            Kind::Dir(Dir { live: BTreeMap::new(), durable: BTreeMap::new() })
        };
        self.nodes.insert(ino, Node { perm, uid: owner.0, gid: owner.1, mtime: SystemTime::now(), kind });
        self.dir_mut(parent)?.live.insert(name.to_owned(), ino);
        Ok(ino)
    }

    /// An fsync: fails when told to, lies when told to.
    fn fsync(&mut self, ino: u64) -> Result<(), Errno> {
        self.stats.fsyncs += 1;
        if self.fail_next > 0 {
            self.fail_next -= 1;
            self.stats.failed_fsyncs += 1;
            // As Linux does: the pages are marked clean without being
            // written; they read until evicted (here: the next cut).
            if let Ok(file) = self.file_mut(ino) {
                let dirty = std::mem::take(&mut file.dirty);
                file.order.clear();
                file.lost.extend(dirty);
            }
            return Err(Errno::EIO);
        }
        if self.lies {
            return Ok(());
        }
        match &mut self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)?.kind {
            Kind::File(f) => f.sync().map_err(|_| Errno::EIO)?,
            Kind::Dir(d) => d.durable = d.live.clone(),
        }
        if self.journal {
            for node in self.nodes.values_mut() {
                if let Kind::Dir(d) = &mut node.kind {
                    d.durable = d.live.clone();
                }
            }
        }
        Ok(())
    }

    fn power_cut(&mut self, how: Cut) -> std::io::Result<CutReport> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(match how {
            Cut::Clean => 0,
            Cut::Torn { seed } => seed,
        });
        let mut report = CutReport::default();
        let mut inos: Vec<u64> = self.nodes.keys().copied().collect();
        inos.sort_unstable();
        for ino in inos {
            match &mut self.nodes.get_mut(&ino).expect("listed").kind {
                Kind::Dir(d) => {
                    if d.live != d.durable {
                        if matches!(how, Cut::Torn { .. }) && rng.random_bool(0.5) {
                            d.durable = d.live.clone();
                        } else {
                            d.live = d.durable.clone();
                            report.directories_reverted += 1;
                        }
                    }
                }
                Kind::File(f) => {
                    let (keep, sectors) = match how {
                        Cut::Torn { .. } if !f.order.is_empty() => {
                            (rng.random_range(0..=f.order.len()), rng.random_range(0..=(PAGE as usize / SECTOR)))
                        }
                        _ => (0, 0),
                    };
                    if keep > 0 {
                        report.files_torn += 1;
                    }
                    report.pages_dropped += f.cut(keep, sectors)?;
                }
            }
        }
        // What no durable directory reaches is gone.
        let mut reachable = HashSet::from([ROOT]);
        let mut queue = vec![ROOT];
        while let Some(ino) = queue.pop() {
            if let Some(Node { kind: Kind::Dir(d), .. }) = self.nodes.get(&ino) {
                for child in d.durable.values() {
                    if reachable.insert(*child) {
                        queue.push(*child);
                    }
                }
            }
        }
        let gone: Vec<u64> = self.nodes.keys().filter(|i| !reachable.contains(i)).copied().collect();
        for ino in gone {
            if let Some(Node { kind: Kind::File(_), .. }) = self.nodes.remove(&ino) {
                std::fs::remove_file(self.backing.join(ino.to_string()))?;
            }
        }
        self.stats.cuts += 1;
        Ok(report)
    }
}

fn io_errno(e: &std::io::Error) -> Errno {
    e.raw_os_error().map_or(Errno::EIO, Errno::from_i32)
}

impl Filesystem for CutFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut state = lock(&self.state);
        match state.lookup(parent.0, name).and_then(|ino| state.attr(ino)) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match lock(&self.state).attr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut state = lock(&self.state);
        let result = (|| {
            if let Some(size) = size {
                state.file_mut(ino.0)?.truncate(size).map_err(|e| io_errno(&e))?;
            }
            let node = state.nodes.get_mut(&ino.0).ok_or(Errno::ENOENT)?;
            if let Some(mode) = mode {
                node.perm = (mode & 0o7777) as u16;
            }
            node.uid = uid.unwrap_or(node.uid);
            node.gid = gid.unwrap_or(node.gid);
            if size.is_some() || mtime.is_some() {
                node.mtime = match mtime {
                    Some(TimeOrNow::SpecificTime(t)) => t,
                    _ => SystemTime::now(),
                };
            }
            state.attr(ino.0)
        })();
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let mut state = lock(&self.state);
        let perm = (mode & !umask & 0o7777) as u16;
        match state.add(parent.0, name, perm, (req.uid(), req.gid()), false).and_then(|ino| state.attr(ino)) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut state = lock(&self.state);
        let perm = (mode & !umask & 0o7777) as u16;
        match state.add(parent.0, name, perm, (req.uid(), req.gid()), true).and_then(|ino| state.attr(ino)) {
            Ok(attr) => reply.created(&TTL, &attr, Generation(0), FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut state = lock(&self.state);
        let result = (|| {
            let ino = state.lookup(parent.0, name)?;
            if matches!(state.nodes.get(&ino).map(|n| &n.kind), Some(Kind::Dir(_))) {
                return Err(Errno::EISDIR);
            }
            // The node stays: a durable entry may still name it.
            state.dir_mut(parent.0)?.live.remove(name);
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut state = lock(&self.state);
        let result = (|| {
            let ino = state.lookup(parent.0, name)?;
            if !state.dir_mut(ino)?.live.is_empty() {
                return Err(Errno::ENOTEMPTY);
            }
            state.dir_mut(parent.0)?.live.remove(name);
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut state = lock(&self.state);
        let result = (|| {
            if flags.contains(RenameFlags::RENAME_EXCHANGE) {
                return Err(Errno::EINVAL);
            }
            let ino = state.lookup(parent.0, name)?;
            if let Ok(existing) = state.lookup(newparent.0, newname) {
                if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                    return Err(Errno::EEXIST);
                }
                if let Ok(d) = state.dir_mut(existing)
                    && !d.live.is_empty()
                {
                    return Err(Errno::ENOTEMPTY);
                }
            }
            state.dir_mut(parent.0)?.live.remove(name);
            state.dir_mut(newparent.0)?.live.insert(newname.to_owned(), ino);
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match lock(&self.state).file_mut(ino.0) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut state = lock(&self.state);
        match state.file_mut(ino.0).and_then(|f| f.read(offset, u64::from(size)).map_err(|e| io_errno(&e))) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut state = lock(&self.state);
        let result = state.file_mut(ino.0).and_then(|f| f.write(offset, data).map_err(|e| io_errno(&e)));
        if let Some(node) = state.nodes.get_mut(&ino.0) {
            node.mtime = SystemTime::now();
        }
        match result {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match lock(&self.state).fsync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match lock(&self.state).dir_mut(ino.0) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let mut state = lock(&self.state);
        let entries: Vec<(OsString, u64)> = match state.dir_mut(ino.0) {
            Ok(d) => d.live.iter().map(|(n, i)| (n.clone(), *i)).collect(),
            Err(e) => return reply.error(e),
        };
        let mut all =
            vec![(OsString::from("."), ino.0, FileType::Directory), (OsString::from(".."), ROOT, FileType::Directory)];
        for (name, child) in entries {
            let kind = match state.nodes.get(&child).map(|n| &n.kind) {
                Some(Kind::Dir(_)) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            all.push((name, child, kind));
        }
        for (i, (name, child, kind)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match lock(&self.state).fsync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(1 << 24, 1 << 23, 1 << 23, 1 << 20, 1 << 19, PAGE as u32, 255, PAGE as u32);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        match lock(&self.state).attr(ino.0) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}
