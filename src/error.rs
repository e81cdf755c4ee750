//! The crate's one error type.
//!
//! Every fallible function returns [`Result<T>`]. Each variant names the culprit (a parameter, a
//! file, an option) and, where one exists, what to do about it. Library code never panics on bad
//! input and never returns a silent NaN: non-finite values are reported as [`Error::NonFinite`].

use thiserror::Error;

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in `deltavar`.
#[derive(Debug, Error)]
pub enum Error {
    /// An error raised by candle while running the user's model or one of ours.
    #[error("candle error: {0}")]
    Candle(#[from] candle_core::Error),

    /// A vector or matrix does not have the size the computation needs.
    #[error("shape mismatch for {what}: expected {expected}, got {got}")]
    Shape {
        /// What was checked (for example "diagonal Sigma").
        what: String,
        /// The expected shape or length.
        expected: String,
        /// The shape or length that was passed.
        got: String,
    },

    /// A closure or input produced NaN or ±Inf where a finite number is required.
    #[error("non-finite value in {what}: {detail}")]
    NonFinite {
        /// Where the value came from (for example "QoI closure output").
        what: String,
        /// Which entry, and a hint.
        detail: String,
    },

    /// A closure returned something that is not a scalar where a scalar was required.
    #[error("{what} must return a scalar (one element), got a tensor of shape {shape}")]
    NotScalar {
        /// The closure that misbehaved.
        what: String,
        /// The shape that was returned.
        shape: String,
    },

    /// `F + λI` (or another matrix that must be positive definite) failed its Cholesky factorization.
    #[error(
        "{what} is not positive definite (Cholesky pivot {pivot} of {dim} is not positive) with damping λ = {damping:e}; \
         use a larger damping (for example {suggestion:e})"
    )]
    NotPositiveDefinite {
        /// Which matrix.
        what: String,
        /// The index of the failing pivot.
        pivot: usize,
        /// The matrix dimension.
        dim: usize,
        /// The damping in use.
        damping: f64,
        /// A damping to try instead.
        suggestion: f64,
    },

    /// An option has a value the computation cannot use.
    #[error("invalid option {option} = {value}: {hint}")]
    InvalidOption {
        /// The option's name.
        option: String,
        /// Its value.
        value: String,
        /// What would be accepted.
        hint: String,
    },

    /// A Σ strategy needs an input that was not provided.
    #[error("sigma strategy '{strategy}' needs {missing}")]
    MissingInput {
        /// The strategy's name.
        strategy: String,
        /// What is missing and how to pass it.
        missing: String,
    },

    /// A parameter name is unknown, duplicated or absent from a model.
    #[error("parameter error: {0}")]
    Parameter(String),

    /// A computation would need more memory than the configured budget allows.
    #[error("{what} needs about {needed} bytes, over the memory budget of {budget} bytes; {hint}")]
    MemoryBudget {
        /// What would have been allocated.
        what: String,
        /// Bytes needed.
        needed: u64,
        /// The budget in force.
        budget: u64,
        /// What to do instead.
        hint: String,
    },

    /// The operation is not available for this kind of Σ (for example applying a custom Σ,
    /// which only defines the quadratic form, to a vector).
    #[error("{0}")]
    Unsupported(String),

    /// An iterative solver stopped before reaching its tolerance.
    #[error(
        "{what} did not converge: after {iterations} iterations the worst relative residual is {residual:e} \
         (tolerance {tol:e}); {hint}; or raise max_iter, loosen the tolerance, increase the \
         damping, or opt in to accept the approximation"
    )]
    NotConverged {
        /// The solver.
        what: String,
        /// Iterations run.
        iterations: usize,
        /// The worst per-column relative residual reached.
        residual: f64,
        /// The tolerance asked for.
        tol: f64,
        /// A method that would answer instead.
        hint: String,
    },

    /// The caller's stop check ([`crate::Progress::with_stop`]) asked to stop (Ctrl-C in the
    /// Python package); nothing was returned.
    #[error("interrupted at {0}")]
    Interrupted(String),

    /// A file could not be read or written.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A file was read but its content is not what was expected.
    #[error("bad file {path}: {detail}")]
    BadFile {
        /// The file.
        path: String,
        /// What is wrong with it.
        detail: String,
    },
}

impl Error {
    pub(crate) fn shape(
        what: impl Into<String>,
        expected: impl ToString,
        got: impl ToString,
    ) -> Self {
        Error::Shape {
            what: what.into(),
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }

    /// An [`Error::InvalidOption`] for `option = value` with a hint of what is accepted.
    pub fn invalid(
        option: impl Into<String>,
        value: impl ToString,
        hint: impl Into<String>,
    ) -> Self {
        Error::InvalidOption {
            option: option.into(),
            value: value.to_string(),
            hint: hint.into(),
        }
    }
}

/// Returns an error naming `what` and the first non-finite entry of `values`, if any.
pub(crate) fn check_finite(what: &str, values: &[f64]) -> Result<()> {
    if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: what.to_string(),
            detail: format!("entry {i} is {v}"),
        });
    }
    Ok(())
}
