//! What the node uses, from /proc: CPU (`/proc/stat`), memory (`/proc/meminfo`), network
//! (`/proc/net/dev`) and disk (`/proc/diskstats`) counters, as rates between two readings. The
//! parsers take the files' text, so they are tested on fixed samples.

use std::time::Instant;

/// Counters as read once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// CPU time in jiffies: busy, and all.
    pub cpu_busy: u64,
    pub cpu_total: u64,
    pub memory_total: u64,
    pub memory_available: u64,
    /// Bytes received plus sent, every interface but loopback.
    pub net_bytes: u64,
    /// Bytes read plus written, whole disks and partitions alike.
    pub disk_bytes: u64,
}

/// The first line of `/proc/stat`: `cpu user nice system idle iowait irq softirq steal ...`.
pub fn parse_stat(text: &str) -> (u64, u64) {
    let line = text.lines().find(|l| l.starts_with("cpu ")).unwrap_or("");
    let fields: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    // Guest time is counted in user time already: only the first eight fields.
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// `MemTotal` and `MemAvailable` from `/proc/meminfo`, in bytes.
pub fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        let line = text.lines().find(|l| l.starts_with(name));
        let kib = line.and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<u64>().ok());
        kib.unwrap_or(0) * 1024
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// Received plus sent bytes of every interface but `lo`, from `/proc/net/dev`.
pub fn parse_net_dev(text: &str) -> u64 {
    let mut bytes = 0u64;
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else { continue };
        if name.trim() == "lo" {
            continue;
        }
        let f: Vec<u64> = rest.split_whitespace().filter_map(|v| v.parse().ok()).collect();
        bytes += f.first().copied().unwrap_or(0) + f.get(8).copied().unwrap_or(0);
    }
    bytes
}

/// Read plus written bytes of the block devices in `/proc/diskstats` that are whole disks
/// (a partition's sectors are counted in its disk's already): sectors are 512 bytes there.
pub fn parse_diskstats(text: &str) -> u64 {
    let mut sectors = 0u64;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(name), Some(read), Some(written)) = (f.get(2), f.get(5), f.get(9)) else { continue };
        if is_partition(name) || name.starts_with("loop") || name.starts_with("ram") {
            continue;
        }
        sectors += read.parse::<u64>().unwrap_or(0) + written.parse::<u64>().unwrap_or(0);
    }
    sectors * 512
}

/// `sda1`, `nvme0n1p2`, `vdb3`: a partition; `sda`, `nvme0n1`, `vdb`, `dm-0`: a disk.
fn is_partition(name: &str) -> bool {
    if let Some(at) = name.rfind('p').filter(|_| name.starts_with("nvme") || name.starts_with("mmcblk")) {
        return name[at + 1..].chars().all(|c| c.is_ascii_digit()) && at + 1 < name.len();
    }
    (name.starts_with("sd") || name.starts_with("vd") || name.starts_with("xvd") || name.starts_with("hd"))
        && name.ends_with(|c: char| c.is_ascii_digit())
}

/// CPU time a process used, in jiffies (utime plus stime, the 14th and 15th fields of
/// `/proc/PID/stat`, counted after its name, which may hold spaces and parentheses).
pub fn parse_pid_stat(text: &str) -> u64 {
    let Some((_, rest)) = text.rsplit_once(')') else { return 0 };
    let f: Vec<u64> = rest.split_whitespace().skip(11).take(2).filter_map(|v| v.parse().ok()).collect();
    f.iter().sum()
}

/// CPU time process `pid` used so far, jiffies (0 once it is gone).
pub fn process_cpu(pid: u32) -> u64 {
    parse_pid_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default())
}

/// The share of the host's CPU used by everyone but some processes: host busy time between two
/// readings, less what those processes used meanwhile (`ours`), over all time passed.
pub fn others_percent(a: &Counters, b: &Counters, ours: u64) -> u8 {
    let total = b.cpu_total.saturating_sub(a.cpu_total);
    let busy = b.cpu_busy.saturating_sub(a.cpu_busy).saturating_sub(ours);
    (busy * 100).checked_div(total).unwrap_or(0).min(100) as u8
}

/// The host's total memory, bytes (0 where /proc/meminfo cannot be read).
pub fn memory_total() -> u64 {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default()).0
}

/// One reading of this host's counters; an unreadable file counts as zero (a container may
/// hide some).
pub fn read() -> Counters {
    let file = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let (cpu_busy, cpu_total) = parse_stat(&file("/proc/stat"));
    let (memory_total, memory_available) = parse_meminfo(&file("/proc/meminfo"));
    Counters {
        cpu_busy,
        cpu_total,
        memory_total,
        memory_available,
        net_bytes: parse_net_dev(&file("/proc/net/dev")),
        disk_bytes: parse_diskstats(&file("/proc/diskstats")),
    }
}

/// Rates between the previous reading and the next.
pub struct Meter {
    last: Counters,
    at: Instant,
}

/// Use over the last interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpu_percent: u8,
    pub memory_used_bytes: u64,
    pub network_bps: u64,
    pub disk_bps: u64,
}

impl Meter {
    pub fn start() -> Self {
        Self { last: read(), at: Instant::now() }
    }

    pub fn sample(&mut self) -> Usage {
        let (now, at) = (read(), Instant::now());
        let usage = usage(&self.last, &now, at.duration_since(self.at).as_secs_f64());
        (self.last, self.at) = (now, at);
        usage
    }
}

/// The use between readings `a` and `b`, `seconds` apart.
pub fn usage(a: &Counters, b: &Counters, seconds: f64) -> Usage {
    let per_second = |x: u64, y: u64| (y.saturating_sub(x) as f64 / seconds.max(1e-3)) as u64;
    let total = b.cpu_total.saturating_sub(a.cpu_total);
    let busy = b.cpu_busy.saturating_sub(a.cpu_busy);
    Usage {
        cpu_percent: (busy * 100).checked_div(total).unwrap_or(0).min(100) as u8,
        memory_used_bytes: b.memory_total.saturating_sub(b.memory_available),
        network_bps: per_second(a.net_bytes, b.net_bytes),
        disk_bps: per_second(a.disk_bytes, b.disk_bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_samples_parse() {
        let stat = "cpu  100 0 50 800 50 0 0 0 30 0\ncpu0 50 0 25 400 25 0 0 0 0 0\n";
        assert_eq!(parse_stat(stat), (150, 1000), "idle and iowait are not busy; guest is in user");
        let meminfo = "MemTotal:       16000 kB\nMemFree:  1000 kB\nMemAvailable:   4000 kB\n";
        assert_eq!(parse_meminfo(meminfo), (16000 * 1024, 4000 * 1024));
        let dev = "Inter-|   Receive\n face |bytes packets\n    lo: 999 1 0 0 0 0 0 0 999 1 0 0 0 0 0 0\n  eth0: 100 1 0 0 0 0 0 0 50 1 0 0 0 0 0 0\n";
        assert_eq!(parse_net_dev(dev), 150, "loopback is left out");
        let disks = "   8       0 sda 10 0 100 0 5 0 40 0 0 0 0\n   8       1 sda1 10 0 100 0 5 0 40 0 0 0 0\n 259 0 nvme0n1 1 0 10 0 1 0 6 0 0 0 0\n 259 1 nvme0n1p1 1 0 10 0 1 0 6 0 0 0 0\n   7 0 loop0 1 0 1000 0 0 0 0 0 0 0 0\n";
        assert_eq!(parse_diskstats(disks), (140 + 16) * 512, "partitions and loop devices are left out");
        assert_eq!(parse_stat(""), (0, 0));
        let pid = "4242 (cbcr (x) y) S 1 4242 4242 0 -1 4194560 500 0 0 0 700 45 3 1 20 0 9 0 100 0 0";
        assert_eq!(parse_pid_stat(pid), 745, "utime plus stime, after a name with spaces and parentheses");
        assert_eq!(parse_pid_stat("garbage"), 0);
    }

    #[test]
    fn others_cpu_leaves_our_processes_out() {
        let a = Counters { cpu_busy: 100, cpu_total: 1000, ..Default::default() };
        let b = Counters { cpu_busy: 700, cpu_total: 2000, ..Default::default() };
        assert_eq!(others_percent(&a, &b, 0), 60);
        assert_eq!(others_percent(&a, &b, 500), 10);
        assert_eq!(others_percent(&a, &b, 5000), 0, "a child counted too high leaves nothing, not less");
    }

    #[test]
    fn usage_is_the_rate_between_readings() {
        let a = Counters { cpu_busy: 100, cpu_total: 1000, net_bytes: 0, disk_bytes: 1000, ..Default::default() };
        let b = Counters {
            cpu_busy: 400,
            cpu_total: 2000,
            memory_total: 10,
            memory_available: 4,
            net_bytes: 2000,
            disk_bytes: 5000,
        };
        let u = usage(&a, &b, 2.0);
        assert_eq!(u, Usage { cpu_percent: 30, memory_used_bytes: 6, network_bps: 1000, disk_bps: 2000 });
        assert_eq!(usage(&b, &b, 0.0).cpu_percent, 0, "no time passed");
    }
}
