//! How an engine run executes: replay a captured CUDA graph of its shapes, or capture one (a dedicated
//! context, a warm-up enqueue that computes this run, then the capture), or run uncaptured on the base
//! context. Generic over [`GraphExec`] so the policy is unit-tested on an emulated device.

use std::collections::HashSet;
use std::sync::Arc;

use super::plan::{GraphKey, LruCache, RunPlan};
use crate::runtime::counters::{Counter, RunCounters};

/// Output shapes of one run, in the engine's output order.
pub type OutShapes = Vec<Vec<usize>>;

/// The device operations a run needs (TensorRT through the shim; an emulation in tests).
pub trait GraphExec {
    type Context;
    type Graph;
    /// A new execution context on `profile`, its IO addresses bound and input shapes set to `shapes`,
    /// with the output shapes those give.
    fn new_context(&mut self, profile: usize, shapes: &[Vec<usize>]) -> Result<(Self::Context, OutShapes), String>;
    /// Sets `shapes` on the profile's base context; the output shapes those give.
    fn set_base_shapes(&mut self, profile: usize, shapes: &[Vec<usize>]) -> Result<OutShapes, String>;
    /// Whether outputs of these shapes fit their buffers (checked before anything is enqueued).
    fn check_outputs(&self, shapes: &OutShapes) -> Result<(), String>;
    /// Enqueues the engine on `context`, or on the profile's base context when `None`.
    fn enqueue(&mut self, profile: usize, context: Option<&mut Self::Context>) -> Result<(), String>;
    /// Captures one enqueue on `context` into a graph (after a warm-up enqueue with the same shapes).
    fn capture(&mut self, context: &mut Self::Context) -> Result<Self::Graph, String>;
    fn launch(&mut self, graph: &Self::Graph) -> Result<(), String>;
}

struct Entry<C, G> {
    // Field order = drop order: the graph before the context it was captured from.
    graph: G,
    _context: C,
    out_shapes: OutShapes,
}

/// Captured graphs of one engine (an LRU cache by [`GraphKey`]) and the shapes that cannot be captured.
pub struct Graphs<C, G> {
    cache: LruCache<GraphKey, Entry<C, G>>,
    uncapturable: HashSet<GraphKey>,
    counters: Arc<RunCounters>,
    component: String,
}

impl<C, G> Graphs<C, G> {
    /// `capacity` graphs at most (0: every run is uncaptured).
    pub fn new(component: &str, capacity: usize, counters: Arc<RunCounters>) -> Self {
        Graphs { cache: LruCache::new(capacity), uncapturable: HashSet::new(), counters, component: component.into() }
    }

    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Whether the shapes of `key` were found not to capture (they run uncaptured from then on).
    pub fn is_uncapturable(&self, key: &GraphKey) -> bool {
        self.uncapturable.contains(key)
    }

    /// Runs `plan` once: a replay when its graph exists; else, when graphs are on and the shapes have not
    /// failed before, a capture (whose warm-up enqueue computes this run); else an uncaptured enqueue. A
    /// capture that fails, or whose context cannot be made, is remembered: the shapes run uncaptured from
    /// then on. Output shapes are checked against their buffers before anything is enqueued.
    pub fn execute<E: GraphExec<Context = C, Graph = G>>(&mut self, exec: &mut E, plan: &RunPlan) -> Result<OutShapes, String> {
        let key = GraphKey { profile: plan.profile, shapes: plan.shapes.clone() };
        if let Some(entry) = self.cache.get(&key) {
            exec.launch(&entry.graph)?;
            self.counters.add(Counter::GraphReplays, 1);
            return Ok(entry.out_shapes.clone());
        }
        if self.cache.capacity > 0 && !self.uncapturable.contains(&key) {
            match exec.new_context(plan.profile, &plan.shapes) {
                Ok((ctx, out_shapes)) => return self.capture(exec, key, ctx, out_shapes),
                Err(e) => self.cannot_capture(key, &format!("no context for a capture: {e}")),
            }
        }
        let out_shapes = exec.set_base_shapes(plan.profile, &plan.shapes)?;
        exec.check_outputs(&out_shapes)?;
        exec.enqueue(plan.profile, None)?;
        self.counters.add(Counter::UncapturedRuns, 1);
        Ok(out_shapes)
    }

    fn capture<E: GraphExec<Context = C, Graph = G>>(
        &mut self,
        exec: &mut E,
        key: GraphKey,
        mut ctx: C,
        out_shapes: OutShapes,
    ) -> Result<OutShapes, String> {
        exec.check_outputs(&out_shapes)?;
        // The warm-up enqueue computes this run's result; the capture records the next ones.
        exec.enqueue(key.profile, Some(&mut ctx))?;
        match exec.capture(&mut ctx) {
            Ok(graph) => {
                self.counters.add(Counter::GraphCaptures, 1);
                // Evicted graphs are idle: each run synchronises before it returns.
                let evicted = self.cache.insert(key, Entry { graph, _context: ctx, out_shapes: out_shapes.clone() });
                self.counters.add(Counter::GraphEvictions, evicted.len() as u64);
            }
            Err(e) => {
                self.cannot_capture(key, &e);
                self.counters.add(Counter::UncapturedRuns, 1);
            }
        }
        Ok(out_shapes)
    }

    fn cannot_capture(&mut self, key: GraphKey, why: &str) {
        self.counters.add(Counter::CaptureFailures, 1);
        tracing::warn!(component = %self.component, shapes = ?key.shapes, error = why, "CUDA graph capture failed; these shapes run without a graph from now on");
        self.uncapturable.insert(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// An EMULATED device (no GPU here): records the operations and fails where told.
    #[derive(Default)]
    struct Emulated {
        ops: Vec<String>,
        contexts: usize,
        fail_context: bool,
        fail_capture_for: Option<usize>,
        out_limit: usize,
    }

    impl GraphExec for Emulated {
        type Context = usize;
        type Graph = (usize, usize); // (context, first dim)
        fn new_context(&mut self, profile: usize, shapes: &[Vec<usize>]) -> Result<(usize, OutShapes), String> {
            if self.fail_context {
                return Err("out of memory".into());
            }
            self.contexts += 1;
            self.ops.push(format!("context {} p{profile}", self.contexts));
            Ok((self.contexts, vec![shapes[0].clone()]))
        }
        fn set_base_shapes(&mut self, profile: usize, shapes: &[Vec<usize>]) -> Result<OutShapes, String> {
            self.ops.push(format!("base p{profile}"));
            Ok(vec![shapes[0].clone()])
        }
        fn check_outputs(&self, shapes: &OutShapes) -> Result<(), String> {
            let n: usize = shapes[0].iter().product();
            if self.out_limit > 0 && n > self.out_limit {
                return Err(format!("output of {n} elements exceeds its buffer"));
            }
            Ok(())
        }
        fn enqueue(&mut self, profile: usize, context: Option<&mut usize>) -> Result<(), String> {
            self.ops.push(match context {
                Some(c) => format!("enqueue ctx {c}"),
                None => format!("enqueue base p{profile}"),
            });
            Ok(())
        }
        fn capture(&mut self, context: &mut usize) -> Result<(usize, usize), String> {
            if self.fail_capture_for == Some(*context) {
                self.ops.push(format!("capture ctx {context} failed"));
                return Err("operation not permitted when stream is capturing".into());
            }
            self.ops.push(format!("capture ctx {context}"));
            Ok((*context, 0))
        }
        fn launch(&mut self, graph: &(usize, usize)) -> Result<(), String> {
            self.ops.push(format!("replay {}", graph.0));
            Ok(())
        }
    }

    fn plan(rows: usize) -> RunPlan {
        RunPlan { profile: 0, shapes: vec![vec![rows, 16]], padded: BTreeMap::new() }
    }

    fn ops(e: &mut Emulated) -> Vec<String> {
        std::mem::take(&mut e.ops)
    }

    #[test]
    fn capture_then_replay_and_evict_the_least_recent() {
        let counters = Arc::new(RunCounters::default());
        let mut g: Graphs<usize, (usize, usize)> = Graphs::new("t", 2, counters.clone());
        let mut e = Emulated::default();
        assert_eq!(g.execute(&mut e, &plan(1)).unwrap(), vec![vec![1, 16]]);
        assert_eq!(ops(&mut e), ["context 1 p0", "enqueue ctx 1", "capture ctx 1"]);
        g.execute(&mut e, &plan(1)).unwrap();
        assert_eq!(ops(&mut e), ["replay 1"]);
        g.execute(&mut e, &plan(2)).unwrap();
        g.execute(&mut e, &plan(1)).unwrap(); // 1 is the most recent again
        g.execute(&mut e, &plan(4)).unwrap(); // evicts 2
        assert_eq!(g.len(), 2);
        ops(&mut e);
        g.execute(&mut e, &plan(2)).unwrap();
        assert_eq!(ops(&mut e), ["context 4 p0", "enqueue ctx 4", "capture ctx 4"], "2 was evicted: captured anew");
        let s = counters.snapshot();
        assert_eq!((s.graph_captures, s.graph_replays, s.graph_evictions, s.uncaptured_runs), (4, 2, 2, 0));
    }

    #[test]
    fn a_shape_that_cannot_be_captured_runs_uncaptured_and_is_remembered() {
        let counters = Arc::new(RunCounters::default());
        let mut g: Graphs<usize, (usize, usize)> = Graphs::new("t", 4, counters.clone());
        let mut e = Emulated { fail_capture_for: Some(1), ..Default::default() };
        // The failed capture's warm-up enqueue computed the run: its result stands.
        assert_eq!(g.execute(&mut e, &plan(3)).unwrap(), vec![vec![3, 16]]);
        assert_eq!(ops(&mut e), ["context 1 p0", "enqueue ctx 1", "capture ctx 1 failed"]);
        assert!(g.is_uncapturable(&GraphKey { profile: 0, shapes: vec![vec![3, 16]] }));
        // Remembered: no second attempt, the base context runs it.
        g.execute(&mut e, &plan(3)).unwrap();
        assert_eq!(ops(&mut e), ["base p0", "enqueue base p0"]);
        // Other shapes still capture.
        g.execute(&mut e, &plan(5)).unwrap();
        assert_eq!(ops(&mut e), ["context 2 p0", "enqueue ctx 2", "capture ctx 2"]);
        let s = counters.snapshot();
        assert_eq!((s.capture_failures, s.uncaptured_runs, s.graph_captures), (1, 2, 1));
    }

    #[test]
    fn a_context_that_cannot_be_made_does_not_fail_the_run() {
        let counters = Arc::new(RunCounters::default());
        let mut g: Graphs<usize, (usize, usize)> = Graphs::new("t", 4, counters.clone());
        let mut e = Emulated { fail_context: true, ..Default::default() };
        assert_eq!(g.execute(&mut e, &plan(2)).unwrap(), vec![vec![2, 16]]);
        assert_eq!(ops(&mut e), ["base p0", "enqueue base p0"]);
        e.fail_context = false;
        g.execute(&mut e, &plan(2)).unwrap();
        assert_eq!(ops(&mut e), ["base p0", "enqueue base p0"], "remembered: no new context for these shapes");
        let s = counters.snapshot();
        assert_eq!((s.capture_failures, s.uncaptured_runs), (1, 2));
    }

    #[test]
    fn graphs_off_runs_everything_uncaptured() {
        let counters = Arc::new(RunCounters::default());
        let mut g: Graphs<usize, (usize, usize)> = Graphs::new("t", 0, counters.clone());
        let mut e = Emulated::default();
        g.execute(&mut e, &plan(1)).unwrap();
        g.execute(&mut e, &plan(1)).unwrap();
        assert_eq!(ops(&mut e), ["base p0", "enqueue base p0", "base p0", "enqueue base p0"]);
        assert_eq!(counters.snapshot().uncaptured_runs, 2);
        assert!(g.is_empty());
    }

    #[test]
    fn outputs_too_large_for_their_buffers_are_refused_before_any_enqueue() {
        let counters = Arc::new(RunCounters::default());
        let mut e = Emulated { out_limit: 32, ..Default::default() };
        let mut g: Graphs<usize, (usize, usize)> = Graphs::new("t", 4, counters.clone());
        let err = g.execute(&mut e, &plan(3)).unwrap_err();
        assert!(err.contains("exceeds its buffer"), "{err}");
        assert!(!ops(&mut e).iter().any(|o| o.starts_with("enqueue")));
        let mut off: Graphs<usize, (usize, usize)> = Graphs::new("t", 0, counters);
        assert!(off.execute(&mut e, &plan(3)).is_err());
        assert!(!ops(&mut e).iter().any(|o| o.starts_with("enqueue")));
        assert!(g.execute(&mut e, &plan(2)).is_ok());
    }
}
