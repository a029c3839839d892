//! What a worker's engines did, counted: CUDA graph captures, replays, uncaptured runs and evictions,
//! denoising steps on the device and on the host, host copies of staged inputs. Shared by the engines of
//! one worker (atomics, no lock) and read by `/metrics` and `/health`; backend-neutral.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// One counter of [`RunCounters`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A CUDA graph was captured (after its warm-up run).
    GraphCaptures,
    /// A run replayed a captured graph.
    GraphReplays,
    /// A run executed without a graph: the graph cache is off, or its shape cannot be captured.
    UncapturedRuns,
    /// A captured graph was dropped from the full cache (least recently used).
    GraphEvictions,
    /// A capture (or the context it needs) failed; that shape runs uncaptured from then on.
    CaptureFailures,
    /// Denoising steps run on the device (inside one device loop per batch).
    DeviceLoopSteps,
    /// Denoising steps stepped on the host (one transformer call and a host update each).
    HostLoopSteps,
    /// Host-side copies of a staged input between preprocessing and the device (0 on the staged path).
    StagedHostCopies,
}

/// Counters of one worker's engines (see [`Counter`]).
#[derive(Debug, Default)]
pub struct RunCounters {
    values: [AtomicU64; 8],
}

impl RunCounters {
    fn slot(c: Counter) -> usize {
        c as usize
    }

    pub fn add(&self, c: Counter, n: u64) {
        self.values[Self::slot(c)].fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self, c: Counter) -> u64 {
        self.values[Self::slot(c)].load(Ordering::Relaxed)
    }

    /// Back to zero (after work that is not served work, like the memory probe at load).
    pub fn reset(&self) {
        for v in &self.values {
            v.store(0, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            graph_captures: self.get(Counter::GraphCaptures),
            graph_replays: self.get(Counter::GraphReplays),
            uncaptured_runs: self.get(Counter::UncapturedRuns),
            graph_evictions: self.get(Counter::GraphEvictions),
            capture_failures: self.get(Counter::CaptureFailures),
            device_loop_steps: self.get(Counter::DeviceLoopSteps),
            host_loop_steps: self.get(Counter::HostLoopSteps),
            staged_host_copies: self.get(Counter::StagedHostCopies),
        }
    }
}

/// The counters at one moment (the `/health` object and the `/metrics` counters
/// `qwen_edit_<field>_total`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CounterSnapshot {
    pub graph_captures: u64,
    pub graph_replays: u64,
    pub uncaptured_runs: u64,
    pub graph_evictions: u64,
    pub capture_failures: u64,
    pub device_loop_steps: u64,
    pub host_loop_steps: u64,
    pub staged_host_copies: u64,
}

impl CounterSnapshot {
    /// `(name, value)` of every counter, in declaration order.
    pub fn fields(&self) -> [(&'static str, u64); 8] {
        [
            ("graph_captures", self.graph_captures),
            ("graph_replays", self.graph_replays),
            ("uncaptured_runs", self.uncaptured_runs),
            ("graph_evictions", self.graph_evictions),
            ("capture_failures", self.capture_failures),
            ("device_loop_steps", self.device_loop_steps),
            ("host_loop_steps", self.host_loop_steps),
            ("staged_host_copies", self.staged_host_copies),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_count_separately_and_snapshot_by_name() {
        let c = RunCounters::default();
        c.add(Counter::GraphReplays, 3);
        c.add(Counter::UncapturedRuns, 1);
        c.add(Counter::GraphReplays, 2);
        c.add(Counter::StagedHostCopies, 7);
        let s = c.snapshot();
        assert_eq!((s.graph_replays, s.uncaptured_runs, s.graph_captures, s.staged_host_copies), (5, 1, 0, 7));
        let f = s.fields();
        assert_eq!(f[1], ("graph_replays", 5));
        assert_eq!(f[7], ("staged_host_copies", 7));
        let json = serde_json::to_value(s).unwrap();
        for (name, v) in f {
            assert_eq!(json[name], v, "{name}");
        }
    }
}
