//! One client connection held open across the steps of a test, driven
//! batch by batch.

use std::collections::BTreeMap;

use crate::Cluster;

/// One client connection held open across the steps of a test: `mt-http
/// --follow` in a pod, sending batches of requests when told (see its
/// usage).
pub struct Follower {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Follower {
    /// Opens one connection (HTTP/2 with prior knowledge when `h2`) from
    /// `pod` to `addr`.
    pub fn open(c: &Cluster, pod: &str, addr: &str, h2: bool) -> anyhow::Result<Self> {
        let mut child = c.start_driven(pod, "mt-http", &["--follow", addr, if h2 { "--h2" } else { "--h1" }])?;
        let stdin = child.stdin.take().ok_or_else(|| anyhow::anyhow!("mt-http has no stdin"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("mt-http has no stdout"))?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut f = Self { child, stdin, lines };
        let first = f.line()?;
        anyhow::ensure!(first == "ok", "mt-http --follow {addr}: {first}");
        Ok(f)
    }

    fn line(&mut self) -> anyhow::Result<String> {
        self.lines
            .recv_timeout(std::time::Duration::from_secs(60))
            .map_err(|e| anyhow::anyhow!("mt-http --follow said nothing within 60 s: {e}"))
    }

    /// Sends `n` requests for `path` on the held connection, one after
    /// another: how many each backend answered, and every other status by
    /// its code.
    pub fn batch(&mut self, n: u32, path: &str) -> anyhow::Result<BTreeMap<String, u64>> {
        self.batch_of(n, "GET", path)
    }

    /// As [`Follower::batch`], with `method`.
    pub fn batch_of(&mut self, n: u32, method: &str, path: &str) -> anyhow::Result<BTreeMap<String, u64>> {
        self.batch_padded(n, method, path, "")
    }

    /// As [`Follower::batch_of`], each request with `pad` (`CxB`: C more
    /// headers of B bytes each); a request that ends the connection is
    /// counted as `error:...`.
    pub fn batch_padded(
        &mut self,
        n: u32,
        method: &str,
        path: &str,
        pad: &str,
    ) -> anyhow::Result<BTreeMap<String, u64>> {
        use std::io::Write;
        writeln!(self.stdin, "{n} {path} {method} {pad}")?;
        let line = self.line()?;
        anyhow::ensure!(!line.starts_with("error"), "the held connection: {line}");
        line.split_whitespace()
            .map(|w| {
                let (k, v) = w.split_once('=').ok_or_else(|| anyhow::anyhow!("mt-http --follow: {line}"))?;
                Ok((k.to_owned(), v.parse()?))
            })
            .collect()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
