#!/usr/bin/env python3
"""Export a PyTorch model for the deltavar command line (see `--help`).

The recipe lives in the Python package, `python/deltavar_rs/export_torch.py`, where
`deltavar_rs.Model.from_torch` uses it; this script runs that file (no build of the package
needed) and re-exports its functions, so `from export_torch import export_onnx` keeps working
with scripts/ on the path.
"""

import importlib.util
import os
import sys

_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "deltavar_rs", "export_torch.py")
_spec = importlib.util.spec_from_file_location("deltavar_export_torch", _PATH)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
__doc__ = _module.__doc__
globals().update({k: v for k, v in vars(_module).items() if not k.startswith("__")})

if __name__ == "__main__":
    sys.exit(_module.main())
