"""`visrec experiment start|stop|status`: the registry's online A/B experiment, audited."""

from __future__ import annotations

import argparse
import json

from visrec.core.defaults import field_defaults

HELP = ("start, stop or show the online A/B experiment: the serving replicas split users between the release "
        "in production (control) and a treatment release by a salted hash")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from visrec.stages.experiment.config import ExperimentConfig

    defaults = field_defaults(ExperimentConfig)
    sub = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    start = sub.add_parser("start", help="start an experiment of TREATMENT against CURRENT")
    start.add_argument("treatment", help="the treatment release's version (see `visrec releases`)")
    start.add_argument("--share", type=float, default=defaults["share"],
                       help="fraction of users in the treatment (default: %(default)s)")
    start.add_argument("--salt", default=defaults["salt"],
                       help="assignment salt (default: the experiment's id, so each experiment reshuffles users)")
    start.add_argument("--exploration", type=float, default=defaults["exploration"],
                       help="share of answers with one randomised slot, for the IPS metric (default: %(default)s)")
    start.add_argument("--explore-depth", type=int, default=defaults["explore_depth"],
                       help="positions the randomised slot is drawn from (default: %(default)s)")
    stop = sub.add_parser("stop", help="stop the running experiment: every user back on CURRENT")
    status = sub.add_parser("status", help="the running experiment, as JSON")
    for p in (start, stop, status):
        p.add_argument("--registry", required=True, help="registry directory, local or gs://")
    for p in (start, stop):
        p.add_argument("--who", required=True, help="who starts or stops it (name or e-mail)")
        p.add_argument("--why", required=True, help="why (the hypothesis, or the decision)")


def run(args: argparse.Namespace) -> int:
    from visrec.stages.experiment import control
    from visrec.stages.experiment.config import ExperimentConfig

    if args.action == "start":
        record = control.start_experiment(args.registry, ExperimentConfig(
            treatment=args.treatment, share=args.share, salt=args.salt, exploration=args.exploration,
            explore_depth=args.explore_depth), who=args.who, why=args.why)
        print(f"started {record['id']}: {record['control']} (control) vs {record['treatment']} "
              f"({record['share']:.0%} of users); serving replicas pick it up within seconds")
    elif args.action == "stop":
        record = control.stop_experiment(args.registry, who=args.who, why=args.why)
        print(f"stopped {record['id']}; every user is back on CURRENT")
    else:
        print(json.dumps(control.experiment_status(args.registry), indent=2))
    return 0
