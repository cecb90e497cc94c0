//! Finding the cgroup2 mount: it may be `/sys/fs/cgroup` (unified) or
//! `/sys/fs/cgroup/unified` (hybrid), so it is read from mountinfo.

use std::path::PathBuf;

/// The mount point of the first cgroup2 filesystem in `mountinfo` text.
pub fn cgroup2_root_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent maj:min root mount-point options [optional...] - fstype source super
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v as char);
            i += 4;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// The cgroup2 mount of this process's mount namespace.
pub fn cgroup2_root() -> std::io::Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    cgroup2_root_in(&text).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no cgroup2 filesystem is mounted (see /proc/self/mountinfo); mount one: mount -t cgroup2 none /sys/fs/cgroup",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_unified_mounts() {
        let hybrid = "25 24 0:22 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755\n\
                      26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
                      27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(cgroup2_root_in(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let unified = "30 1 0:26 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_root_in(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(cgroup2_root_in("1 0 0:1 / / rw - ext4 /dev/vda rw\n"), None);
        let escaped = "30 1 0:26 / /mnt/my\\040cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_root_in(escaped), Some(PathBuf::from("/mnt/my cg")));
    }
}
