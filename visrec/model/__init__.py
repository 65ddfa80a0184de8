"""Models as functions: loading encoders (hub id, directory or gs://), the tiny models the
project builds itself, the SigLIP sigmoid loss, PCA.

May import: `visrec.core`, `visrec.data`.
"""
