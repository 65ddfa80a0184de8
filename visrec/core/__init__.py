"""Infrastructure every other package may use: typed errors, local/GCS I/O, plots.

Imports nothing from the rest of visrec.
"""
