//! Finding a process of a pod on this node, for its network namespace:
//! with `hostPID`, the host's /proc shows every container's processes, and
//! each one's cgroup path names its pod's UID (`…/pod<uid>/…` with the
//! cgroupfs driver, `…-pod<uid with _>.slice/…` with the systemd one).

use std::path::Path;

/// The lowest pid under `proc_root` whose cgroup belongs to the pod `uid`
/// (usually the pod's sandbox, which lives as long as the pod).
pub fn pid_of_pod(proc_root: &Path, uid: &str) -> Option<i64> {
    let (cgroupfs, systemd) = needles(uid);
    let entries = std::fs::read_dir(proc_root).ok()?;
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i64>().ok())
        .filter(|&pid| in_pod(proc_root, pid, &cgroupfs, &systemd))
        .min()
}

/// Whether process `pid` (still) belongs to the pod `uid`.
pub fn pid_in_pod(proc_root: &Path, pid: i64, uid: &str) -> bool {
    let (cgroupfs, systemd) = needles(uid);
    in_pod(proc_root, pid, &cgroupfs, &systemd)
}

fn needles(uid: &str) -> (String, String) {
    (format!("pod{uid}"), format!("pod{}", uid.replace('-', "_")))
}

fn in_pod(proc_root: &Path, pid: i64, cgroupfs: &str, systemd: &str) -> bool {
    std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup"))
        .is_ok_and(|c| c.lines().any(|l| names_pod(l, cgroupfs) || names_pod(l, systemd)))
}

/// Whether a cgroup line has `pod` + uid as a whole path element or
/// systemd unit-name part.
fn names_pod(line: &str, needle: &str) -> bool {
    line.match_indices(needle).any(|(i, _)| {
        let before = line[..i].chars().next_back();
        let after = line[i + needle.len()..].chars().next();
        matches!(before, Some('/') | Some('-')) && matches!(after, None | Some('/') | Some('.'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_pods_lowest_pid_with_either_cgroup_driver() {
        let root = std::env::temp_dir().join(format!("mesh-procs-{}", std::process::id()));
        let uid = "8b9c0d1e-2f3a-4b4c-8d5e-6f7a8b9c0d11";
        let under = uid.replace('-', "_");
        let procs = [
            ("300", format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{under}.slice/cri-containerd-1.scope\n")),
            ("120", format!("0::/kubepods/burstable/pod{uid}/0123abcd\n")),
            // Another pod whose UID shares a prefix, and a host process.
            ("50", format!("0::/kubepods/burstable/pod{uid}0/0123abcd\n")),
            ("1", "0::/init.scope\n".to_owned()),
        ];
        for (pid, cgroup) in &procs {
            std::fs::create_dir_all(root.join(pid)).unwrap();
            std::fs::write(root.join(pid).join("cgroup"), cgroup).unwrap();
        }
        std::fs::create_dir_all(root.join("self")).unwrap();
        assert_eq!(pid_of_pod(&root, uid), Some(120));
        std::fs::remove_dir_all(root.join("120")).unwrap();
        assert_eq!(pid_of_pod(&root, uid), Some(300), "the systemd driver's name");
        assert_eq!(pid_of_pod(&root, "0d1e2f3a-4b5c-4d6e-8f7a-8b9c0d1e2f13"), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
