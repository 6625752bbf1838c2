//! SQLite: keeps the database file's pages in memory while the store sits idle
//! (`COURIER_SQLITE_RESIDENT_MB`, off by default).
//!
//! Some hosts reclaim file pages nobody has touched for a while even with plenty of memory free.
//! This machine's kernel runs such a scheme (DAMON `pageout` of page-cache pages idle for about a
//! minute, mapped pages exempt): after the store sat idle its pages come from the disk again, and
//! the first searches after a pause were measured at several times the warm latency. Courier
//! reads the file with `pread` (see `db::sqlite_pragmas` for why not SQLite's own memory-mapped
//! I/O), so its pages are unmapped page cache, the kind such schemes reclaim.
//!
//! The keeper maps the file read-only into the process and faults every page of it in, so the
//! pages are mapped page cache: shared with SQLite's reads (the same pages, not a copy), exempt
//! from such reclaim, and still reclaimable by the kernel under real memory pressure (which is why
//! the keeper faults the mapping in again on every pass). It never reads through the mapping
//! itself (the mappings are raw, `MmapRaw`: no Rust reference to their memory is ever made), so
//! another writer changing the file, or truncating it under them, is harmless (pages past the end
//! are simply gone). The cost: up to the limit of memory, which shows in the process's resident
//! size as shared file pages. Linux only (`MAP_POPULATE`, and `MADV_POPULATE_READ` of Linux 5.14);
//! elsewhere the setting is refused.

use memmap2::{MmapOptions, MmapRaw};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The file is mapped in pieces of this size, so that its growth maps only the new part.
const PIECE: u64 = if cfg!(test) { 4 << 20 } else { 256 << 20 };

/// How often the keeper maps what the file grew by and faults in what was reclaimed.
pub const EVERY: Duration = Duration::from_secs(30);

/// The mappings of the first `limit` bytes of one file.
pub struct Resident {
    file: File,
    limit: u64,
    /// Contiguous from offset 0: every piece but the last is `PIECE` long.
    maps: Vec<MmapRaw>,
    /// Whether faulting in again has failed once (said once in the log).
    repopulate_failed: bool,
}

impl Resident {
    pub fn open(path: &Path, limit: u64) -> std::io::Result<Resident> {
        Ok(Resident {
            file: File::open(path)?,
            limit,
            maps: Vec::new(),
            repopulate_failed: false,
        })
    }

    /// Bytes of the file mapped now.
    pub fn mapped(&self) -> u64 {
        self.maps.iter().map(|m| m.len() as u64).sum()
    }

    /// Follows the file's size (up to the limit) and faults every mapped page in. Returns the
    /// bytes mapped.
    pub fn refresh(&mut self) -> std::io::Result<u64> {
        let want = self.file.metadata()?.len().min(self.limit);
        // Drop the pieces that no longer fit as they are: past a shrunk end, and a short last
        // piece the file has grown beyond (mapped again at its new length below).
        let mut end = 0u64;
        let mut keep = 0;
        for m in &self.maps {
            let len = m.len() as u64;
            if end + len > want || (len < PIECE && end + len < want) {
                break;
            }
            end += len;
            keep += 1;
        }
        self.maps.truncate(keep);
        // Pages the kernel reclaimed since the last pass (under memory pressure) come back.
        for m in &self.maps {
            if let Err(e) = repopulate(m) {
                if !self.repopulate_failed {
                    self.repopulate_failed = true;
                    tracing::warn!(error = %e, "cannot fault the kept SQLite file in again (Linux 5.14 or later can); pages the kernel reclaims stay out");
                }
                break;
            }
        }
        while end < want {
            let len = (want - end).min(PIECE);
            let m = MmapOptions::new()
                .offset(end)
                .len(len as usize)
                .populate()
                .map_raw_read_only(&self.file)?;
            self.maps.push(m);
            end += len;
        }
        Ok(end)
    }
}

#[cfg(target_os = "linux")]
fn repopulate(m: &MmapRaw) -> std::io::Result<()> {
    m.advise(memmap2::Advice::PopulateRead)
}

#[cfg(not(target_os = "linux"))]
fn repopulate(_: &MmapRaw) -> std::io::Result<()> {
    Ok(())
}

/// The keeper thread of a store: stops when this is dropped.
pub struct Keeper {
    _stop: std::sync::mpsc::Sender<()>,
    mapped: Arc<AtomicU64>,
}

impl Keeper {
    /// Starts keeping the first `limit` bytes of the database file at `path` in memory.
    pub fn start(path: PathBuf, limit: u64) -> std::io::Result<Keeper> {
        if !cfg!(target_os = "linux") {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "keeping the database file in memory needs Linux",
            ));
        }
        let mut resident = Resident::open(&path, limit)?;
        let mapped = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let shown = mapped.clone();
        std::thread::Builder::new()
            .name("courier-resident".into())
            .spawn(move || {
                let mut first = true;
                loop {
                    match resident.refresh() {
                        Ok(n) => {
                            shown.store(n, Ordering::Relaxed);
                            if first {
                                tracing::info!(
                                    mapped_bytes = n,
                                    limit_mib = limit >> 20,
                                    "keeping the SQLite database in memory"
                                );
                                first = false;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot keep the SQLite database in memory")
                        }
                    }
                    match stopped.recv_timeout(EVERY) {
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                }
            })?;
        Ok(Keeper {
            _stop: stop,
            mapped,
        })
    }

    /// Bytes of the database file the last pass kept mapped.
    pub fn mapped(&self) -> u64 {
        self.mapped.load(Ordering::Relaxed)
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::Write;

    /// Resident pages of the mappings of `path` in this process, from `/proc/self/smaps`.
    fn resident_kib(path: &Path) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let name = path.to_str().unwrap();
        let mut ours = false;
        let mut kib = 0;
        for line in smaps.lines() {
            let range = line.split_whitespace().next().unwrap_or_default();
            if range.contains('-') && range.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                ours = line.ends_with(name);
            } else if ours && line.starts_with("Rss:") {
                kib += line
                    .split_whitespace()
                    .nth(1)
                    .unwrap()
                    .parse::<u64>()
                    .unwrap();
            }
        }
        kib
    }

    #[test]
    fn follows_the_file_as_it_grows_and_shrinks_within_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let mut f = File::create(&path).unwrap();
        f.write_all(&vec![7u8; 1 << 20]).unwrap();
        f.sync_all().unwrap();
        let mut r = Resident::open(&path, 600 << 20).unwrap();
        assert_eq!(r.refresh().unwrap(), 1 << 20);
        // Every page is faulted in (mapped page cache), not merely mapped.
        assert!(
            resident_kib(&path) >= 1 << 10,
            "{} KiB",
            resident_kib(&path)
        );
        // Grown: the short piece is mapped again at its new length.
        f.write_all(&vec![8u8; 2 << 20]).unwrap();
        assert_eq!(r.refresh().unwrap(), 3 << 20);
        assert_eq!(r.maps.len(), 1);
        assert!(resident_kib(&path) >= 3 << 10);
        // Past one piece: whole pieces stay, the rest is a piece of its own.
        f.write_all(&vec![9u8; PIECE as usize]).unwrap();
        assert_eq!(r.refresh().unwrap(), PIECE + (3 << 20));
        assert_eq!(r.maps.len(), 2);
        assert!(resident_kib(&path) >= (PIECE >> 10) + (3 << 10));
        // Shrunk: nothing past the new end stays mapped, and nothing faults.
        f.set_len(2 << 20).unwrap();
        assert_eq!(r.refresh().unwrap(), 2 << 20);
        assert_eq!(r.mapped(), 2 << 20);
        assert_eq!(r.maps.len(), 1);
        // The limit holds.
        let mut small = Resident::open(&path, 1 << 20).unwrap();
        assert_eq!(small.refresh().unwrap(), 1 << 20);
        drop(r);
        drop(small);
        assert_eq!(resident_kib(&path), 0);
    }

    #[test]
    fn the_keeper_maps_at_start_and_stops_with_its_handle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        std::fs::write(&path, vec![1u8; 1 << 20]).unwrap();
        let k = Keeper::start(path.clone(), u64::MAX).unwrap();
        let t = std::time::Instant::now();
        while k.mapped() == 0 && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(k.mapped(), 1 << 20);
        drop(k);
        let t = std::time::Instant::now();
        while resident_kib(&path) > 0 && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(resident_kib(&path), 0, "the thread let go of its mappings");
    }
}
