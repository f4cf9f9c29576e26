//! LazyFS (a FUSE file system that keeps every byte not fsynced in its own
//! cache and drops it on `lazyfs::clear-cache`: a power failure on demand)
//! mounted by a test. Built by `../shared/tools/lazyfs/build-here.sh`
//! (scripts/test does it where /dev/fuse exists and exports `LAZYFS_BIN`).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where build-here.sh puts the binary by default.
const DEFAULT_BIN: &str = "/tmp/lazyfs-build/lazyfs/build/lazyfs";

/// The LazyFS binary, or why a power-loss test cannot run here.
pub fn locate() -> Result<PathBuf, String> {
    if !Path::new("/dev/fuse").exists() {
        return Err("no /dev/fuse on this machine (FUSE is needed to mount LazyFS)".into());
    }
    if !on_path("fusermount3") {
        return Err("fusermount3 is not installed (apt package fuse3)".into());
    }
    if let Some(bin) = std::env::var_os("LAZYFS_BIN") {
        let bin = PathBuf::from(bin);
        assert!(bin.is_file(), "LAZYFS_BIN={} does not exist", bin.display());
        return Ok(bin);
    }
    let default = PathBuf::from(DEFAULT_BIN);
    if default.is_file() {
        return Ok(default);
    }
    Err(format!(
        "LazyFS is not built: run scripts/test, or ../shared/tools/lazyfs/build-here.sh \
         and set LAZYFS_BIN (looked for {DEFAULT_BIN})"
    ))
}

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false)
}

/// A mounted LazyFS: `mnt` shows `root`'s files through LazyFS's cache.
pub struct LazyFs {
    bin: PathBuf,
    pub mnt: PathBuf,
    root: PathBuf,
    fifo: PathBuf,
    config: PathBuf,
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
}

impl LazyFs {
    /// Mounts LazyFS on `dir/mnt` over `dir/root` (both created), with its
    /// command fifo at `dir/lazyfs.fifo`.
    pub fn mount(bin: &Path, dir: &Path) -> LazyFs {
        let (mnt, root) = (dir.join("mnt"), dir.join("root"));
        std::fs::create_dir_all(&mnt).expect("mount point");
        std::fs::create_dir_all(&root).expect("backing directory");
        let fifo = dir.join("lazyfs.fifo");
        let config = dir.join("lazyfs.toml");
        std::fs::write(
            &config,
            format!(
                "[faults]\nfifo_path=\"{}\"\n[cache]\napply_eviction=false\n\
                 [cache.simple]\ncustom_size=\"1gb\"\nblocks_per_page=1\n\
                 [filesystem]\nlog_all_operations=false\nlogfile=\"\"\n",
                fifo.display()
            ),
        )
        .expect("LazyFS config");
        let mut fs = LazyFs {
            bin: bin.to_owned(),
            mnt,
            root,
            fifo,
            config,
            child: None,
            log: Arc::new(Mutex::new(Vec::new())),
        };
        fs.start();
        fs
    }

    fn start(&mut self) {
        let mut child = Process::new(&self.bin)
            .arg(&self.mnt)
            .arg("--config-path")
            .arg(&self.config)
            .args(["-o", "allow_other", "-o", "modules=subdir", "-o"])
            .arg(format!("subdir={}", self.root.display()))
            // In the foreground: this test owns the process.
            .arg("-f")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn LazyFS");
        for out in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = self.log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    log.lock().expect("log").push(line);
                }
            });
        }
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.mounted() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("LazyFS exited ({status}):\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "LazyFS did not mount {} within 60 s:\n{}",
                self.mnt.display(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Is `mnt` a LazyFS mount point now (per /proc/self/mountinfo)?
    pub fn mounted(&self) -> bool {
        let mnt = self.mnt.to_string_lossy().into_owned();
        std::fs::read_to_string("/proc/self/mountinfo")
            .map(|t| {
                t.lines().any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.get(4) == Some(&mnt.as_str()) && l.contains("fuse.lazyfs")
                })
            })
            .unwrap_or(false)
    }

    fn log_text(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }

    fn count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .expect("log")
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// The power failure: every byte not fsynced is dropped. Returns once
    /// LazyFS has logged that its cache is cleared.
    pub fn clear_cache(&self) {
        let before = self.count("cache is cleared");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.fifo)
            .expect("LazyFS fifo");
        f.write_all(b"lazyfs::clear-cache\n")
            .expect("write to the fifo");
        drop(f);
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.count("cache is cleared") == before {
            assert!(
                Instant::now() < deadline,
                "LazyFS did not clear its cache within 60 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The file system fails: LazyFS dies, and every operation on the mount
    /// fails ("transport endpoint is not connected") until it is unmounted.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Unmounts (LazyFS exits; its cache is gone), then mounts again: the
    /// next reader sees only what reached `root`.
    pub fn remount(&mut self) {
        self.unmount();
        self.start();
    }

    fn unmount(&mut self) {
        if self.mounted() {
            let _ = Process::new("fusermount3")
                .arg("-u")
                .arg(&self.mnt)
                .status();
        }
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.mounted() {
            // A mount left behind by a killed LazyFS.
            let _ = Process::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.mnt)
                .status();
        }
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        self.unmount();
    }
}
