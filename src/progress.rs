//! Progress of long library calls (the stages of an exact solve, each CG iteration): a sink the
//! caller hands in, called with one line per event. The library never prints; the CLI turns the
//! lines into a progress bar on a terminal and into plain stderr lines otherwise, so that a
//! batch job's log shows how far a solve got.

use std::sync::Arc;

/// A caller's function that takes one progress line.
type Sink = Arc<dyn Fn(&str) + Send + Sync>;

/// Where progress lines go: nowhere (the default) or a caller's function.
#[derive(Clone, Default)]
pub struct Progress(Option<Sink>);

impl Progress {
    /// No progress reported.
    pub fn none() -> Self {
        Self(None)
    }

    /// Each event's line goes to `f`.
    pub fn new(f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(f)))
    }

    /// Whether anyone listens (a caller may skip building a line nobody reads).
    pub fn is_active(&self) -> bool {
        self.0.is_some()
    }

    /// Reports the line `line()` builds, if anyone listens.
    pub fn report(&self, line: impl FnOnce() -> String) {
        if let Some(f) = &self.0 {
            f(&line());
        }
    }
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Progress(reported)"
        } else {
            "Progress(none)"
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
        p.report(|| "step 1".into());
        p.clone().report(|| "step 2".into());
        assert_eq!(*seen.lock().unwrap(), vec!["step 1", "step 2"]);
        let none = Progress::none();
        assert!(!none.is_active());
        none.report(|| unreachable!("a line nobody reads is not built"));
        assert_eq!(format!("{none:?}"), "Progress(none)");
    }
}
