//! The filesystem, mounted, against what a power cut must and must not keep.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use skylark_cutfs::{Cut, Mounted};
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

fn mounted(dir: &Path) -> Mounted {
    let (backing, mnt) = (dir.join("backing"), dir.join("mnt"));
    std::fs::create_dir_all(&backing).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    skylark_cutfs::mount(&backing, &mnt).unwrap_or_else(|e| panic!("{e}"))
}

fn sync_dir(path: &Path) {
    File::open(path).unwrap().sync_all().unwrap();
}

#[test]
fn a_cut_keeps_exactly_what_was_synced() {
    let dir = tempfile::tempdir().unwrap();
    let fs = mounted(dir.path());
    let root = fs.path().to_owned();
    // Durable: data synced, entry synced.
    let mut kept = File::create(root.join("kept")).unwrap();
    kept.write_all(b"synced").unwrap();
    kept.sync_all().unwrap();
    sync_dir(&root);
    // After the sync: more data, an overwrite, a truncation - none synced.
    kept.write_all(b" and more").unwrap();
    kept.write_all_at(b"S", 0).unwrap();
    // Data synced but the entry never: the file is gone after the cut.
    let mut orphan = File::create(root.join("orphan")).unwrap();
    orphan.write_all(b"lost with its name").unwrap();
    orphan.sync_all().unwrap();
    // Renamed over, not synced: the old name and content come back.
    std::fs::write(root.join("kept.new"), b"replacement").unwrap();
    std::fs::rename(root.join("kept.new"), root.join("kept")).unwrap();
    assert_eq!(std::fs::read(root.join("kept")).unwrap(), b"replacement", "reads see the live state");
    drop((kept, orphan));

    let report = fs.control().power_cut(Cut::Clean).unwrap();
    assert!(report.pages_dropped > 0 && report.directories_reverted == 1, "{report:?}");
    assert_eq!(std::fs::read(root.join("kept")).unwrap(), b"synced");
    assert_eq!(std::fs::read(root.join("orphan")).unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(std::fs::read(root.join("kept.new")).unwrap_err().kind(), ErrorKind::NotFound);
    let names: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["kept"]);

    // A truncation and a growth, synced, survive as such.
    let f = OpenOptions::new().write(true).open(root.join("kept")).unwrap();
    f.set_len(2).unwrap();
    f.set_len(5).unwrap();
    f.write_all_at(b"!", 5).unwrap();
    f.sync_all().unwrap();
    f.write_all_at(b"xxxx", 0).unwrap();
    drop(f);
    fs.control().power_cut(Cut::Clean).unwrap();
    assert_eq!(std::fs::read(root.join("kept")).unwrap(), b"sy\0\0\0!");
}

#[test]
fn a_failed_fsync_loses_the_data_and_a_retry_does_not_bring_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let fs = mounted(dir.path());
    let path = fs.path().join("log");
    let mut f = File::create(&path).unwrap();
    f.write_all(b"one;").unwrap();
    f.sync_all().unwrap();
    sync_dir(fs.path());
    f.write_all(b"two;").unwrap();
    fs.control().fail_fsyncs(1);
    assert_eq!(f.sync_all().unwrap_err().raw_os_error(), Some(5), "EIO");
    // As on Linux: the data still reads, and the next fsync says yes...
    assert_eq!(std::fs::read(&path).unwrap(), b"one;two;");
    f.sync_all().unwrap();
    drop(f);
    // ...but it was never written (the size it grew to may have been:
    // then zeros stand where it was).
    fs.control().power_cut(Cut::Clean).unwrap();
    let after = std::fs::read(&path).unwrap();
    assert!(after.starts_with(b"one;") && after[4..].iter().all(|b| *b == 0), "{after:?}");
    assert_eq!(fs.control().stats().failed_fsyncs, 1);
}

#[test]
fn a_lying_fsync_makes_nothing_durable() {
    let dir = tempfile::tempdir().unwrap();
    let fs = mounted(dir.path());
    let path = fs.path().join("f");
    fs.control().set_fsync_lies(true);
    let mut f = File::create(&path).unwrap();
    f.write_all(b"said durable").unwrap();
    f.sync_all().unwrap();
    sync_dir(fs.path());
    drop(f);
    fs.control().power_cut(Cut::Clean).unwrap();
    assert!(!path.exists());
}

#[test]
fn a_torn_cut_keeps_a_prefix_of_the_unsynced_pages_in_whole_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let fs = mounted(dir.path());
    let path = fs.path().join("pages");
    let f = File::create(&path).unwrap();
    f.write_all_at(&vec![0u8; 4 * 4096], 0).unwrap();
    f.sync_all().unwrap();
    sync_dir(fs.path());
    drop(f);
    let mut torn_somewhere = false;
    for seed in 0..16u64 {
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        // Pages written in the order 2, 0, 3, 1.
        for page in [2u64, 0, 3, 1] {
            f.write_all_at(&vec![seed as u8 + 1; 4096], page * 4096).unwrap();
        }
        drop(f);
        fs.control().power_cut(Cut::Torn { seed }).unwrap();
        let after = std::fs::read(&path).unwrap();
        assert_eq!(after.len(), 4 * 4096);
        let written: Vec<usize> = [2usize, 0, 3, 1]
            .iter()
            .map(|p| after[p * 4096..(p + 1) * 4096].iter().filter(|b| **b != 0).count())
            .collect();
        // A prefix in write order: whole pages, then at most one torn page
        // (a whole number of sectors from its start), then nothing.
        let full = written.iter().take_while(|n| **n == 4096).count();
        assert!(written[full..].iter().skip(1).all(|n| *n == 0), "seed {seed}: {written:?}");
        if let Some(part) = written.get(full) {
            assert_eq!(part % 512, 0, "seed {seed}: {written:?}");
            torn_somewhere |= *part > 0;
        }
        // Make the next round start from zeros again.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&vec![0u8; 4 * 4096], 0).unwrap();
        f.sync_all().unwrap();
    }
    assert!(torn_somewhere, "sixteen torn cuts never tore a page");
}

#[test]
fn with_a_metadata_journal_any_fsync_keeps_every_earlier_name() {
    let dir = tempfile::tempdir().unwrap();
    let fs = mounted(dir.path());
    fs.control().set_metadata_journal(true);
    let root = fs.path().to_owned();
    std::fs::create_dir(root.join("sub")).unwrap();
    std::fs::write(root.join("sub/tmp"), b"renamed").unwrap();
    std::fs::rename(root.join("sub/tmp"), root.join("sub/renamed")).unwrap();
    // One file's fsync commits the directory changes made before it...
    let mut synced = File::create(root.join("synced")).unwrap();
    synced.write_all(b"data").unwrap();
    synced.sync_all().unwrap();
    // ...but not those made after it.
    std::fs::write(root.join("later"), b"x").unwrap();
    drop(synced);
    fs.control().power_cut(Cut::Clean).unwrap();
    let mut names: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["sub", "synced"]);
    assert_eq!(std::fs::read(root.join("synced")).unwrap(), b"data");
    // The renamed file's name survived; its data was never synced.
    assert_eq!(std::fs::read(root.join("sub/renamed")).unwrap(), b"");
}
