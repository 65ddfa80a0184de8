"""Run the pipeline on this machine with `kfp.local` and summarise what it did.

The very graph that Vertex AI runs is executed by `kfp.local.SubprocessRunner`
(in this Python environment, no containers). Parameters come from
`visrec/configs/local.yaml`; models named `tiny` are created with `visrec init-models` under
the work dir, since no checkpoint can be downloaded here. The terminal shows one line per
task; everything the run prints goes to `WORK_DIR/logs/<time>/` (`pipelines.task_logs`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from pipelines.task_logs import capture_task_logs
from visrec.core import io
from visrec.core.errors import UserError
from visrec.orchestration.pipeline_config import load_run_config

log = logging.getLogger(__name__)

TINY = "tiny"
METRIC_ORDER = ("ndcg@5", "precision@1", "precision@3", "hit_rate@1", "hit_rate@3")


def resolve_parameters(listings_uri: str, interactions_uri: str, work_dir: Path,
                       config_uri: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """Pipeline parameters: config file, then overrides; `tiny` models created on first use."""
    params = dict(load_run_config(config_uri, "local.yaml")["parameters"])
    params.update(overrides)
    params["listings_uri"] = listings_uri
    params["interactions_uri"] = interactions_uri
    params.setdefault("registry", str(work_dir / "registry"))
    if TINY in (params.get("siglip_model"), params.get("baseline_model")):
        from visrec.model.encoders import init_models

        models_dir = work_dir / "models"
        if not (models_dir / "siglip" / "config.json").exists():
            init_models(models_dir, listings_uri=listings_uri)
        for key, kind in (("siglip_model", "siglip"), ("baseline_model", "mobilenet_v2")):
            if params.get(key) == TINY:
                params[key] = str(models_dir / kind)
    return params


def run_local(listings_uri: str, interactions_uri: str, work_dir: str | Path,
              config_uri: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the whole pipeline with kfp.local; returns (and writes `work_dir/run_summary.json`) its summary.

    Prints one line per task as it runs; each task's output is in `summary["logs"]`/<task>.log.
    """
    from kfp import local

    for uri in (listings_uri, interactions_uri):
        if not io.exists(uri):
            raise UserError(f"input not found: {uri}")
    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs" / time.strftime("%Y%m%d-%H%M%S")
    print(f"running the pipeline with kfp.local; the output of each task goes to {logs}/<task>.log", flush=True)
    root = work / "pipeline_root"
    before = set(root.iterdir()) if root.exists() else set()
    with capture_task_logs(logs):
        # Inside the capture: importing the components imports Beam, and creating tiny models
        # imports transformers, both of which log warnings about optional dependencies.
        from pipelines.visual_recommender import visual_recommender

        params = resolve_parameters(listings_uri, interactions_uri, work, config_uri, overrides or {})
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
        started = time.time()
        visual_recommender(**params)
        seconds = time.time() - started
    new_runs = sorted(set(root.iterdir()) - before, key=lambda p: p.stat().st_mtime)
    if not new_runs:
        raise RuntimeError(f"kfp.local wrote no run under {root}")
    summary = summarize_run(new_runs[-1], started)
    summary.update({"seconds": round(seconds, 1), "parameters": params, "work_dir": str(work), "logs": str(logs)})
    io.write_json(str(work / "run_summary.json"), summary)
    return summary


def summarize_run(run_dir: Path, started: float) -> dict[str, Any]:
    """What each task produced: its metrics, plain outputs, artifact locations and wall time.

    kfp.local runs tasks one after another, so a task's wall time is the gap between its
    executor output and the previous task's.
    """
    tasks = []
    for task_dir in run_dir.iterdir():
        out_file = task_dir / "executor_output.json"
        if not out_file.exists():
            continue
        output = json.loads(out_file.read_text())
        metrics: dict[str, Any] = {}
        artifacts: dict[str, str] = {}
        for name, group in output.get("artifacts", {}).items():
            for art in group.get("artifacts", []):
                artifacts[name] = art["uri"]
                if art.get("metadata") and name in ("metrics",):
                    metrics.update(art["metadata"])
        tasks.append({"task": task_dir.name, "finished": out_file.stat().st_mtime, "metrics": metrics,
                      "outputs": output.get("parameterValues", {}), "artifacts": artifacts})
    tasks.sort(key=lambda t: t["finished"])
    previous = started
    for t in tasks:
        t["seconds"] = round(t["finished"] - previous, 1)
        previous = t.pop("finished")
    by_name = {t["task"]: t for t in tasks}
    summary: dict[str, Any] = {"run": run_dir.name, "run_dir": str(run_dir), "tasks": tasks}
    evaluation = by_name.get("evaluate", {}).get("artifacts", {}).get("evaluation")
    if evaluation:
        summary["evaluation"] = io.read_json(io.join(evaluation, "metrics.json"))
        summary["report"] = io.join(evaluation, "report.html")
    summary["decision"] = by_name.get("gate-decision", {}).get("outputs", {}).get("Output")
    summary["deployed"] = "deploy" in by_name
    if summary["deployed"]:
        summary["release"] = by_name["deploy"]["artifacts"].get("release")
        summary["deploy_status"] = by_name["deploy"]["outputs"].get("Output")
    summary["rejection_recorded"] = "record-rejection" in by_name
    return summary


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _figure(value: Any) -> str:
    # KFP metrics are floats: show counts as integers.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return _fmt(value, 4) if isinstance(value, float) else str(value)


def format_summary(summary: dict[str, Any]) -> str:
    """The human summary `visrec run-local` prints: stages, gate table, decision, paths."""
    lines = [f"pipeline run {summary['run']} finished in {summary['seconds']:.0f}s", "",
             f"{'stage':<22}{'seconds':>8}  key figures"]
    for t in summary["tasks"]:
        figures = ", ".join(f"{k}={_figure(v)}" for k, v in list(t["metrics"].items())[:6])
        lines.append(f"{t['task']:<22}{t['seconds']:>8.1f}  {figures}")
    ev = summary.get("evaluation")
    if ev:
        up = ev["uplift"]["candidate_vs_baseline"]
        lines += ["", f"gate: candidate vs baseline on {ev['lists_used']} impression lists "
                      f"({ev['lists_skipped']} skipped)",
                  f"{'metric':<14}{'candidate':>10}{'baseline':>10}{'uplift':>9}  95% CI of uplift"]
        for m in METRIC_ORDER:
            u = up[m]
            ci = u.get("ci95") or [None, None]
            rel = "-" if u.get("relative") is None else f"{100 * u['relative']:+.1f}%"
            lines.append(f"{m:<14}{_fmt(u['value']):>10}{_fmt(u['reference']):>10}{rel:>9}  "
                         f"[{_fmt(ci[0])}, {_fmt(ci[1])}]")
        lines.append("")
        for r in ev["reasons"]:
            lines.append(f"  {'PASS' if r['passed'] else 'FAIL'}  {r.get('message', r)}")
    lines += ["", f"decision: {summary.get('decision')}"]
    if summary.get("deployed"):
        lines.append(f"release: {summary.get('release')} ({summary.get('deploy_status')})")
    elif summary.get("rejection_recorded"):
        lines.append("candidate rejected: not deployed (rejection recorded in the registry)")
    if summary.get("report"):
        lines.append(f"report: {summary['report']}")
    lines.append(f"logs: {summary['logs']}")
    return "\n".join(lines)
