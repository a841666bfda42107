"""OSD: online speculative decoding — serve with speculative decoding, distil drafts online."""

import os

# Small models on shared CPUs: OpenMP threads that spin-wait between parallel regions make
# a multi-token forward 10-100× slower whenever another process wants the cores. Sleeping
# instead costs microseconds. Must be set before torch loads OpenMP; users can override it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
