"""visrec: a visual "similar items" recommender for second-hand marketplaces.

All logic lives in this package and is importable without KFP; `components/`
wraps it for Kubeflow Pipelines and `serving/` exposes it over HTTP.
"""

__version__ = "0.1.0"
