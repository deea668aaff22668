//! How fast a backup may read from its source: an AIMD loop the control plane runs per source
//! host and per node (on the nodes' reports), and each agent over its own shards' reads. While the reported source-read latency p99 and CPU use stay under
//! their targets the cap rises by a fixed step; when either goes over, it is cut by a factor.
//! Additive increase with multiplicative decrease converges to a sawtooth just under the rate
//! at which the host reaches its targets: with the defaults the cap stays between
//! [`Aimd::DECREASE`] of that rate and that rate plus one step, once it has found it (the
//! bound the stability test checks against a host whose latency rises with load).

/// The loop's settings, in one place.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AimdParams {
    /// Source-read latency p99 the host should stay under, microseconds.
    pub target_p99_us: u64,
    /// CPU use (percent of the host) it should stay under.
    pub target_cpu_percent: u8,
    /// Added to the cap after a report under both targets.
    pub increase_bps: u64,
    /// The cap is multiplied by this after a report over either target.
    pub decrease: f64,
    pub min_bps: u64,
    pub max_bps: u64,
}

impl Default for AimdParams {
    fn default() -> Self {
        Self {
            target_p99_us: 10_000,
            target_cpu_percent: 80,
            increase_bps: 16 << 20,
            decrease: Aimd::DECREASE,
            min_bps: 8 << 20,
            max_bps: 4 << 30,
        }
    }
}

/// One loop: the cap it has reached.
#[derive(Clone, Debug)]
pub struct Aimd {
    params: AimdParams,
    cap_bps: u64,
}

impl Aimd {
    /// The default cut: a quarter off, gentle enough that one slow report does not halve a
    /// backup, steep enough to leave an overloaded host within a few reports.
    pub const DECREASE: f64 = 0.75;

    /// A loop that starts at `start_bps` (within the bounds).
    pub fn new(params: AimdParams, start_bps: u64) -> Self {
        Self { params, cap_bps: start_bps.clamp(params.min_bps, params.max_bps) }
    }

    /// Whether a report is over either target.
    pub fn over(&self, read_p99_us: u64, cpu_percent: u8) -> bool {
        read_p99_us > self.params.target_p99_us || cpu_percent > self.params.target_cpu_percent
    }

    /// Takes one report from the host and returns the new cap.
    pub fn report(&mut self, read_p99_us: u64, cpu_percent: u8) -> u64 {
        self.report_reading(read_p99_us, cpu_percent, u64::MAX)
    }

    /// [`Aimd::report`] from a reader that also knows the rate it read at: a cut starts from
    /// that rate when it is under the cap, since cutting a cap nobody reaches slows nothing (a
    /// loop started uncapped finds an overloaded host's rate in a few reports, not dozens).
    pub fn report_reading(&mut self, read_p99_us: u64, cpu_percent: u8, read_bps: u64) -> u64 {
        let p = &self.params;
        self.cap_bps = if self.over(read_p99_us, cpu_percent) {
            (self.cap_bps.min(read_bps) as f64 * p.decrease) as u64
        } else {
            self.cap_bps.saturating_add(p.increase_bps)
        }
        .clamp(p.min_bps, p.max_bps);
        self.cap_bps
    }

    pub fn cap_bps(&self) -> u64 {
        self.cap_bps
    }
}

/// A loop and the cap last sent out: a cut is sent at once (it protects a host), a rise only
/// once it has grown by an eighth, so a cap creeping up one step per report is not a decision
/// per report.
#[derive(Clone, Debug)]
pub struct Throttle {
    aimd: Aimd,
    sent_bps: u64,
}

impl Throttle {
    pub fn new(params: AimdParams, start_bps: u64) -> Self {
        let aimd = Aimd::new(params, start_bps);
        Self { sent_bps: aimd.cap_bps(), aimd }
    }

    /// Takes one report; the new cap when it is worth a decision.
    pub fn report(&mut self, read_p99_us: u64, cpu_percent: u8) -> Option<u64> {
        let cap = self.aimd.report(read_p99_us, cpu_percent);
        let send = cap < self.sent_bps || cap >= self.sent_bps.saturating_add(self.sent_bps / 8);
        send.then(|| {
            self.sent_bps = cap;
            cap
        })
    }

    pub fn cap_bps(&self) -> u64 {
        self.aimd.cap_bps()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database host whose read latency rises with load like a queue: `base / (1 - use)`, its
    /// disk shared by the backup (at its cap) and the database's own `busy_bps`.
    struct Host {
        disk_bps: f64,
        busy_bps: f64,
        base_us: f64,
    }

    impl Host {
        fn p99_us(&self, backup_bps: u64) -> u64 {
            let used = ((backup_bps as f64 + self.busy_bps) / self.disk_bps).min(0.999);
            (self.base_us / (1.0 - used)) as u64
        }

        /// The backup rate at which latency reaches `target_us`.
        fn knee_bps(&self, target_us: u64) -> f64 {
            (1.0 - self.base_us / target_us as f64) * self.disk_bps - self.busy_bps
        }
    }

    #[test]
    fn the_cap_settles_just_under_the_hosts_knee_and_stays_within_the_stated_band() {
        let params = AimdParams::default();
        let host = Host { disk_bps: 2000.0 * (1 << 20) as f64, busy_bps: 600.0 * (1 << 20) as f64, base_us: 2_000.0 };
        let knee = host.knee_bps(params.target_p99_us);
        let mut aimd = Aimd::new(params, params.min_bps);
        let (mut over, mut caps) = (0, vec![]);
        for step in 0..2_000 {
            let p99 = host.p99_us(aimd.cap_bps());
            if step >= 500 {
                over += usize::from(p99 > params.target_p99_us);
                caps.push(aimd.cap_bps() as f64);
            }
            aimd.report(p99, 10);
        }
        let (low, high) = caps.iter().fold((f64::MAX, 0f64), |(l, h), &c| (l.min(c), h.max(c)));
        assert!(low >= Aimd::DECREASE * knee * 0.99, "fell to {low} under a knee of {knee}");
        assert!(high <= knee + params.increase_bps as f64, "rose to {high} over a knee of {knee}");
        // Each overshoot lasts one report: at most one in every few.
        assert!(over * 4 <= caps.len(), "{over} of {} reports over the target", caps.len());
    }

    #[test]
    fn a_busier_database_pulls_the_cap_down_within_a_few_reports() {
        let params = AimdParams::default();
        let mut host =
            Host { disk_bps: 2000.0 * (1 << 20) as f64, busy_bps: 200.0 * (1 << 20) as f64, base_us: 2_000.0 };
        let mut aimd = Aimd::new(params, params.min_bps);
        for _ in 0..1_000 {
            aimd.report(host.p99_us(aimd.cap_bps()), 10);
        }
        host.busy_bps = 1_400.0 * (1 << 20) as f64;
        let knee = host.knee_bps(params.target_p99_us);
        let mut reports = 0;
        while aimd.cap_bps() as f64 > knee {
            aimd.report(host.p99_us(aimd.cap_bps()), 10);
            reports += 1;
        }
        assert!(reports <= 10, "{reports} reports to come under the new knee");
    }

    #[test]
    fn cuts_are_sent_at_once_and_rises_only_once_they_add_up() {
        let params = AimdParams::default();
        let mut t = Throttle::new(params, 800 << 20);
        let cut = t.report(u64::MAX, 0).expect("a cut is sent");
        assert_eq!(cut, 600 << 20);
        // 600 MiB/s plus an eighth is 675: the fifth step of 16 MiB/s reaches it.
        let sent: Vec<_> = (0..5).map(|_| t.report(0, 0)).collect();
        assert_eq!(sent, [None, None, None, None, Some(680 << 20)]);
    }

    #[test]
    fn a_reader_cuts_from_the_rate_it_read_at_and_rises_from_its_cap() {
        let params = AimdParams::default();
        let mut aimd = Aimd::new(params, params.max_bps);
        assert_eq!(aimd.report_reading(u64::MAX, 0, 100 << 20), 75 << 20);
        assert_eq!(aimd.report_reading(0, 0, 10 << 20), (75 + 16) << 20, "a rise ignores the rate");
        assert_eq!(aimd.report_reading(u64::MAX, 0, 1 << 40), (91 << 20) * 3 / 4, "a rate over the cap: the cap");
    }

    #[test]
    fn cpu_over_its_target_cuts_too_and_the_cap_keeps_its_bounds() {
        let params = AimdParams::default();
        let mut aimd = Aimd::new(params, 1 << 40);
        assert_eq!(aimd.cap_bps(), params.max_bps);
        let before = aimd.cap_bps();
        assert!(aimd.report(0, 95) < before);
        for _ in 0..100 {
            aimd.report(u64::MAX, 100);
        }
        assert_eq!(aimd.cap_bps(), params.min_bps);
    }
}
