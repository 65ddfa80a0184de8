"""Infrastructure every other package may use: typed errors, local/GCS I/O, directory checksums,
library versions, timestamps, plots, config dataclass defaults, stable hashes, progress lines,
text tables, local servers (free port, health wait, `visrec serve` child).

Imports nothing from the rest of visrec.
"""
