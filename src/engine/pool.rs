//! Worker pools for the engines: each pass runs on its own rayon pool of a chosen size, so the
//! engines never depend on (or change) the global pool or the process environment.

use rayon::prelude::*;

use crate::error::{Error, Result};

/// `threads`, or one per available core when 0.
pub(crate) fn resolve_threads(threads: usize) -> usize {
    if threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        threads
    }
}

/// Runs `f` inside a fresh pool of `threads` workers (0: one per core). The workers recycle the
/// graph engine's pass buffers ([`crate::scalar::pool`]); their buffers go with them when the
/// pool ends.
pub(crate) fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> Result<T> {
    let threads = resolve_threads(threads);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .start_handler(|_| crate::scalar::pool::enable_on_this_thread())
        .build()
        .map_err(|e| {
            Error::invalid(
                "threads",
                threads,
                format!("could not start the worker pool: {e}"),
            )
        })?;
    Ok(pool.install(f))
}

/// Maps `f` over 0..n in parallel on a pool of `threads` workers, keeping order.
pub(crate) fn map_indices<T: Send>(
    n: usize,
    threads: usize,
    f: impl Fn(usize) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    in_pool(threads, || {
        (0..n).into_par_iter().map(&f).collect::<Result<Vec<T>>>()
    })?
}
