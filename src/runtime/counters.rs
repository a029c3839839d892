//! What a worker's engines did, counted: CUDA graph captures, replays, uncaptured runs and evictions,
//! denoising steps on the device and on the host, host copies of staged inputs. Shared by the engines of
//! one worker (atomics, no lock) and read by `/metrics` and `/health`; backend-neutral. Beside them,
//! the device the engines run on and the memory each engine holds there ([`DeviceMemory`], TensorRT).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

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
    /// The GPU and its engines' memory (registered by a GPU backend; empty on the CPU).
    pub device: DeviceMemory,
}

/// Reads the device's name and (free, total) memory now.
pub type DeviceProbe = Arc<dyn Fn() -> Option<(String, u64, u64)> + Send + Sync>;

/// What one engine holds on the device, in bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EngineMemory {
    pub component: String,
    /// The engine's weights: the size of its serialized plan, which they make up.
    pub weights_bytes: u64,
    /// Its activation (scratch) memory, allocated once at the largest profile.
    pub activation_bytes: u64,
    /// Its input and output buffers, allocated once at the largest profile.
    pub io_bytes: u64,
}

/// The device as `/health` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceStatus {
    pub name: String,
    pub total_bytes: u64,
    /// Used by every process on the device (total minus free).
    pub used_bytes: u64,
    pub engines: Vec<EngineMemory>,
}

/// The device of a GPU backend and the memory of the engines it loaded (empty on the CPU backend).
#[derive(Default)]
pub struct DeviceMemory {
    probe: OnceLock<DeviceProbe>,
    engines: Mutex<Vec<EngineMemory>>,
}

impl std::fmt::Debug for DeviceMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceMemory").field("probe", &self.probe.get().is_some()).field("engines", &self.engines()).finish()
    }
}

impl DeviceMemory {
    /// Sets how the device is read (once; the backend that opened it).
    pub fn set_probe(&self, probe: DeviceProbe) {
        let _ = self.probe.set(probe);
    }

    /// Records an engine's memory (a reload of the same component replaces it).
    pub fn add_engine(&self, e: EngineMemory) {
        let mut engines = self.engines.lock().unwrap_or_else(|p| p.into_inner());
        engines.retain(|x| x.component != e.component);
        engines.push(e);
    }

    pub fn engines(&self) -> Vec<EngineMemory> {
        self.engines.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// The device now; `None` without a device (the CPU backend) or when it cannot be read.
    pub fn status(&self) -> Option<DeviceStatus> {
        let (name, free, total) = (self.probe.get()?)()?;
        Some(DeviceStatus { name, total_bytes: total, used_bytes: total.saturating_sub(free), engines: self.engines() })
    }
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

    /// The device is a stand-in closure: no GPU exists here (the TensorRT worker registers the real
    /// `cuDeviceGetName` / `cuMemGetInfo` reading and each engine's plan, activation and IO sizes).
    #[test]
    fn device_memory_reports_the_probe_and_each_engine() {
        let c = RunCounters::default();
        assert_eq!(c.device.status(), None, "no device on the CPU backend");
        let e =
            |component: &str, w| EngineMemory { component: component.into(), weights_bytes: w, activation_bytes: 7, io_bytes: 3 };
        c.device.add_engine(e("transformer", 100));
        c.device.add_engine(e("vae_decoder", 10));
        c.device.add_engine(e("transformer", 120));
        assert_eq!(c.device.status(), None, "engines without a probe are not a device");
        c.device.set_probe(Arc::new(|| Some(("NVIDIA L40S".to_string(), 30, 48))));
        let s = c.device.status().unwrap();
        assert_eq!((s.name.as_str(), s.total_bytes, s.used_bytes), ("NVIDIA L40S", 48, 18));
        assert_eq!(s.engines, vec![e("vae_decoder", 10), e("transformer", 120)], "a reloaded component replaces its entry");
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["engines"][1]["weights_bytes"], 120);
        let failing = RunCounters::default();
        failing.device.set_probe(Arc::new(|| None));
        assert_eq!(failing.device.status(), None, "a device that cannot be read");
    }
}
