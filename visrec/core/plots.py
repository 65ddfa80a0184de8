"""Figures as PNG bytes, for reports that embed them or files that store them.

Headless everywhere (containers, CI): the Agg backend, and every figure closed after
rendering so long runs don't accumulate them.
"""

from __future__ import annotations

import io
from typing import Any


def pyplot() -> Any:
    """`matplotlib.pyplot` on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig: Any, dpi: int = 100) -> bytes:
    """Render `fig` to PNG bytes and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    return buf.getvalue()
