"""The real-time side: ranking (price filter, category re-rank), the service and its serving
state, the write journal and its merging, the hand-over between releases, how the worker
processes of one server keep in step (docs/serving.md lists the modules), and the ingest of
listing events into the journal (`visrec ingest`, docs/ingest.md).

May import: `visrec.core`, `visrec.data`, `visrec.model`, `visrec.stages` (it serves what they build).
"""
