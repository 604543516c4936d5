"""Settings for the whole test run."""

from __future__ import annotations

import os
import sys

# One torch (OpenMP) thread in this process and in every process the tests start (they
# inherit the environment), unless the caller chose a number: set before torch is
# imported, which reads it then. The tests' tensors are tiny, so a second thread buys
# nothing; and where other processes keep the cores busy, each parallel region waits
# for a thread that is not running (the demo's all-in-RAM run, on the 2-core VM under
# load: 12 s with torch's default of a thread a core, 0.6 s with one). Results compared
# bit for bit are made under the same setting on both sides.
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:  # imported before this file (by a plugin): tell it too
        sys.modules["torch"].set_num_threads(1)
