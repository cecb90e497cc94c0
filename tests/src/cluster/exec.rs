//! Running programs in pods and on nodes: servers, clients, curl, meshctl.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::Cluster;
use crate::sys;

impl Cluster {
    fn pod_command(&self, pod: &str, program: &Path, args: &[&str]) -> anyhow::Result<Command> {
        let p = self.pod(pod);
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null());
        sys::enter(&mut cmd, &p.cgroup, &p.netns)?;
        Ok(cmd)
    }

    /// Starts a long-running process in `pod`; it is ended at teardown.
    pub fn spawn(&self, pod: &str, program: &Path, args: &[&str]) -> anyhow::Result<u32> {
        let log = File::options().create(true).append(true).open(self.dir.join(format!("pod-{pod}.log")))?;
        let mut cmd = self.pod_command(pod, program, args)?;
        cmd.stdout(log.try_clone()?).stderr(log);
        let child = cmd.spawn().with_context(|| format!("starting {} in pod {pod}", program.display()))?;
        let pid = child.id();
        self.procs.lock().map_err(|_| anyhow::anyhow!("process list poisoned"))?.push(child);
        self.spawned_pods.lock().map_err(|_| anyhow::anyhow!("process list poisoned"))?.push((pod.to_owned(), pid));
        Ok(pid)
    }

    /// Starts a long-running process in `node`'s network namespace (beside
    /// the daemon, like a node proxy would run); ended at teardown.
    pub fn spawn_on_node(&self, node: &str, program: &str, args: &[&str]) -> anyhow::Result<u32> {
        let n = self.node(node).clone();
        let cgroup = n.cgroup.join("extra");
        std::fs::create_dir_all(&cgroup)?;
        let log = File::options().create(true).append(true).open(self.dir.join(format!("node-{node}.log")))?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        sys::enter(&mut cmd, &cgroup, &n.netns)?;
        let child = cmd.spawn().with_context(|| format!("starting {program} on node {node}"))?;
        let pid = child.id();
        self.procs.lock().map_err(|_| anyhow::anyhow!("process list poisoned"))?.push(child);
        Ok(pid)
    }

    /// Stops a process started with [`Cluster::spawn`] with SIGTERM (a
    /// graceful stop) and waits up to 10 s for it to exit.
    pub fn terminate(&self, pid: u32) -> anyhow::Result<()> {
        let mut procs = self.procs.lock().map_err(|_| anyhow::anyhow!("process list poisoned"))?;
        let i = procs.iter().position(|c| c.id() == pid).context("no such process of this cluster")?;
        let mut c = procs.remove(i);
        sys::signal(pid, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!("process {pid} did not exit within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Starts a client in `pod` whose output the caller collects with
    /// `wait_with_output` (teardown kills it if the caller does not).
    pub fn start(&self, pod: &str, program: &str, args: &[&str]) -> anyhow::Result<Child> {
        let program = self.bins.program(program);
        let mut cmd = self.pod_command(pod, &program, args)?;
        Ok(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?)
    }

    /// Starts a client in `pod` that the caller drives through its stdin
    /// and reads on its stdout; its stderr goes to the pod's log. Ended
    /// when the caller drops it, or at teardown.
    pub fn start_driven(&self, pod: &str, program: &str, args: &[&str]) -> anyhow::Result<Child> {
        let log = File::options().create(true).append(true).open(self.dir.join(format!("pod-{pod}.log")))?;
        let program = self.bins.program(program);
        let mut cmd = self.pod_command(pod, &program, args)?;
        Ok(cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(log).spawn()?)
    }

    /// The pid of the newest process started with [`Cluster::spawn`] in `pod`.
    pub fn spawned_pid_of(&self, pod: &str) -> Option<u32> {
        let pods = self.spawned_pods.lock().ok()?;
        pods.iter().rev().find(|(p, _)| p == pod).map(|(_, pid)| *pid)
    }

    /// Ends a process started with [`Cluster::spawn`].
    pub fn kill(&self, pid: u32) {
        if let Ok(mut procs) = self.procs.lock() {
            if let Some(i) = procs.iter().position(|c| c.id() == pid) {
                let mut c = procs.remove(i);
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Starts `mt-pod serve` in `pod` (HTTP on `http`, echo on `echo`) and
    /// waits until it accepts.
    pub fn serve(&self, pod: &str, http: u16, echo: Option<u16>) -> anyhow::Result<u32> {
        self.serve_with(pod, http, echo, &[])
    }

    /// [`Cluster::serve`] with more `mt-pod serve` flags (e.g. `--delay-ms`).
    pub fn serve_with(&self, pod: &str, http: u16, echo: Option<u16>, extra: &[&str]) -> anyhow::Result<u32> {
        let (h, e) = (http.to_string(), echo.map(|e| e.to_string()));
        let mut args = vec!["serve", "--name", pod, "--http", &h];
        if let Some(e) = &e {
            args.extend(["--echo", e.as_str()]);
        }
        args.extend(extra);
        let pid = self.spawn(pod, &self.bins.mt_pod.clone(), &args)?;
        let p = self.pod(pod);
        let ports = [Some(http), echo];
        for port in ports.iter().flatten() {
            if !sys::wait_until(Duration::from_secs(10), || sys::can_connect(&p.netns, p.addr(*port))) {
                bail!("server in pod {pod} does not accept on port {port}");
            }
        }
        Ok(pid)
    }

    /// Starts `mt-http` (HTTP/1.1 and h2c, answering `backend=POD`) in
    /// `pod` on `port` and waits until it accepts.
    pub fn serve_http(&self, pod: &str, port: u16, extra: &[&str]) -> anyhow::Result<u32> {
        let p = port.to_string();
        let mut args = vec!["--name", pod, "--port", &p];
        args.extend(extra);
        let pid = self.spawn(pod, &self.bins.mt_http.clone(), &args)?;
        let addr = self.pod(pod).addr(port);
        let netns = self.pod(pod).netns.clone();
        if !sys::wait_until(Duration::from_secs(10), || sys::can_connect(&netns, addr)) {
            bail!("mt-http in pod {pod} does not accept on port {port}");
        }
        Ok(pid)
    }

    /// Runs a command in `pod` to completion (killed after `timeout`).
    pub fn exec(&self, pod: &str, program: &str, args: &[&str], timeout: Duration) -> anyhow::Result<Output> {
        let program = self.bins.program(program);
        let mut cmd = self.pod_command(pod, &program, args)?;
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {program:?} in pod {pod}"))?;
        let pid = child.id();
        let deadline = Instant::now() + timeout;
        let waited = std::thread::spawn(move || child.wait_with_output());
        while !waited.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !waited.is_finished() {
            sys::signal(pid, libc::SIGKILL);
        }
        let out = waited.join().map_err(|_| anyhow::anyhow!("wait thread panicked"))??;
        Ok(out)
    }

    /// `meshctl --socket <node's API socket> ARGS`, as root, from the host.
    pub fn meshctl(&self, node: &str, args: &[&str]) -> anyhow::Result<Output> {
        self.meshctl_as(node, None, args)
    }

    /// `meshctl` as another user (uid, gid).
    pub fn meshctl_as(&self, node: &str, user: Option<(u32, u32)>, args: &[&str]) -> anyhow::Result<Output> {
        // Another user may not reach the build folder (a clone under a 0700
        // folder): run a copy from this run's folder, which is 0755.
        let program = match user {
            Some(_) => {
                let copy = self.dir.join("meshctl");
                if !copy.exists() {
                    // Written under another name and renamed, so no open
                    // writable fd (inherited by a concurrent fork) makes
                    // the exec fail with ETXTBSY.
                    let tmp = self.dir.join("meshctl.tmp");
                    std::fs::copy(&self.bins.meshctl, &tmp)?;
                    std::fs::rename(&tmp, &copy)?;
                }
                copy
            }
            None => self.bins.meshctl.clone(),
        };
        let mut cmd = Command::new(program);
        cmd.arg("--socket").arg(self.api_socket(node)).args(args).stdin(Stdio::null());
        if let Some((uid, gid)) = user {
            std::os::unix::process::CommandExt::uid(&mut cmd, uid);
            std::os::unix::process::CommandExt::gid(&mut cmd, gid);
            // As root, std also drops the supplementary groups.
        }
        // A fork in another thread may still hold the copy open for a moment.
        for _ in 0..20 {
            match cmd.output() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => std::thread::sleep(Duration::from_millis(50)),
                other => return Ok(other?),
            }
        }
        Ok(cmd.output()?)
    }

    /// `curl` in `pod`; returns (exit code, stdout).
    pub fn curl(&self, pod: &str, url: &str) -> anyhow::Result<(i32, String)> {
        let out = self.exec(pod, "curl", &["-sS", "--max-time", "5", url], Duration::from_secs(10))?;
        Ok((out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned()))
    }
}
