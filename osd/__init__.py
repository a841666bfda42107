"""OSD: online speculative decoding — serve with speculative decoding, distil drafts online."""

__version__ = "0.1.0"
