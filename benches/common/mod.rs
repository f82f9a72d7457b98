//! Timing shared by the benchmarks.

use kvsieve::kernels::GpuExecutor;
use std::time::{Duration, Instant};

/// Runs `record` (which records one instance of the work) `iters` times, one
/// submit each, and returns the summed GPU time (timestamps) or wall time.
pub fn timed(
    ex: &mut GpuExecutor,
    iters: u64,
    mut record: impl FnMut(&mut GpuExecutor),
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let t = Instant::now();
        record(ex);
        let r = ex.rec.submit().expect("submit");
        total += match r.gpu_ns {
            Some(ns) if ns > 0.0 => Duration::from_nanos(ns as u64),
            _ => t.elapsed(),
        };
    }
    total
}
