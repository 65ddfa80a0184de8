"""Running the stages as one pipeline: run configs, Vertex AI Pipelines submission and
schedules, run records.

May import everything but `visrec.cli` and `visrec.sim`.
"""
