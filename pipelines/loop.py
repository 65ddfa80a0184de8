"""`make loop`: the closed loop on one machine, twice round.

1. Generate a marketplace and run the whole pipeline with kfp.local (as `make demo`): release 1.
2. Serve it with impression logging on (`visrec serve --log-uri`) and let simulated users, who tap
   by the generator's hidden user model, look at listings and report their taps (`POST /v1/events`).
3. `visrec join-events` turns the service's logs into today's interactions partition.
4. Run the pipeline again on those fresh interactions (the data resolver takes the newest complete
   partition): its gate compares the new candidate with the baseline and with release 1, the
   champion, on what release 1's users actually did.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from visrec.cli import configure_logging
from visrec.core.servers import ServeProcess


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="loop-work")
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--users", type=int, default=400)
    parser.add_argument("--sessions", type=int, default=10, help="page views per user")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    configure_logging()
    from pipelines.demo import run_on_marketplace
    from pipelines.run_local import format_summary, run_local
    from visrec.sim.demo_data import load_hidden
    from visrec.sim.traffic import drive_users
    from visrec.stages.configs import JoinConfig
    from visrec.stages.join_events import join_events

    started = time.time()
    work = Path(args.work_dir).resolve()
    data, first = run_on_marketplace(work, args.items, args.seed)
    print("\n== run 1 (generated logs) ==\n" + format_summary(first))
    if not first.get("deployed") or first.get("deploy_status") != "deployed":
        print("run 1 deployed nothing: no release to serve, the loop stops here")
        return 1

    registry = Path(first["parameters"]["registry"])
    logs = work / "serving-logs"
    token = secrets.token_hex(16)
    hidden = load_hidden(data)
    listings = [json.loads(line) for line in (data / "listings.jsonl").read_text().splitlines()]
    queries = [row["item_id"] for row in listings if row["status"] == "on_sale"]
    with ServeProcess(registry, ["--log-uri", str(logs), "--log-flush-seconds", "1"], work / "serve.log",
                      env={"VISREC_EVENTS_TOKEN": token}) as server:
        server.wait_healthy()
        traffic = drive_users(server.url, hidden, queries, args.users, args.sessions, token, seed=args.seed)
    served = traffic.arms[None]
    print(f"\n== served release {first.get('release')} to {args.users} users: "
          f"{served.impressions} impressions, {served.taps} taps (CTR {served.taps / max(served.impressions, 1):.3f})")

    today = datetime.now(timezone.utc).date().isoformat()
    joined = join_events(JoinConfig(logs=str(logs), out=str(work / "interactions"), dates=[today])).days[today]
    print(f"joined {joined['rows']} impressions, {joined['taps']} tapped -> {joined['partition']}")

    second = run_local(str(data / "listings.jsonl"), str(work / "interactions"), work / "run")
    print("\n== run 2 (gated on the logs release 1's service produced) ==\n" + format_summary(second))
    print(f"\nloop finished in {time.time() - started:.0f}s (work dir {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
