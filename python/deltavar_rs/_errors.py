"""The package's exceptions: every error of the Rust library arrives as one of these, with the
same one-line message the command line prints."""


class DeltavarError(Exception):
    """Base class of every error the deltavar library reports."""


class DeltavarValueError(DeltavarError, ValueError):
    """A bad argument, shape or value: an option outside its choices, a NaN in the data, a Σ
    that is not positive definite, a solver that did not converge."""


class DeltavarIOError(DeltavarError, OSError):
    """A file that could not be read or written, or whose content is not what was expected
    (a corrupt .npy, safetensors, ONNX or Fisher file); the message names the file."""


class DeltavarMemoryError(DeltavarError, MemoryError):
    """A computation that would need more memory than its budget (`memory_budget`) allows;
    the message says what to do instead."""
