"""The data contract: schemas, the one reader per input (listings, interactions, images),
versioned data sources and embedding files.

May import: `visrec.core`.
"""
