"""The loop through a real `visrec serve`: an experiment splits users between two releases, every
answer is logged as impressions, taps come back through `POST /v1/events`, `visrec join-events`
makes interactions of them, and `visrec ab-report` measures the uplift the synthetic
marketplace's hidden user model implies (and none between two copies of one release)."""

from __future__ import annotations

import random
from datetime import datetime, timezone
from pathlib import Path

import pytest

from test_serving import CATEGORIES, COLOURS, build_release, jpeg
from visrec.core.servers import ServeProcess
from visrec.sim.traffic import drive_users
from visrec.stages.configs import JoinConfig
from visrec.stages.experiment.assignment import CONTROL, TREATMENT
from visrec.stages.experiment.config import ExperimentConfig, ReportConfig
from visrec.stages.experiment.control import start_experiment
from visrec.stages.experiment.report import ab_report
from visrec.stages.join_events import join_events

pytestmark = pytest.mark.integration

N_ITEMS = 120
TOKEN = "events-token-for-tests-0123456789"
# The test catalogue's colours as the marketplace generator names them (its hidden user model's words).
COLOUR_NAMES = ["red", "green", "blue", "yellow", "black", "white"]


def hidden_rows() -> dict[str, dict]:
    """The hidden attributes of `build_release`'s items, in the generator's terms."""
    return {f"item-{i:04d}": {"item_id": f"item-{i:04d}", "shape": "box", "colour": COLOUR_NAMES[i % len(COLOURS)],
                              "pattern": "stripes" if i % 5 else "plain", "category": CATEGORIES[i % len(CATEGORIES)],
                              "price": 1000 + 10 * (i % 20)} for i in range(N_ITEMS)}


def scrambled_release(tiny_models: Path, registry: Path, version: str, monkeypatch) -> None:
    """A release whose vectors come from photos of random colours: it ranks worse for these users."""
    from visrec.model import encode

    real = encode.encode_images
    rng = random.Random(7)

    def random_photo(encoder, images, pca):
        from visrec.data.images import decode_image

        return real(encoder, [decode_image(jpeg(rng.choice(COLOURS), rng.randrange(5)))], pca)

    with monkeypatch.context() as patch:
        patch.setattr(encode, "encode_images", random_photo)
        build_release(tiny_models, registry, version, n_items=N_ITEMS)


def run_experiment(tmp_path: Path, registry: Path, users: int, sessions: int) -> tuple[dict, float]:
    """Serve the experiment, drive it, join the logs, report; (report, implied CTR uplift)."""
    logs = tmp_path / "logs"
    with ServeProcess(registry, ["--log-uri", str(logs), "--log-flush-seconds", "0.5"], tmp_path / "serve.log",
                      env={"VISREC_EVENTS_TOKEN": TOKEN}) as server:
        server.wait_healthy(lambda health: health.get("experiment") is not None)
        traffic = drive_users(server.url, hidden_rows(), [f"item-{i:04d}" for i in range(N_ITEMS)], users, sessions,
                              TOKEN, seed=11)
    today = datetime.now(timezone.utc).date().isoformat()
    join_events(JoinConfig(logs=str(logs), out=str(tmp_path / "interactions"), dates=[today]))
    report = ab_report(ReportConfig(logs=str(tmp_path / "interactions"), out=str(tmp_path / "report"),
                                    resamples=1000, min_users=50), registry=str(registry))
    return report, traffic.implied_uplift()


def test_an_experiment_measures_the_uplift_the_user_model_implies(tmp_path, tiny_models, monkeypatch):
    registry = tmp_path / "registry"
    build_release(tiny_models, registry, "v1", n_items=N_ITEMS)
    scrambled_release(tiny_models, registry, "v2", monkeypatch)
    (registry / "CURRENT").write_text("v1\n")
    start_experiment(str(registry), ExperimentConfig(treatment="v2"), "test", "does a scrambled index lose taps?")
    report, implied = run_experiment(tmp_path, registry, users=250, sessions=5)
    low, high = report["uplift"]["ctr"]["ci95"]
    assert implied < -0.05, implied  # the scrambled release really is worse for these users
    assert low <= implied <= high, (implied, report["uplift"])
    assert report["decision"] == "stop" and report["srm_p_value"] > 0.001
    arms = report["arms"]
    assert abs(arms[TREATMENT]["users"] / (arms[CONTROL]["users"] + arms[TREATMENT]["users"]) - 0.5) < 0.1
    assert (tmp_path / "report" / "ab_report.html").read_text().count("<table>") == 2


def test_two_copies_of_one_release_show_no_uplift(tmp_path, tiny_models):
    registry = tmp_path / "registry"
    build_release(tiny_models, registry, "v1", n_items=N_ITEMS)
    build_release(tiny_models, registry, "v1-copy", n_items=N_ITEMS)
    (registry / "CURRENT").write_text("v1\n")
    start_experiment(str(registry), ExperimentConfig(treatment="v1-copy"), "test", "A/A")
    report, implied = run_experiment(tmp_path, registry, users=250, sessions=5)
    low, high = report["uplift"]["ctr"]["ci95"]
    assert low < 0 < high and low <= implied <= high
    assert report["decision"] == "keep"
