"""The paper's offline study on the synthetic marketplace (same code as `visrec study`).

    python bench/study.py --out /tmp/study                 # 20,000 items, the pretrained CPU stand-ins
    python bench/study.py --out /tmp/study --shuffled-titles-control   # + the negative control
    python bench/study.py --out /tmp/study --full-size     # SigLIP ViT-B/16-256 architecture (GPU)

Writes everything into --out (study.json, study.md, plots, the gate report), prints the
headline figures and copies study.json to bench/results/study.json. The data are
synthetic: the figures are this study's, not the paper's.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from benchkit import RESULTS_DIR, write_results
from visrec.cli.study import add_arguments, config_from_args
from visrec.sim.study.report import summary_lines
from visrec.sim.study.run import run_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    config = config_from_args(args)
    result = run_study(config, command="python bench/study.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    print("\n".join(summary_lines(result)))
    write_results(RESULTS_DIR / "study.json", result)


if __name__ == "__main__":
    main()
