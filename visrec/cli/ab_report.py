"""`visrec ab-report`: an experiment's CTR and CVR per arm with user-level intervals, SRM and a recommendation."""

from __future__ import annotations

import argparse

from visrec.core.defaults import field_defaults

HELP = ("report an online A/B experiment from the joined interactions (`visrec join-events`): CTR and CVR per "
        "arm with user-level bootstrap intervals, the sample-ratio check, and promote / keep / stop")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from visrec.stages.experiment.config import ReportConfig

    defaults = field_defaults(ReportConfig)
    parser.add_argument("--logs", required=True, help="joined interactions: a dt= partition or a prefix of them")
    parser.add_argument("--registry", help="registry whose experiment (share, id) the logs belong to")
    parser.add_argument("--experiment", help="the experiment id (default: the registry's running one)")
    parser.add_argument("--share", type=float, help="the treatment share, when there is no --registry")
    parser.add_argument("--out", default=defaults["out"], help="where ab_report.json and ab_report.html go")
    parser.add_argument("--resamples", type=int, default=defaults["resamples"],
                        help="bootstrap resamples of users (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults["seed"], help="bootstrap seed (default: %(default)s)")
    parser.add_argument("--srm-alpha", type=float, default=defaults["srm_alpha"],
                        help="a sample-ratio p-value below this stops the experiment (default: %(default)s)")
    parser.add_argument("--min-users", type=int, default=defaults["min_users"],
                        help="fewer users in an arm -> keep collecting (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from visrec.stages.experiment.config import ReportConfig
    from visrec.stages.experiment.report import ab_report

    result = ab_report(ReportConfig(logs=args.logs, out=args.out, resamples=args.resamples, seed=args.seed,
                                    srm_alpha=args.srm_alpha, min_users=args.min_users),
                       registry=args.registry, experiment=args.experiment, share=args.share)
    for arm, row in result["arms"].items():
        print(f"{arm:9s} users {row['users']:6d}  CTR {row['ctr']}  {row['ctr_ci95']}  CVR {row['cvr']}  "
              f"{row['cvr_ci95']}")
    ctr = result["uplift"]["ctr"]
    print(f"CTR uplift {ctr['relative']} {ctr['ci95']}; SRM p = {result['srm_p_value']}")
    print(f"recommendation: {result['decision']} ({result['why']})")
    return 0
