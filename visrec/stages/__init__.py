"""The batch stages of the pipeline, in the order a run goes through them: prepare, train,
embed (+ PCA), index, evaluate (with the gate and its report), release (deploy).

Each stage is a config dataclass (the only place its defaults are written, checked in
`__post_init__`; prepare's, train's, embed's and evaluate's in `configs`, which imports neither
torch nor Beam) and a `run_*` function returning a result dataclass; the `visrec <stage>` CLI
and the KFP component both call that function.
May import: `visrec.core`, `visrec.data`, `visrec.model`, and earlier stages' outputs' readers.
"""
