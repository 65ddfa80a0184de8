"""The real-time side: ranking (price filter, category re-rank), the service and its serving
state, the write journal and its merging, the hand-over between releases, and how the worker
processes of one server keep in step (docs/serving.md lists the modules).

May import: `visrec.core`, `visrec.data`, `visrec.model`, `visrec.stages` (it serves what they build).
"""
