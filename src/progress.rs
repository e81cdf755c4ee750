//! Progress of long library calls (the stages of an exact solve, each CG iteration, each step
//! of an offline pass): a sink the caller hands in, called with one line per event, and
//! optionally a stop check asked at the same points. The library never prints; the CLI turns
//! the lines into a progress bar on a terminal and into plain stderr lines otherwise, so that a
//! batch job's log shows how far a solve got; the Python package's stop check is Ctrl-C.

use std::sync::Arc;

use crate::error::{Error, Result};

/// A caller's function that takes one progress line.
type Sink = Arc<dyn Fn(&str) + Send + Sync>;

/// A caller's function that says whether to stop.
type Stop = Arc<dyn Fn() -> bool + Send + Sync>;

/// Where progress lines go: nowhere (the default) or a caller's function; and whether the
/// caller wants the work stopped.
#[derive(Clone, Default)]
pub struct Progress {
    sink: Option<Sink>,
    stop: Option<Stop>,
}

impl Progress {
    /// No progress reported, never stopped.
    pub fn none() -> Self {
        Self::default()
    }

    /// Each event's line goes to `f`.
    pub fn new(f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Self {
            sink: Some(Arc::new(f)),
            stop: None,
        }
    }

    /// Asks `stop` at every progress point (each CG iteration, each chunk of a streamed
    /// product, each stage of a solve, each step of an offline pass); when it says `true`,
    /// the call returns [`Error::Interrupted`] there. `stop` is called on the thread that runs
    /// the call (not on the worker threads), a few times a second at most on the passes.
    pub fn with_stop(mut self, stop: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        self.stop = Some(Arc::new(stop));
        self
    }

    /// Whether anyone listens (a caller may skip building a line nobody reads).
    pub fn is_active(&self) -> bool {
        self.sink.is_some()
    }

    /// Reports the line `line()` builds, if anyone listens, then asks the stop check:
    /// [`Error::Interrupted`] naming the line's event when it says stop.
    pub fn report(&self, line: impl FnOnce() -> String) -> Result<()> {
        if self.sink.is_none() && self.stop.is_none() {
            return Ok(());
        }
        let line = line();
        if let Some(f) = &self.sink {
            f(&line);
        }
        self.check(|| line)
    }

    /// Asks the stop check only: [`Error::Interrupted`] at `place()` when it says stop.
    pub fn check(&self, place: impl FnOnce() -> String) -> Result<()> {
        match &self.stop {
            Some(stop) if stop() => Err(Error::Interrupted(place())),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match (self.sink.is_some(), self.stop.is_some()) {
            (true, true) => "Progress(reported, stoppable)",
            (true, false) => "Progress(reported)",
            (false, true) => "Progress(stoppable)",
            (false, false) => "Progress(none)",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn lines_reach_the_sink_and_none_builds_nothing() {
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let s = seen.clone();
        let p = Progress::new(move |l| s.lock().unwrap().push(l.to_string()));
        assert!(p.is_active());
        p.report(|| "step 1".into()).unwrap();
        p.clone().report(|| "step 2".into()).unwrap();
        assert_eq!(*seen.lock().unwrap(), vec!["step 1", "step 2"]);
        let none = Progress::none();
        assert!(!none.is_active());
        none.report(|| unreachable!("a line nobody reads is not built"))
            .unwrap();
        assert_eq!(format!("{none:?}"), "Progress(none)");
    }

    #[test]
    fn a_stop_check_interrupts_at_the_next_point() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        let p = Progress::none().with_stop(move || f.load(Ordering::Relaxed));
        assert!(!p.is_active());
        p.report(|| "step 1".into()).unwrap();
        flag.store(true, Ordering::Relaxed);
        let e = p.report(|| "cg iteration 2".into()).unwrap_err();
        assert!(
            matches!(e, Error::Interrupted(ref at) if at == "cg iteration 2"),
            "{e}"
        );
        assert!(p.check(|| "stage".into()).is_err());
        assert_eq!(format!("{p:?}"), "Progress(stoppable)");
    }
}
