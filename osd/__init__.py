"""OSD: online speculative decoding — serve with speculative decoding, distil drafts online."""

import os

# OpenMP workers spin ~0.2 ms between parallel regions, then sleep (osd/specdec/threads.py:
# a decode step of a small model is ~100 small regions, and a sleeping worker takes tens of
# µs to wake on a VM; an idle process still leaves the cores to others within 0.2 ms).
# Must be set before torch loads OpenMP; users can override either variable.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

__version__ = "0.1.0"
