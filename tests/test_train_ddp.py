"""Distributed training: 2 CPU processes (gloo) launched by torchrun, as a multi-GPU job would be.

Checks that the gathered-negatives loss and its gradients equal the single-process
loss on the same global batch, and that a few DDP training steps leave both
processes with identical weights, equal to a single-process run's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import _config, _weights, shape_model, small_data  # noqa: F401  (shared fixtures)
from visrec.stages.train.trainer import train

WORKER = r'''
import json, math, sys
import torch, torch.distributed as dist, torch.nn.functional as F
torch.set_num_threads(1)
from visrec.model.siglip_loss import distributed_sigmoid_loss, sigmoid_loss
from visrec.stages.configs import TrainConfig
from visrec.stages.train.distributed import bf16_allreduce_hook, setup_processes
from visrec.stages.train.trainer import SiglipTrainer

args = json.loads(sys.argv[1])
report_dir = args.pop("report_dir")
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()

# 1. One global batch of 8 pairs; each process embeds its 4 with a shared projection.
torch.manual_seed(0)
proj = torch.nn.Linear(6, 5)
scale = torch.nn.Parameter(torch.tensor([math.log(10.0)]))
bias = torch.nn.Parameter(torch.tensor([-10.0]))
params = [proj.weight, proj.bias, scale, bias]
images, texts = torch.randn(8, 6), torch.randn(8, 6)
emb = lambda x: F.normalize(proj(x), dim=-1)
mine = slice(rank * 4, rank * 4 + 4)

def ddp_grads(loss_fn):
    """Loss averaged over processes and gradients averaged as DDP does."""
    for p in params:
        p.grad = None
    loss = loss_fn(emb(images[mine]), emb(texts[mine]), scale, bias)
    loss.backward()
    grads = [p.grad.clone() for p in params]
    for g in grads:
        dist.all_reduce(g)
        g /= world
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return float(mean) / world, grads

loss, grads = ddp_grads(distributed_sigmoid_loss)
_, local_only = ddp_grads(sigmoid_loss)  # negatives from the own shard only: what must NOT happen
for p in params:
    p.grad = None
ref = sigmoid_loss(emb(images), emb(texts), scale, bias)
ref.backward()
diff = lambda gs: max(float((g - p.grad).abs().max()) for g, p in zip(gs, params))
report = {"loss": loss, "ref_loss": float(ref), "grad_diff": diff(grads), "local_only_grad_diff": diff(local_only)}

# 2. The bf16 all-reduce hook: DDP's mean gradient, to bf16 precision (and not exactly: it compressed).
torch.manual_seed(1)
plain, hooked = torch.nn.Linear(6, 5), torch.nn.Linear(6, 5)
hooked.load_state_dict(plain.state_dict())
ddp_plain, ddp_hooked = (torch.nn.parallel.DistributedDataParallel(m) for m in (plain, hooked))
ddp_hooked.register_comm_hook(None, bf16_allreduce_hook)
x = torch.randn(4, 6) * (rank + 1)
for m in (ddp_plain, ddp_hooked):
    m(x).pow(2).sum().backward()
# Relative to the largest gradient: where the ranks' gradients cancel, any rounding is large relative to the sum.
report["bf16_rel_err"] = float((hooked.weight.grad - plain.weight.grad).abs().max() / plain.weight.grad.abs().max())
report["bf16_exact"] = torch.equal(hooked.weight.grad, plain.weight.grad)

# 3. A few training steps under DDP, then the same with the scaling options.
trainer = SiglipTrainer(TrainConfig(**args), setup_processes("cpu"))
metrics = trainer.run()
torch.save(trainer.model.state_dict(), f"{report_dir}/rank{rank}.pt")
report.update(world_size=metrics.world_size, step_loss=metrics.step_loss)
options = SiglipTrainer(TrainConfig(**dict(args, out_dir=args["out_dir"] + "-options", freeze_token_embedding=True,
                                           gradient_compression="bf16")), setup_processes("cpu"))
report["options_step_loss"] = options.run().step_loss
torch.save(options.model.state_dict(), f"{report_dir}/options-rank{rank}.pt")
with open(f"{report_dir}/rank{rank}.json", "w") as fh:
    json.dump(report, fh)
dist.destroy_process_group()
'''


@pytest.fixture(scope="module")
def ddp_run(small_data, shape_model, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("ddp")
    script = root / "worker.py"
    script.write_text(WORKER)
    cfg = _config(small_data, root / "out", shape_model, epochs=1, max_steps=4, checkpoint_every_steps=0)
    args = dict(vars(cfg), report_dir=str(root))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), json.dumps(args)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]
    states = [torch.load(root / f"{kind}rank{r}.pt") for kind in ("", "options-") for r in range(2)]
    return cfg, reports, states, root


def test_gathered_negatives_loss_equals_single_process_loss(ddp_run):
    _, reports, _, _ = ddp_run
    for r in reports:
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6)
        assert r["grad_diff"] < 1e-6
        # Per-device negatives give different gradients: the check above can tell them apart.
        assert r["local_only_grad_diff"] > 1e-3


def test_ddp_ranks_end_identical_and_match_one_process(ddp_run, tmp_path):
    cfg, reports, states, root = ddp_run
    assert [r["world_size"] for r in reports] == [2, 2]
    assert len(reports[0]["step_loss"]) == 4 and reports[0]["step_loss"] == reports[1]["step_loss"]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
        assert torch.equal(states[2][key], states[3][key]), key
    # The same global batches on one process: the same training, up to float summation order.
    single = train(_config(Path(cfg.data_uri), tmp_path / "single", cfg.model_uri, epochs=1, max_steps=4,
                           checkpoint_every_steps=0))
    assert single.step_loss == pytest.approx(reports[0]["step_loss"], rel=1e-4)
    ddp_weights, one_weights = _weights(root / "out" / "last"), _weights(tmp_path / "single" / "last")
    # Attention key biases get an exactly-zero gradient in exact arithmetic (softmax ignores a shift
    # shared by all keys); Adam turns the round-off there into full-size steps, so they are skipped.
    zero_grad = ("k_proj.bias", "in_proj_bias")
    compared = [key for key in one_weights if not key.endswith(zero_grad)]
    assert len(compared) > 0.9 * len(one_weights)
    for key in compared:
        torch.testing.assert_close(ddp_weights[key], one_weights[key], rtol=0, atol=1e-5, msg=key)


def test_bf16_gradient_compression_all_reduces_the_mean_in_bf16(ddp_run):
    _, reports, _, _ = ddp_run
    for r in reports:
        assert r["bf16_rel_err"] < 2 ** -7 and not r["bf16_exact"]


def test_freezing_the_token_embedding_keeps_it_and_trains_the_rest(ddp_run):
    cfg, reports, states, _ = ddp_run
    initial = _weights(Path(cfg.model_uri))
    options = states[2]
    key = "text_model.embeddings.token_embedding.weight"
    assert torch.equal(options[key], initial[key])
    assert not torch.equal(states[0][key], initial[key])  # unfrozen, it moves
    assert not torch.equal(options["vision_model.post_layernorm.weight"], initial["vision_model.post_layernorm.weight"])
    # Compressed gradients, frozen vocabulary: a close but different training.
    assert reports[0]["options_step_loss"] == pytest.approx(reports[0]["step_loss"], rel=0.05)
