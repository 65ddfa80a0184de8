"""Stage 4: a ScaNN similarity index over the item embeddings, tuned to a recall target.

`config` (IndexConfig: how it is built, tuned and gated), `searcher` (SimilarityIndex:
search, writes, the directory on disk), `lock` (its readers-writer lock), `tuning`
(recall and latency measured against exact search), `build` (the stage: `build_index`).
"""
