"""The real-time side: ranking (price filter, category re-rank), serving state, the write
journal and its merging, the hand-over between releases.

May import: `visrec.core`, `visrec.data`, `visrec.model`, `visrec.stages` (it serves what they build).
"""
