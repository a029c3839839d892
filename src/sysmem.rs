//! The memory this process may use and uses: the machine's or the container's limit (cgroup v2 or
//! v1), the resident set size now, its peak since a reset (Linux `/proc`), and the bytes the
//! allocator has handed out (glibc). A leaf module.
//!
//! Reading the peak is exact: the kernel keeps the high-water mark (`VmHWM`), and writing `5` to
//! `/proc/self/clear_refs` resets it to the current RSS (Linux 4.0+). Where `/proc` is missing
//! (not Linux) every reading is `None` and callers fall back to what they can do without it.

use std::path::{Path, PathBuf};

/// What the machine (or the cgroup the process runs in) gives this process, in bytes: the smaller
/// of the physical memory and the cgroup limit. `None` when neither can be read.
pub fn available_total() -> Option<u64> {
    let mem_total = read_meminfo("MemTotal:");
    let cgroup = cgroup_limit();
    match (mem_total, cgroup) {
        (Some(m), Some(c)) => Some(m.min(c)),
        (m, c) => m.or(c),
    }
}

/// The default `MEMORY_LIMIT`: [`available_total`] minus a margin for the kernel, the page cache of
/// the model files and other processes (10%, at least 512 MiB).
pub fn default_limit() -> Option<u64> {
    let total = available_total()?;
    let margin = (total / 10).max(512 << 20);
    Some(total.saturating_sub(margin).max(total / 2))
}

/// The cgroup memory limit of this process, if it has one (v2 `memory.max`, v1 `memory.limit_in_bytes`).
pub fn cgroup_limit() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let root = Path::new("/sys/fs/cgroup");
    cgroup_limit_in(&cgroups, root)
}

/// [`cgroup_limit`] from the text of `/proc/self/cgroup` and the cgroup mount point.
pub fn cgroup_limit_in(proc_cgroup: &str, root: &Path) -> Option<u64> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            candidates.push(root.join(rel).join("memory.max")); // v2 (unified)
            candidates.push(root.join("unified").join(rel).join("memory.max"));
        } else if controllers.split(',').any(|c| c == "memory") {
            candidates.push(root.join("memory").join(rel).join("memory.limit_in_bytes"));
            // v1
        }
    }
    candidates.iter().filter_map(|p| std::fs::read_to_string(p).ok()).filter_map(|s| parse_limit(&s)).min()
}

/// A cgroup limit file's value: bytes, or `None` for "max" and the v1 "no limit" (near 2^63).
fn parse_limit(s: &str) -> Option<u64> {
    let v: u64 = s.trim().parse().ok()?;
    (v < (1u64 << 62)).then_some(v)
}

fn read_meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    kib_field(&text, key)
}

fn kib_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// Resident set size of this process now, in bytes.
pub fn rss() -> Option<u64> {
    kib_field(&std::fs::read_to_string("/proc/self/status").ok()?, "VmRSS:")
}

/// Bytes the C allocator has handed out and not had back (every thread's arena and the buffers it
/// mapped on their own; ONNX Runtime allocates there too), from glibc's `mallinfo2`. Resident memory
/// can grow past it while this stays flat: freed memory the allocator keeps, fragmented, for reuse.
/// A leak grows this; so, a little, do glibc's per-thread caches (tcache) while they fill, whose
/// chunks it counts as handed out. `None` off glibc.
pub fn heap_in_use() -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics (glibc 2.33+).
        let info = unsafe { libc::mallinfo2() };
        Some((info.uordblks + info.hblkhd) as u64)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

/// The peak resident set size since the process started or the last [`reset_peak`], in bytes.
pub fn peak_rss() -> Option<u64> {
    kib_field(&std::fs::read_to_string("/proc/self/status").ok()?, "VmHWM:")
}

/// Memory the host still has available (`MemAvailable`), or what the cgroup limit leaves when that
/// is less (limit minus `memory.current`, cgroup v2), in bytes.
pub fn host_available() -> Option<u64> {
    let host = read_meminfo("MemAvailable:");
    let cgroup = cgroup_limit().and_then(|limit| {
        let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let rel = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?.trim_start_matches('/');
        let used: u64 =
            std::fs::read_to_string(Path::new("/sys/fs/cgroup").join(rel).join("memory.current")).ok()?.trim().parse().ok()?;
        Some(limit.saturating_sub(used))
    });
    match (host, cgroup) {
        (Some(h), Some(c)) => Some(h.min(c)),
        (h, c) => h.or(c),
    }
}

/// CPU time this process has used (user + system, all threads), in seconds.
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    cpu_seconds_in(&stat, clock_ticks())
}

/// [`cpu_seconds`] from the text of `/proc/self/stat` (fields 14 and 15 after the command name).
fn cpu_seconds_in(stat: &str, ticks_per_second: f64) -> Option<f64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_second)
}

/// Clock ticks per second of `/proc` times (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a constant of the system.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Resets the peak to the current RSS. Returns false when the kernel does not allow it.
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Parses a byte size: a plain number of bytes, or a number with a unit `K`, `M`, `G`, `T`
/// (powers of 1024; `KB`/`KiB`/`k` spellings too), e.g. `24G`, `6000M`, `1.5GiB`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("`{s}` is not a size (like 24G, 6000M or 1073741824)"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().trim_end_matches("ib").trim_end_matches('b') {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use K, M, G or T)")),
    };
    let bytes = value * scale as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 / 2.0 {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(bytes as u64)
}

/// A byte count for people: `1.5 GiB`, `300 MiB`, `12 KiB`.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.0} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.0} KiB", b / 1024.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_and_available_memory_are_read() {
        let stat = "4242 (qwen edit (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 100 0 0";
        assert_eq!(cpu_seconds_in(stat, 100.0), Some(3.0), "utime 250 + stime 50 ticks");
        assert_eq!(cpu_seconds_in("garbage", 100.0), None);
        if Path::new("/proc/self/stat").exists() {
            let spent = cpu_seconds().expect("Linux /proc");
            let avail = host_available().expect("MemAvailable");
            assert!(spent >= 0.0 && avail > 0 && avail <= available_total().unwrap_or(u64::MAX) * 2, "{spent} {avail}");
        }
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_bytes("24G").unwrap(), 24 << 30);
        assert_eq!(parse_bytes("24GiB").unwrap(), 24 << 30);
        assert_eq!(parse_bytes("6000M").unwrap(), 6000 << 20);
        assert_eq!(parse_bytes("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_bytes(" 512 KB ").unwrap(), 512 << 10);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("12X").is_err());
        assert!(parse_bytes("-5G").is_err());
        assert_eq!(human(3 << 29), "1.5 GiB");
        assert_eq!(human(300 << 20), "300 MiB");
    }

    #[test]
    fn cgroup_files_v1_and_v2() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("memory/box/a")).unwrap();
        std::fs::write(root.join("memory/box/a/memory.limit_in_bytes"), "8589934592\n").unwrap();
        let v1 = "4:memory:/box/a\n3:cpuset:/\n";
        assert_eq!(cgroup_limit_in(v1, root), Some(8 << 30));
        std::fs::write(root.join("memory/box/a/memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        assert_eq!(cgroup_limit_in(v1, root), None, "v1's 'no limit'");
        std::fs::create_dir_all(root.join("svc")).unwrap();
        std::fs::write(root.join("svc/memory.max"), "2147483648\n").unwrap();
        assert_eq!(cgroup_limit_in("0::/svc\n", root), Some(2 << 30));
        std::fs::write(root.join("svc/memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_limit_in("0::/svc\n", root), None);
    }

    #[test]
    fn this_process_is_measured() {
        if std::fs::metadata("/proc/self/status").is_err() {
            return; // not Linux
        }
        let rss = rss().unwrap();
        assert!(rss > 1 << 20, "{rss}");
        assert!(peak_rss().unwrap() >= rss);
        assert!(available_total().unwrap() >= rss);
        let limit = default_limit().unwrap();
        assert!(limit < available_total().unwrap() && limit >= available_total().unwrap() / 2);
    }
}
