//! Starting a node's mesh-daemon, and the handle a test drives it with.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::{Cluster, Node, ADMIN_PORT};
use crate::sys;

impl Cluster {
    /// Starts mesh-daemon for `node` with its own cgroup, pin dir, state
    /// dir, API socket and netns, and waits until it reports ready.
    pub fn start_daemon(&self, node: &str, config: &Path, extra: &[&str]) -> anyhow::Result<Daemon> {
        self.start_daemon_with(node, Some(config), extra, &[])
    }

    /// [`Cluster::start_daemon`] with an optional config and more
    /// environment (e.g. KUBECONFIG).
    pub fn start_daemon_with(
        &self,
        node: &str,
        config: Option<&Path>,
        extra: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> anyhow::Result<Daemon> {
        self.launch_daemon(node, config, extra, env, Wait::Admin("/ready"), None)
    }

    /// Starts a second daemon for `node` while the first runs (same
    /// flags, its own log), from `binary` (another build) or this build;
    /// returns once it reports that it took the listeners over and the
    /// first one was told to drain.
    pub fn start_successor(
        &self,
        node: &str,
        config: &Path,
        extra: &[&str],
        binary: Option<&Path>,
    ) -> anyhow::Result<Daemon> {
        self.launch_daemon(node, Some(config), extra, &[], Wait::Log(SUCCEEDED), binary)
    }

    /// Starts mesh-daemon for `node` like [`Cluster::start_daemon`], but
    /// waits only until it is live: for a daemon expected not to be ready.
    pub fn start_daemon_live(&self, node: &str, extra: &[&str]) -> anyhow::Result<Daemon> {
        self.launch_daemon(node, None, extra, &[], Wait::Admin("/live"), None)
    }

    fn launch_daemon(
        &self,
        node: &str,
        config: Option<&Path>,
        extra: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
        wait_for: Wait,
        binary: Option<&Path>,
    ) -> anyhow::Result<Daemon> {
        let n = self.node(node).clone();
        // A successor writes a log of its own.
        let mut log_path = self.dir.join(format!("daemon-{node}.log"));
        for i in 2.. {
            if !matches!(wait_for, Wait::Log(_)) || !log_path.exists() {
                break;
            }
            log_path = self.dir.join(format!("daemon-{node}-{i}.log"));
        }
        let log = File::options().create(true).append(true).open(&log_path)?;
        let mut cmd = Command::new(binary.unwrap_or(&self.bins.daemon));
        cmd.arg("run");
        if let Some(config) = config {
            cmd.arg("--config").arg(config);
        }
        cmd.args(["--node", node])
            .arg("--cgroup")
            .arg(&n.cgroup)
            .arg("--pin-dir")
            .arg(&n.pin_dir)
            .arg("--state-dir")
            .arg(self.state_dir(node))
            .arg("--api-socket")
            .arg(self.api_socket(node))
            // A daemon with an issuer holds the trust bundle only.
            .args(if extra.contains(&"--issuer") { self.trust_flags()? } else { self.ca_flags()? })
            .args(extra)
            .env("RUST_LOG", std::env::var("MESH_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        cmd.envs(env.iter().copied());
        sys::enter(&mut cmd, &n.cgroup.join("mesh-daemon"), &n.netns)?;
        let child = cmd.spawn().context("starting mesh-daemon")?;
        let mut d = Daemon { child: Some(child), node: n, log: log_path };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = d.try_wait() {
                bail!("mesh-daemon for {node} exited with {status} before it was ready:\n{}", d.log_text());
            }
            let up = match wait_for {
                Wait::Admin(path) => matches!(d.admin_get(path), Ok((200, _))),
                Wait::Log(line) => d.log_text().contains(line),
            };
            if up {
                return Ok(d);
            }
            if Instant::now() > deadline {
                bail!("mesh-daemon for {node} not ready after 30 s:\n{}", d.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// What a new daemon logs once the one before it was told to drain.
pub const SUCCEEDED: &str = "the daemon before this one drains";

#[derive(Clone, Copy)]
enum Wait {
    /// An admin path answers 200.
    Admin(&'static str),
    /// The log holds this line.
    Log(&'static str),
}

/// A running mesh-daemon of one node.
pub struct Daemon {
    child: Option<Child>,
    pub node: Node,
    pub log: PathBuf,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log once `what` occurs in it `count` times, waiting up to 5 s
    /// (the daemon writes its log in batches, a little after the event).
    pub fn log_with(&self, what: &str, count: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.log_text();
            if log.matches(what).count() >= count || Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET on the admin endpoint: (status, body).
    pub fn admin_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        sys::http_get(&self.node.netns, SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT)), path)
    }

    /// `/stats` as JSON.
    pub fn stats(&self) -> anyhow::Result<serde_json::Value> {
        let (status, body) = self.admin_get("/stats")?;
        if status != 200 {
            bail!("/stats answered {status}: {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// The sum of the `/metrics` samples of `name` whose labels contain
    /// every one of `labels` (e.g. `class="OK"`); 0 when there is none.
    pub fn metric(&self, name: &str, labels: &[&str]) -> u64 {
        let (_, text) = self.admin_get("/metrics").unwrap_or_default();
        crate::sys::metric_sum(&text, name, labels)
    }

    /// One counter from `/stats`, e.g. `("proxy", "forwarded")`.
    pub fn counter(&self, group: &str, name: &str) -> anyhow::Result<u64> {
        let s = self.stats()?;
        s[group][name].as_u64().with_context(|| format!("no counter {group}.{name} in {s}"))
    }

    /// Waits up to `wait` for counter `group`.`name` to reach `want`, and
    /// returns it (it may have passed `want`); panics with `why`, the stats
    /// and the log if it does not.
    pub fn wait_counter(&self, group: &str, name: &str, want: u64, wait: std::time::Duration, why: &str) -> u64 {
        let mut seen = 0;
        if !crate::sys::wait_until(wait, || {
            seen = self.counter(group, name).unwrap_or(0);
            seen >= want
        }) {
            panic!(
                "{why}: {group}.{name} is {seen}, not {want}: {}\n{}",
                self.stats().unwrap_or_default(),
                self.log_text()
            );
        }
        seen
    }

    /// SIGKILL: the daemon gets no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits up to 15 s for the exit.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        self.stop_with(libc::SIGTERM)
    }

    /// Sends `sig`, then waits up to 15 s for the exit.
    pub fn stop_with(&mut self, sig: i32) -> anyhow::Result<ExitStatus> {
        self.signal(sig)?;
        self.wait_exit(Duration::from_secs(15))
    }

    /// Sends `sig` and returns at once.
    pub fn signal(&self, sig: i32) -> anyhow::Result<()> {
        let Some(c) = self.child.as_ref() else { bail!("daemon already stopped") };
        sys::signal(c.id(), sig);
        Ok(())
    }

    /// Waits up to `timeout` for the daemon to exit (then kills it and fails).
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let Some(mut c) = self.child.take() else { bail!("daemon already stopped") };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = c.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!("mesh-daemon did not exit within {timeout:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}
