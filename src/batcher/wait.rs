//! Whether a partial batch starts now or waits for company (`BATCH_POLICY`): pure logic over the
//! arrival times and batch costs the batcher feeds it (the clock is passed in, so it is unit-tested).
//!
//! `fixed`: the oldest job of a partial bucket waits `batch_timeout`, always (the seeds' behaviour).
//! `adaptive` (the default) waits only when it is expected to pay. With `k` jobs in the bucket, the
//! bucket's recent arrival rate `λ` (jobs/s of that key: an average of the gaps between arrivals, and
//! never more than one over the time since the last one) and `r` the wait left of `batch_timeout`:
//!
//! - another compatible job must be likely within the wait: `h (1 - exp(-λ r)) >= 1/2`, where `h` is
//!   the share of this key's recent waits that brought company (a moving average, 1 before any wait,
//!   drifting back to 1 so a change of load is noticed, more slowly after each fruitless wait in a
//!   row). Arrivals that are evenly spaced, or that follow the previous response (clients sending one
//!   request after another), look likely to a rate alone but never come within the wait: after one
//!   to three fruitless waits the bucket starts at once, and a probe wait comes ever more rarely;
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
/// Half-life of the memory of fruitless waits: the odds drift back to 1 so a changed load is noticed.
/// Each fruitless wait in a row doubles it (up to 2^`MAX_BACKOFF` times), so a load whose waits never
/// pay is probed less and less often; a wait that brings company resets it.
const RECOVER: Duration = Duration::from_secs(10);
const MAX_BACKOFF: u32 = 5;

/// How often waits brought company: a moving average of outcomes (1: a job joined the waiting
/// bucket, 0: the wait ended alone) that drifts back to 1 (see `RECOVER`).
#[derive(Clone, Copy, Debug)]
struct Odds {
    hit: f64,
    /// When the last outcome was recorded (None: no wait yet).
    at: Option<Instant>,
    /// Fruitless waits in a row.
    misses: u32,
}

impl Default for Odds {
    fn default() -> Self {
        Odds { hit: 1.0, at: None, misses: 0 }
    }
}

impl Odds {
    fn at(&self, now: Instant) -> f64 {
        let Some(at) = self.at else { return self.hit };
        let half_life = RECOVER.as_secs_f64() * f64::from(1u32 << self.misses.min(MAX_BACKOFF));
        let halves = now.saturating_duration_since(at).as_secs_f64() / half_life;
        1.0 - (1.0 - self.hit) * 0.5f64.powf(halves)
    }

    fn record(&mut self, company: bool, now: Instant) {
        self.hit = self.at(now) * (1.0 - ALPHA) + if company { ALPHA } else { 0.0 };
        self.at = Some(now);
        self.misses = if company { 0 } else { self.misses.saturating_add(1) };
    }
}

/// Arrivals of one key (or of all of them): the last one and the average gap, and how its waits went.
#[derive(Clone, Copy, Debug, Default)]
struct Arrivals {
    last: Option<Instant>,
    /// Seconds between arrivals, moving average (None until two arrived).
    gap: Option<f64>,
    /// A partial bucket of this key is waiting for company.
    waiting: bool,
    odds: Odds,
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
    /// The share of recent waits (every key) that brought company; 1 before any wait.
    pub wait_success: f64,
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
    /// How the waits of every key went (what /metrics shows; the decision uses each key's own).
    waits: Odds,
    /// Index n - 1: batches of n jobs.
    costs: Vec<SizeCost>,
}

impl<K: std::hash::Hash + Eq + Clone> WaitPolicy<K> {
    pub fn new(mode: WaitMode, timeout: Duration, batch_size: usize) -> Self {
        let batch_size = batch_size.max(1);
        let costs = (1..=batch_size).map(|n| SizeCost { batch_size: n, ..SizeCost::default() }).collect();
        WaitPolicy { mode, timeout, batch_size, keys: HashMap::new(), all: Arrivals::default(), waits: Odds::default(), costs }
    }

    /// `jobs` jobs of `key` arrived at `now` (a group counts as one arrival).
    pub fn arrived(&mut self, key: &K, jobs: usize, now: Instant) {
        if jobs == 0 {
            return;
        }
        self.all.arrived(now);
        let a = self.keys.entry(key.clone()).or_default();
        a.arrived(now);
        if std::mem::take(&mut a.waiting) {
            a.odds.record(true, now);
            self.waits.record(true, now);
        }
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
        Learned {
            arrival_rate: self.all.rate(now),
            wait_success: self.waits.at(now),
            costs: self.costs.iter().filter(|c| c.batches > 0).copied().collect(),
        }
    }

    fn cost(&self, n: usize) -> Option<f64> {
        self.costs.get(n.checked_sub(1)?).filter(|c| c.batches > 0 && c.seconds_per_work > 0.0).map(|c| c.seconds_per_work)
    }

    /// For a bucket of `key` with `jobs` jobs whose oldest arrived at `head`: `None` to start now,
    /// `Some(t)` to wait and decide again at `t` (or at the next arrival). `unit_work` is one job's
    /// work in the units of [`WaitPolicy::ran`]. A full bucket always starts. A wait that ends
    /// without an arrival of its key counts against the key's odds of company.
    pub fn decide(&mut self, key: &K, jobs: usize, head: Instant, now: Instant, unit_work: f64) -> Option<Instant> {
        let wake = self.wake(key, jobs, head, now, unit_work);
        if self.mode == WaitMode::Adaptive {
            if let Some(a) = self.keys.get_mut(key) {
                let was_waiting = std::mem::replace(&mut a.waiting, wake.is_some());
                if was_waiting && wake.is_none() {
                    a.odds.record(false, now);
                    self.waits.record(false, now);
                }
            }
        }
        wake
    }

    fn wake(&self, key: &K, jobs: usize, head: Instant, now: Instant, unit_work: f64) -> Option<Instant> {
        let deadline = head + self.timeout;
        if jobs >= self.batch_size || now >= deadline {
            return None;
        }
        if self.mode == WaitMode::Fixed {
            return Some(deadline);
        }
        let arrivals = self.keys.get(key)?;
        let (last, gap) = (arrivals.last?, arrivals.gap?);
        let odds = arrivals.odds.at(now);
        if odds <= LIKELY {
            return None;
        }
        let since = now.saturating_duration_since(last).as_secs_f64();
        let left = deadline.saturating_duration_since(now).as_secs_f64();
        // Company within the wait left `t` is likely (`odds (1 - exp(-t / g)) >= 1/2`) while `t >= c g`,
        // with `g` the expected gap, which grows with the time since the last arrival (`max(gap, since)`):
        // that holds for `likely_for` more seconds if nobody comes.
        let c = -(1.0 - LIKELY / odds).ln();
        let likely_for = (left - c * gap).min((left - c * since) / (1.0 + c));
        if likely_for <= 0.0 {
            return None;
        }
        let mut wake = now + Duration::from_secs_f64(likely_for);
        if let (Some(now_cost), Some(next_cost)) = (self.cost(jobs), self.cost(jobs + 1)) {
            let saving = (jobs + 1) as f64 * (now_cost - next_cost) * unit_work.max(0.0);
            if saving <= gap.max(since) {
                return None;
            }
            // Past `saving` after the last arrival, the expected gap is longer than what the batch saves.
            wake = wake.min(last + Duration::from_secs_f64(saving.min(1e6)));
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
        let mut fixed = policy(WaitMode::Fixed);
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

    /// Asks as the scheduler does (at the arrival, then at each wake-up) until the bucket of one job
    /// that arrived at `at` starts; returns how long it waited.
    fn lone_wait(p: &mut WaitPolicy<u8>, at: Instant) -> Duration {
        let mut now = at;
        while let Some(wake) = p.decide(&1, 1, at, now, 1.0) {
            assert!(wake > now && wake <= at + p.timeout, "{:?}", wake - at);
            now = wake;
        }
        now - at
    }

    #[test]
    fn evenly_spaced_arrivals_stop_waiting_after_fruitless_waits() {
        // Arrivals 127 ms apart and a 100 ms timeout: the rate alone makes company likely
        // (1 - exp(-100/127) = 0.55), but none ever comes within the wait.
        let t0 = Instant::now();
        let mut p = WaitPolicy::new(WaitMode::Adaptive, 100 * MS, 4);
        let mut waited = Vec::new();
        for i in 0..60u32 {
            let at = t0 + 127 * MS * i;
            p.arrived(&1, 1, at);
            waited.push(lone_wait(&mut p, at));
        }
        let waits: Vec<usize> = (0..waited.len()).filter(|&i| waited[i] > Duration::ZERO).collect();
        assert!(!waits.is_empty() && waits.len() <= 2 && waits.iter().all(|&i| i < 4), "{waits:?} {waited:?}");
        let end = t0 + 127 * MS * 60;
        assert!(p.learned(end).wait_success < 0.8, "{:?}", p.learned(end));

        // One client sending a request as soon as the last one is answered (70 ms of compute) with a
        // long timeout: a probe wait comes ever more rarely.
        let mut q = WaitPolicy::new(WaitMode::Adaptive, 1000 * MS, 4);
        let (mut at, mut waits, mut idle) = (t0, Vec::new(), Duration::ZERO);
        for _ in 0..2000 {
            q.arrived(&1, 1, at);
            let waited = lone_wait(&mut q, at);
            if waited > Duration::ZERO {
                waits.push(at - t0);
                idle += waited;
            }
            at += waited + 70 * MS;
        }
        let elapsed = at - t0;
        assert!(waits.len() <= 8, "{} fruitless waits in {elapsed:?}: {waits:?}", waits.len());
        assert!(idle.as_secs_f64() < 0.03 * elapsed.as_secs_f64(), "waited {idle:?} of {elapsed:?}: {waits:?}");
        let spacing: Vec<Duration> = waits.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(spacing.windows(2).skip(1).all(|s| s[1] >= s[0]), "probes must come ever more rarely: {waits:?}");

        // After a quiet minute the odds are back, and a burst waits for company again.
        let t1 = end + Duration::from_secs(60);
        assert!(p.learned(t1).wait_success > 0.9, "{:?}", p.learned(t1));
        for i in 0..20 {
            p.arrived(&1, 1, t1 + 5 * MS * i);
        }
        let now = t1 + 95 * MS;
        assert!(p.decide(&1, 1, now, now, 1.0).is_some());
    }

    #[test]
    fn waits_that_bring_company_keep_waiting() {
        // A job every 10 ms, batches of 4: every wait brings company, every batch starts full.
        let t0 = Instant::now();
        let mut p = policy(WaitMode::Adaptive);
        let (mut jobs, mut head, mut sizes) = (0, t0, Vec::new());
        for i in 0..40u32 {
            let now = t0 + 10 * MS * i;
            p.arrived(&1, 1, now);
            if jobs == 0 {
                head = now;
            }
            jobs += 1;
            if i > 0 && p.decide(&1, jobs, head, now, 1.0).is_none() {
                sizes.push(jobs);
                jobs = 0;
            }
        }
        assert!(sizes[1..].iter().all(|&n| n == 4), "{sizes:?}");
        assert!(p.learned(t0 + 400 * MS).wait_success > 0.99);
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
