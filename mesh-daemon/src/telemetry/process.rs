//! The process's own series, by the names Prometheus' client libraries
//! give them (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! ...), so that the usual dashboards and alerts read the daemon as they
//! read any other process. Read from `/proc/self` at each scrape.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// A registry (not prefixed) holding the process collector.
pub(super) fn registry() -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(ProcessCollector));
    r
}

/// What `/proc/self/stat` and `/proc/stat` say of this process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Stat {
    pub cpu_seconds: f64,
    pub start_time_seconds: f64,
    pub virtual_bytes: u64,
    pub resident_bytes: u64,
}

/// Parses `/proc/self/stat` (`stat`), with the system's boot time
/// (`btime` of `/proc/stat`), clock ticks per second and page size.
pub(super) fn parse_stat(stat: &str, boot_time: u64, ticks: u64, page: u64) -> Option<Stat> {
    // The command name, in parentheses, may hold spaces: fields count
    // from after its closing parenthesis (field 3, the state).
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    let ticks = ticks.max(1) as f64;
    Some(Stat {
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
        start_time_seconds: boot_time as f64 + field(22)? as f64 / ticks,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)? * page,
    })
}

fn boot_time() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    s.lines().find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())
}

fn read_stat() -> Option<Stat> {
    use nix::unistd::{sysconf, SysconfVar};
    let ticks = sysconf(SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as u64;
    let page = sysconf(SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096) as u64;
    parse_stat(&std::fs::read_to_string("/proc/self/stat").ok()?, boot_time()?, ticks, page)
}

#[derive(Debug)]
struct ProcessCollector;

/// One unlabelled gauge.
fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> Result<(), std::fmt::Error> {
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(s) = read_stat() {
            let family = e.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time the process spent",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(s.cpu_seconds).encode(family)?;
            gauge(&mut e, "process_resident_memory_bytes", "Resident memory of the process", s.resident_bytes as i64)?;
            gauge(&mut e, "process_virtual_memory_bytes", "Virtual memory of the process", s.virtual_bytes as i64)?;
            let family = e.encode_descriptor(
                "process_start_time_seconds",
                "When the process started (Unix time)",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(s.start_time_seconds).encode(family)?;
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // The directory handle itself is one of the entries.
            let open = dir.count().saturating_sub(1);
            gauge(&mut e, "process_open_fds", "File descriptors open", open as i64)?;
        }
        if let Ok((soft, _)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
            let max = soft.min(i64::MAX as u64) as i64;
            gauge(&mut e, "process_max_fds", "File descriptors the process may open (RLIMIT_NOFILE)", max)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_count_from_after_the_command_name() {
        // A command name with spaces and a parenthesis, as the kernel
        // writes it.
        let stat = "4242 (mesh (d) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 9 0 12000 \
                    104857600 2560 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
        let s = parse_stat(stat, 1_700_000_000, 100, 4096).unwrap();
        assert_eq!(s.cpu_seconds, 3.0);
        assert_eq!(s.start_time_seconds, 1_700_000_120.0);
        assert_eq!(s.virtual_bytes, 104_857_600);
        assert_eq!(s.resident_bytes, 2560 * 4096);
        assert_eq!(parse_stat("4242 (short", 0, 100, 4096), None);
    }

    #[test]
    fn the_collector_reads_this_process() {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry()).unwrap();
        for name in
            ["process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds", "process_max_fds"]
        {
            assert!(text.lines().any(|l| l.starts_with(name) && !l.starts_with('#')), "{name} in {text}");
        }
        let rss = text.lines().find_map(|l| l.strip_prefix("process_resident_memory_bytes ")).unwrap();
        assert!(rss.parse::<f64>().unwrap() > 1e6, "{rss}");
    }
}
