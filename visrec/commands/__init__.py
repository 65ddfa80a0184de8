"""One module per `visrec` subcommand: `HELP`, `add_arguments(parser)`, `run(args)`."""
