//! Whether a partial batch starts now or waits for company (`BATCH_POLICY`): pure logic over the
//! arrival times and batch costs the batcher feeds it (the clock is passed in, so it is unit-tested).
//!
//! `fixed`: the oldest job of a partial bucket waits `batch_timeout`, always (the seeds' behaviour).
//! `adaptive` (the default) waits only when it is expected to pay. With `k` jobs in the bucket, the
//! bucket's recent arrival rate `λ` (jobs/s of that key: an average of the gaps between arrivals, and
//! never more than one over the time since the last one) and `r` the wait left of `batch_timeout`:
//!
//! - another compatible job must be likely within the wait: `1 - exp(-λ r) >= 1/2`;
//! - and the batch of `k + 1` must save more engine time than the wait idles it: with `c(n)` the
//!   measured seconds per unit of work at batch size `n` and `w` one job's work,
//!   `(k + 1) (c(k) - c(k + 1)) w > 1/λ` (the expected gap). A size not measured yet counts as paying
//!   (so it gets measured); a measured size that does not pay starts the batch now.
//!
//! Otherwise the batch starts now. The figures are re-evaluated on every arrival and at the returned
//! wake-up time, and `batch_timeout` stays the longest wait, `batch_size` the largest batch.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// How partial batches wait (`BATCH_POLICY`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WaitMode {
    /// Wait for company only when the arrival rate and the measured batch costs say it pays.
    #[default]
    Adaptive,
    /// The oldest job of a partial bucket always waits `batch_timeout`.
    Fixed,
}

impl WaitMode {
    pub fn as_str(self) -> &'static str {
        match self {
            WaitMode::Adaptive => "adaptive",
            WaitMode::Fixed => "fixed",
        }
    }
}

impl std::str::FromStr for WaitMode {
    type Err = String;
    fn from_str(s: &str) -> Result<WaitMode, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "adaptive" => Ok(WaitMode::Adaptive),
            "fixed" => Ok(WaitMode::Fixed),
            other => Err(format!("`{other}` is not a batch policy: use adaptive or fixed")),
        }
    }
}

/// Weight of a new sample in the moving averages.
const ALPHA: f64 = 0.3;
/// The least likelihood of company that is worth a wait.
const LIKELY: f64 = 0.5;
/// Keys not seen for this long are forgotten (when many keys are tracked).
const FORGET: Duration = Duration::from_secs(60);
const MAX_KEYS: usize = 64;

/// Arrivals of one key (or of all of them): the last one and the average gap.
#[derive(Clone, Copy, Debug, Default)]
struct Arrivals {
    last: Option<Instant>,
    /// Seconds between arrivals, moving average (None until two arrived).
    gap: Option<f64>,
}

impl Arrivals {
    fn arrived(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let gap = now.saturating_duration_since(last).as_secs_f64();
            self.gap = Some(self.gap.map_or(gap, |g| g * (1.0 - ALPHA) + gap * ALPHA));
        }
        self.last = Some(now.max(self.last.unwrap_or(now)));
    }

    /// Jobs per second now: one over the average gap, or over the time since the last arrival
    /// when that is longer (a stream that stopped is no stream). 0 before two arrivals.
    fn rate(&self, now: Instant) -> f64 {
        let (Some(last), Some(gap)) = (self.last, self.gap) else { return 0.0 };
        let since = now.saturating_duration_since(last).as_secs_f64();
        1.0 / gap.max(since).max(1e-6)
    }
}

/// Moving averages of what batches of one size cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct SizeCost {
    pub batch_size: usize,
    /// Seconds per image (compute / jobs), over every shape.
    pub seconds_per_image: f64,
    /// Seconds per unit of work (compute / work): what the decision compares across sizes.
    pub seconds_per_work: f64,
    pub batches: u64,
}

/// What the adaptive policy has learned, as /metrics and /queue/status show it.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Learned {
    /// Jobs per second over every key.
    pub arrival_rate: f64,
    /// One entry per batch size that ran (a batch of n jobs), smallest first.
    pub costs: Vec<SizeCost>,
}

/// The adaptive policy's state: arrivals per key and over all, costs per batch size.
#[derive(Debug)]
pub struct WaitPolicy<K> {
    pub mode: WaitMode,
    pub timeout: Duration,
    pub batch_size: usize,
    keys: HashMap<K, Arrivals>,
    all: Arrivals,
    /// Index n - 1: batches of n jobs.
    costs: Vec<SizeCost>,
}

impl<K: std::hash::Hash + Eq + Clone> WaitPolicy<K> {
    pub fn new(mode: WaitMode, timeout: Duration, batch_size: usize) -> Self {
        let batch_size = batch_size.max(1);
        let costs = (1..=batch_size).map(|n| SizeCost { batch_size: n, ..SizeCost::default() }).collect();
        WaitPolicy { mode, timeout, batch_size, keys: HashMap::new(), all: Arrivals::default(), costs }
    }

    /// `jobs` jobs of `key` arrived at `now` (a group counts as one arrival).
    pub fn arrived(&mut self, key: &K, jobs: usize, now: Instant) {
        if jobs == 0 {
            return;
        }
        self.all.arrived(now);
        self.keys.entry(key.clone()).or_default().arrived(now);
        if self.keys.len() > MAX_KEYS {
            self.keys.retain(|_, a| a.last.is_some_and(|l| now.saturating_duration_since(l) < FORGET));
        }
    }

    /// A whole batch of `n` jobs ran in `compute` for `work` units of work.
    pub fn ran(&mut self, n: usize, compute: Duration, work: f64) {
        let Some(c) = n.checked_sub(1).and_then(|i| self.costs.get_mut(i)) else { return };
        let secs = compute.as_secs_f64();
        let avg = |old: f64, new: f64, first: bool| if first { new } else { old * (1.0 - ALPHA) + new * ALPHA };
        let first = c.batches == 0;
        c.seconds_per_image = avg(c.seconds_per_image, secs / n as f64, first);
        if work > 0.0 {
            c.seconds_per_work = avg(c.seconds_per_work, secs / work, first);
        }
        c.batches += 1;
    }

    pub fn learned(&self, now: Instant) -> Learned {
        Learned { arrival_rate: self.all.rate(now), costs: self.costs.iter().filter(|c| c.batches > 0).copied().collect() }
    }

    fn cost(&self, n: usize) -> Option<f64> {
        self.costs.get(n.checked_sub(1)?).filter(|c| c.batches > 0 && c.seconds_per_work > 0.0).map(|c| c.seconds_per_work)
    }

    /// For a bucket of `key` with `jobs` jobs whose oldest arrived at `head`: `None` to start now,
    /// `Some(t)` to wait and decide again at `t` (or at the next arrival). `unit_work` is one job's
    /// work in the units of [`WaitPolicy::ran`]. A full bucket always starts.
    pub fn decide(&self, key: &K, jobs: usize, head: Instant, now: Instant, unit_work: f64) -> Option<Instant> {
        let deadline = head + self.timeout;
        if jobs >= self.batch_size || now >= deadline {
            return None;
        }
        if self.mode == WaitMode::Fixed {
            return Some(deadline);
        }
        let rate = self.keys.get(key).map_or(0.0, |a| a.rate(now));
        if rate <= 0.0 {
            return None;
        }
        let gap = 1.0 / rate;
        let left = deadline.saturating_duration_since(now).as_secs_f64();
        if 1.0 - (-rate * left).exp() < LIKELY {
            return None;
        }
        // Company stays likely until `ln 2 / λ` before the deadline.
        let mut wake = deadline - Duration::from_secs_f64((std::f64::consts::LN_2 * gap).min(left));
        if let (Some(now_cost), Some(next_cost)) = (self.cost(jobs), self.cost(jobs + 1)) {
            let saving = (jobs + 1) as f64 * (now_cost - next_cost) * unit_work.max(0.0);
            if saving <= gap {
                return None;
            }
            // The expected gap grows with the time since the last arrival; past `saving` it no longer pays.
            if let Some(last) = self.keys.get(key).and_then(|a| a.last) {
                wake = wake.min(last + Duration::from_secs_f64(saving.min(1e6)));
            }
        }
        (wake > now).then_some(wake)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn policy(mode: WaitMode) -> WaitPolicy<u8> {
        WaitPolicy::new(mode, 40 * MS, 4)
    }

    /// Batches of 1..=4 costing `per_image[n-1]` seconds per image (work = jobs).
    fn feed_costs(p: &mut WaitPolicy<u8>, per_image: [f64; 4]) {
        for _ in 0..3 {
            for (i, c) in per_image.iter().enumerate() {
                let n = i + 1;
                p.ran(n, Duration::from_secs_f64(c * n as f64), n as f64);
            }
        }
    }

    #[test]
    fn a_lone_request_starts_now() {
        let t0 = Instant::now();
        let mut p = policy(WaitMode::Adaptive);
        p.arrived(&1, 1, t0);
        assert_eq!(p.decide(&1, 1, t0, t0, 1.0), None, "no arrival history: start at once");
        // Requests every 500 ms (a client at a time): company within 40 ms is unlikely.
        for i in 1..6 {
            p.arrived(&1, 1, t0 + 500 * MS * i);
        }
        let now = t0 + 2500 * MS;
        assert_eq!(p.decide(&1, 1, now, now, 1.0), None);
        // The same lone request under the fixed policy waits the whole timeout.
        let fixed = policy(WaitMode::Fixed);
        assert_eq!(fixed.decide(&1, 1, now, now, 1.0), Some(now + 40 * MS));
    }

    #[test]
    fn a_burst_waits_for_company() {
        let t0 = Instant::now();
        let mut p = policy(WaitMode::Adaptive);
        for i in 0..8 {
            p.arrived(&1, 1, t0 + 5 * MS * i); // 200 jobs/s
        }
        let now = t0 + 35 * MS;
        let wake = p.decide(&1, 1, now, now, 1.0).expect("a burst waits");
        assert!(wake > now && wake <= now + 40 * MS, "{:?}", wake - now);
        // Batches that pay (cost per image falls with size) keep it waiting.
        feed_costs(&mut p, [0.10, 0.07, 0.06, 0.055]);
        let wake = p.decide(&1, 2, now, now, 1.0).expect("batches that pay: wait");
        assert!(wake <= now + 40 * MS);
        // Another key's burst says nothing of this key.
        assert_eq!(p.decide(&2, 1, now, now, 1.0), None);
        // A full bucket, or one whose oldest job waited the timeout, starts.
        assert_eq!(p.decide(&1, 4, now, now, 1.0), None);
        assert_eq!(p.decide(&1, 1, now, now + 40 * MS, 1.0), None);
        // The burst stopped: once the time since the last arrival is long, company is unlikely.
        let later = t0 + 400 * MS;
        assert_eq!(p.decide(&1, 1, later, later, 1.0), None);
        assert!(p.learned(later).arrival_rate < 5.0);
    }

    #[test]
    fn batches_that_do_not_pay_start_now() {
        let t0 = Instant::now();
        let mut p = policy(WaitMode::Adaptive);
        for i in 0..8 {
            p.arrived(&1, 1, t0 + 5 * MS * i);
        }
        let now = t0 + 35 * MS;
        // Batching does not lower the cost per image (a compute-bound engine).
        feed_costs(&mut p, [0.10, 0.10, 0.102, 0.11]);
        assert_eq!(p.decide(&1, 1, now, now, 1.0), None);
        assert_eq!(p.decide(&1, 2, now, now, 1.0), None);
        // It pays, but by less than the expected 5 ms wait idles the engine: (1+1) * 2 ms = 4 ms.
        let mut q = policy(WaitMode::Adaptive);
        for i in 0..8 {
            q.arrived(&1, 1, t0 + 5 * MS * i);
        }
        feed_costs(&mut q, [0.010, 0.008, 0.008, 0.008]);
        assert_eq!(q.decide(&1, 1, now, now, 1.0), None);
        // The same saving on jobs with 10x the work pays.
        assert!(q.decide(&1, 1, now, now, 10.0).is_some());
    }

    #[test]
    fn learned_figures_are_averages_per_size() {
        let mut p = policy(WaitMode::Adaptive);
        p.ran(2, Duration::from_millis(300), 2.0);
        p.ran(2, Duration::from_millis(100), 2.0);
        p.ran(9, Duration::from_millis(100), 9.0); // beyond BATCH_SIZE: ignored
        let l = p.learned(Instant::now());
        assert_eq!(l.costs.len(), 1);
        assert_eq!(l.costs[0].batch_size, 2);
        assert!((l.costs[0].seconds_per_image - (0.15 * 0.7 + 0.05 * 0.3)).abs() < 1e-9, "{l:?}");
        assert_eq!(l.arrival_rate, 0.0);
        assert_eq!("Fixed".parse::<WaitMode>(), Ok(WaitMode::Fixed));
        assert!("soon".parse::<WaitMode>().is_err());
    }
}
