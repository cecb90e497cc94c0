//! Small system helpers for the harness: commands, namespaces, cgroups.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Fails with a clear message unless running as root.
pub fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("this needs root (network namespaces, cgroups, eBPF): run it as root, e.g. `sudo -E cargo xtask test`");
    }
    Ok(())
}

/// Runs a command to completion; an error carries its stderr.
pub fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

/// `ip ARGS...`
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args)).map(|_| ())
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    text.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .context("no cgroup2 filesystem is mounted")
}

/// Mounts bpffs at /sys/fs/bpf when nothing is mounted there.
pub fn ensure_bpffs() -> anyhow::Result<()> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mounted = text.lines().any(|l| l.split_whitespace().nth(4) == Some("/sys/fs/bpf") && l.contains(" - bpf "));
    if !mounted {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

/// Makes `cmd` start inside `cgroup` and the network namespace at `netns`.
/// The child joins the cgroup before exec, so every socket it opens is
/// seen by the cgroup's programs.
pub fn enter(cmd: &mut Command, cgroup: &Path, netns: &Path) -> anyhow::Result<()> {
    let procs = File::options()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .with_context(|| format!("opening {}/cgroup.procs", cgroup.display()))?;
    let ns = File::open(netns).with_context(|| format!("opening netns {}", netns.display()))?;
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe system calls (write, setns) on descriptors opened
    // above, which it owns and keeps alive.
    unsafe {
        cmd.pre_exec(move || {
            // Writing 0 moves the writing process.
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Runs `f` on a fresh thread inside the network namespace at `netns`.
/// Only that thread changes namespace.
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    let ns = File::open(netns).with_context(|| format!("opening netns {}", netns.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this thread only, with a valid namespace fd.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {}: {}", netns.display(), std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {} panicked", netns.display()))?
    })
}

/// A plain HTTP/1.1 GET from inside `netns`: (status, body).
pub fn http_get(netns: &Path, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    in_netns(netns, || -> anyhow::Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("no status line")?;
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Ok((status, body))
    })?
}

/// Whether something accepts TCP connections at `addr` inside `netns`.
pub fn can_connect(netns: &Path, addr: SocketAddr) -> bool {
    in_netns(netns, || TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()).unwrap_or(false)
}

/// Polls `f` every 50 ms until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `sig` to `pid` (a process this harness started).
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid we own; errors (already gone) are fine.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Kills every process in a cgroup subtree (cgroup.kill) and removes the
/// subtree, deepest first. Only used on cgroups the harness created.
pub fn remove_cgroup_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    let mut dirs = Vec::new();
    collect_dirs(dir, &mut dirs);
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        // The kernel needs a moment to move killed tasks out.
        wait_until(Duration::from_secs(5), || match std::fs::remove_dir(&d) {
            Ok(()) => true,
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        });
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_owned());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

/// `bpftool -j ARGS...` parsed; an empty answer is an empty list.
pub fn bpftool(args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = run(Command::new("bpftool").arg("-j").args(args))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(serde_json::Value::Array(Vec::new()));
    }
    Ok(serde_json::from_str(&text)?)
}

/// Programs attached to a cgroup (not inherited ones): (id, name).
pub fn cgroup_programs(cgroup: &Path) -> anyhow::Result<Vec<(u64, String)>> {
    let v = bpftool(&["cgroup", "show", &cgroup.display().to_string()])?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p["id"].as_u64()?, p["name"].as_str().unwrap_or_default().to_owned())))
                .collect()
        })
        .unwrap_or_default())
}

/// What the kernel has loaded: program ids, and the program id of each link.
pub struct Loaded {
    pub programs: Vec<u64>,
    pub link_programs: Vec<u64>,
}

impl Loaded {
    /// Whether any of `ids` is still loaded or still has a link.
    pub fn any_of(&self, ids: &[u64]) -> bool {
        self.programs.iter().chain(&self.link_programs).any(|p| ids.contains(p))
    }
}

pub fn loaded() -> anyhow::Result<Loaded> {
    let ids = |v: serde_json::Value, key: &str| -> Vec<u64> {
        v.as_array().map(|a| a.iter().filter_map(|p| p[key].as_u64()).collect()).unwrap_or_default()
    };
    Ok(Loaded {
        programs: ids(bpftool(&["prog", "show"])?, "id"),
        link_programs: ids(bpftool(&["link", "show"])?, "prog_id"),
    })
}

/// Captures every frame on every interface of the network namespace at
/// `netns` while `during` runs, and says whether `needle` appeared in any
/// of them (an AF_PACKET socket, as tcpdump would use).
pub fn wire_contains<T>(netns: &Path, needle: &[u8], during: impl FnOnce() -> T) -> anyhow::Result<(bool, T)> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};
    let ns = File::open(netns).with_context(|| format!("opening netns {}", netns.display()))?;
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel();
    let needle = needle.to_vec();
    let stop2 = stop.clone();
    let capture = std::thread::spawn(move || -> anyhow::Result<bool> {
        // SAFETY: setns on this thread only, with a valid namespace fd.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
        // SAFETY: plain socket(2); checked below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: fd is ours; owned from here on.
        let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
        // SAFETY: tv is a valid timeval of the stated size.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        let _ = ready_tx.send(());
        let mut buf = vec![0u8; 65536];
        let mut found = false;
        while !stop2.load(Ordering::SeqCst) {
            // SAFETY: buf is writable for its length.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 && buf[..n as usize].windows(needle.len()).any(|w| w == needle.as_slice()) {
                found = true;
            }
        }
        Ok(found)
    });
    let _ = ready_rx.recv_timeout(Duration::from_secs(5));
    let out = during();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let found = capture.join().map_err(|_| anyhow::anyhow!("capture thread panicked"))??;
    Ok((found, out))
}

/// TCP counters of the network namespace `pid` runs in, from
/// /proc/PID/net/snmp: (PassiveOpens, OutRsts). Any connection attempt to
/// the namespace moves one of them: accepted SYNs the first, SYNs to a
/// closed port the second.
pub fn tcp_inbound_attempts(pid: u32) -> anyhow::Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/snmp"))?;
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        anyhow::bail!("/proc/{pid}/net/snmp has no Tcp lines");
    };
    let get = |name: &str| -> anyhow::Result<u64> {
        let i = names.split_whitespace().position(|n| n == name).context(format!("no Tcp {name}"))?;
        Ok(values.split_whitespace().nth(i).context("short Tcp line")?.parse()?)
    };
    Ok((get("PassiveOpens")?, get("OutRsts")?))
}

/// What `promtool check metrics` says of an exposition: Ok, or its complaint.
pub fn promtool_check(metrics: &str) -> anyhow::Result<Result<(), String>> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running promtool (cargo xtask setup installs it)")?;
    child.stdin.take().context("promtool stdin")?.write_all(metrics.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok(if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    })
}

/// The sum of the samples of metric `name` in Prometheus text `text` whose
/// labels contain every one of `labels` (e.g. `class="OK"`).
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let (n, rest) = key.split_once('{').unwrap_or((key, ""));
            (n == name && labels.iter().all(|w| rest.contains(w))).then(|| value.parse::<u64>().ok()).flatten()
        })
        .sum()
}

/// Open descriptors of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// What each open descriptor of process `pid` is (`/proc/PID/fd` links),
/// sorted and counted, for a failure message that says what was left open.
pub fn fd_list(pid: u32) -> String {
    let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten() {
        let target = std::fs::read_link(e.path()).map(|t| t.display().to_string()).unwrap_or_else(|_| "?".into());
        // socket:[12345] -> socket; keep paths and anon inodes whole.
        let kind = match target.split_once(":[") {
            Some((k, _)) => k.to_string(),
            None => target,
        };
        *kinds.entry(kind).or_default() += 1;
    }
    kinds.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", ")
}

/// Resident memory of process `pid`, in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmRSS:").and_then(|v| v.split_whitespace().next()?.parse().ok()))
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod metric_tests {
    #[test]
    fn sums_the_samples_whose_labels_match() {
        let text = "# TYPE mesh_requests_total counter\n\
                    mesh_requests_total{direction=\"inbound\",class=\"OK\"} 3\n\
                    mesh_requests_total{direction=\"outbound\",class=\"OK\"} 4\n\
                    mesh_requests_total_other{class=\"OK\"} 100\n\
                    mesh_spans_dropped_total 7\n";
        assert_eq!(super::metric_sum(text, "mesh_requests_total", &["class=\"OK\""]), 7);
        assert_eq!(super::metric_sum(text, "mesh_requests_total", &["direction=\"inbound\""]), 3);
        assert_eq!(super::metric_sum(text, "mesh_spans_dropped_total", &[]), 7);
        assert_eq!(super::metric_sum(text, "mesh_nothing", &[]), 0);
    }
}
