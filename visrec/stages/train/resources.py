"""What a training run needs from its machine, checked before the first step.

A run that cannot work should stop in its first minute with a message saying why and
what to do, not crawl on the CPU for days or die of "CUDA out of memory" or "Bus error"
an hour in. Three checks, each a pure function of what it measured:

- `resolve_device`: a requested GPU that CUDA cannot use (a CUDA 13 wheel on an older
  driver, no GPU attached) fails at once, naming the torch build and the driver found.
- `measure_activations` + `plan_memory` + `check_memory`: the peak memory of
  (model, pairs per process, precision, world size, checkpointing), from the
  activations autograd keeps for a probe batch on the model itself, against what the
  device has; `gradient_checkpointing="auto"` turns checkpointing on only when the run
  would not fit without it (it costs about a third more compute).
- `plan_shared_memory`: loader workers hand batches over in /dev/shm (and NCCL uses it
  between GPUs); a container's default 64 MB is far too little.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Any, Callable

import torch

from visrec.core.errors import UserError
from visrec.stages.configs import CHECKPOINTING

log = logging.getLogger(__name__)

GiB = 2**30
MiB = 2**20
# Oldest NVIDIA driver each CUDA major version runs on (CUDA minor-version compatibility).
CUDA_MIN_DRIVER = {13: 580, 12: 525, 11: 450}
# Bytes per parameter of fp32 training with AdamW: weights 4; per trainable one, gradient 4
# and Adam's two moments 8; DDP's gradient buckets another 4.
WEIGHT_BYTES, GRADIENT_BYTES, ADAM_BYTES, DDP_BUCKET_BYTES = 4, 4, 8, 4
# Kept free on top of the estimate: allocator fragmentation, cuBLAS/cuDNN workspaces, the
# transient gradients of the backward pass.
MEMORY_HEADROOM = 0.15
PREFETCH_FACTOR = 2  # batches each loader worker has in flight (DataLoader's default)
NCCL_SHM_PER_PROCESS = 256 * MiB  # NCCL's shared-memory transport between GPUs of one machine (estimate)


# ---- the accelerator ----------------------------------------------------------------------------

def nvidia_driver_version() -> str | None:
    """The loaded NVIDIA kernel driver's version (e.g. "550.90.07"), or None when there is none."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            m = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+(?:\.\d+)+)", f.read())
            if m:
                return m.group(1)
    except OSError:
        pass
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    return None


def cuda_report() -> str:
    """What this process can tell about CUDA: the torch build, the driver it needs and the one found."""
    build = torch.version.cuda
    if build is None:
        wheel = f"torch {torch.__version__} is a CPU-only build (install the CUDA wheel: requirements-gpu.txt)"
    else:
        major = int(build.split(".")[0])
        need = CUDA_MIN_DRIVER.get(major)
        wheel = f"torch {torch.__version__} is built for CUDA {build}" + (
            f" (needs NVIDIA driver >= {need})" if need else "")
    driver = nvidia_driver_version()
    found = f"NVIDIA driver {driver}" if driver else "no NVIDIA driver found (/proc/driver/nvidia/version, nvidia-smi)"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = torch.cuda.device_count() if build is not None and torch.cuda.is_available() else 0
    return (f"{wheel}; {found}; {gpus} usable GPU(s)"
            + (f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""))


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """The training device: None = cuda:LOCAL_RANK when CUDA is usable, else cpu; "gpu" means "cuda".

    A request for the GPU (`--device cuda|gpu`, the pipeline's `train_device`) that CUDA
    cannot serve fails here: without the check the run falls back to fp32 on the CPU.
    """
    if device is None:
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    name = "cuda" + device[3:] if device.startswith("gpu") else device
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"--device {device!r}: {exc}; expected cpu, cuda[:N] or gpu") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise UserError(f"--device {device!r}: only cpu and cuda (gpu) are supported")
    if not torch.cuda.is_available():
        raise UserError(f"--device {device} was requested but CUDA is not usable: {cuda_report()}. "
                        "Run on a machine whose driver this build supports, or pass --device cpu.")
    index = dev.index if dev.index is not None else local_rank
    if index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: GPU {index} does not exist ({cuda_report()})")
    return torch.device("cuda", index)


# ---- activation memory ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ActivationProfile:
    """Bytes autograd keeps between forward and backward, measured on the model itself.

    Per pair, split by where they are saved: inside each transformer layer, each
    layer's input, and outside the layers (embeddings, heads, loss). A checkpointed
    layer keeps only its input and recomputes the rest during the backward pass, one
    layer at a time, so checkpointing both towers keeps `outside + sum(inputs) +
    max(layer)` per pair instead of `outside + sum(layers)`.
    """

    fixed_bytes: int  # independent of the batch (autocast's low-precision weight copies)
    outside_per_pair: float
    layer_per_pair: tuple[float, ...]
    layer_input_per_pair: tuple[float, ...]

    def per_pair(self, checkpointing: bool) -> float:
        if not self.layer_per_pair:
            return self.outside_per_pair
        if checkpointing:
            return self.outside_per_pair + sum(self.layer_input_per_pair) + max(self.layer_per_pair)
        return self.outside_per_pair + sum(self.layer_per_pair)


def checkpointable_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks `activation_checkpointing_enable` checkpoints (both towers)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _saved_bytes(forward: Callable[[int], Any], model: torch.nn.Module, pairs: int) -> tuple[float, list, list]:
    """(outside bytes, per-layer saved bytes, per-layer input bytes) of one forward of `pairs` pairs."""
    layers = checkpointable_layers(model)
    index = {id(m): i for i, m in enumerate(layers)}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    inside, inputs, outside = [0] * len(layers), [0] * len(layers), [0]
    current: list[int | None] = [None]

    def storage_once(t: torch.Tensor) -> int:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in params or key in seen or t.device.type == "meta":
            return 0
        seen.add(key)
        return storage.nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        n = storage_once(t)
        if current[0] is None:
            outside[0] += n
        else:
            inside[current[0]] += n
        return t

    def enter(module, args):
        i = index[id(module)]
        current[0] = i
        if args and isinstance(args[0], torch.Tensor):
            inputs[i] += args[0].untyped_storage().nbytes()

    def leave(module, args, output):
        current[0] = None

    handles = [h for m in layers for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward(pairs)
        del out
    finally:
        for h in handles:
            h.remove()
    return float(outside[0]), inside, inputs


def measure_activations(model: torch.nn.Module, forward: Callable[[int], Any]) -> ActivationProfile:
    """Profile what `forward(pairs)` (a training forward of `pairs` random pairs) keeps for backward.

    Two probes (2 and 4 pairs) separate the per-pair bytes from the fixed ones. The
    probe runs with checkpointing off (its layers' contents are what a checkpointed
    layer recomputes) and leaves the RNG and the model's gradients as they were.
    """
    layers = checkpointable_layers(model)
    flags = [m.gradient_checkpointing for m in layers]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        for m in layers:
            m.gradient_checkpointing = False
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            small, large = _saved_bytes(forward, model, 2), _saved_bytes(forward, model, 4)
    finally:
        for m, flag in zip(layers, flags):
            m.gradient_checkpointing = flag

    def per_pair(a: float, b: float) -> float:
        return max(0.0, (b - a) / 2)

    outside = per_pair(small[0], large[0])
    layer = tuple(per_pair(a, b) for a, b in zip(small[1], large[1]))
    layer_input = tuple(per_pair(a, b) for a, b in zip(small[2], large[2]))
    total_small = small[0] + sum(small[1])
    fixed = max(0, int(total_small - 2 * (outside + sum(layer))))
    return ActivationProfile(fixed, outside, layer, layer_input)


# ---- the memory plan ------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryPlan:
    """Peak memory of one training process: fp32 master weights, gradients, AdamW state,
    DDP buckets, the activations of its share of the contrastive batch, and the backward
    pass's largest transient (a fresh gradient of the largest parameter, added to one
    already there: the 250k x 768 token embedding's is 0.7 GiB)."""

    parameters: int
    trainable: int
    largest_trainable: int
    pairs_per_process: int
    world_size: int
    checkpointing: bool
    activation_per_pair: float
    fixed_activation_bytes: int

    @property
    def weights_bytes(self) -> int:
        return self.parameters * WEIGHT_BYTES

    @property
    def training_state_bytes(self) -> int:
        """Gradients, Adam moments and (several processes) DDP's gradient buckets."""
        per_param = GRADIENT_BYTES + ADAM_BYTES + (DDP_BUCKET_BYTES if self.world_size > 1 else 0)
        return self.trainable * per_param

    @property
    def activation_bytes(self) -> int:
        return int(self.fixed_activation_bytes + self.activation_per_pair * self.pairs_per_process)

    @property
    def transient_bytes(self) -> int:
        return self.largest_trainable * GRADIENT_BYTES

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.training_state_bytes + self.activation_bytes + self.transient_bytes

    def describe(self) -> str:
        return (f"~{self.total_bytes / GiB:.1f} GiB: weights {self.weights_bytes / GiB:.1f} GiB, gradients + AdamW"
                f"{' + DDP buckets' if self.world_size > 1 else ''} {self.training_state_bytes / GiB:.1f} GiB, "
                f"activations {self.activation_bytes / GiB:.1f} GiB ({self.pairs_per_process} pairs x "
                f"{self.activation_per_pair / MiB:.1f} MiB, checkpointing {'on' if self.checkpointing else 'off'}), "
                f"backward transient {self.transient_bytes / GiB:.1f} GiB")

    def as_dict(self) -> dict[str, Any]:
        return {"total_gib": round(self.total_bytes / GiB, 2), "weights_gib": round(self.weights_bytes / GiB, 2),
                "training_state_gib": round(self.training_state_bytes / GiB, 2),
                "activations_gib": round(self.activation_bytes / GiB, 2),
                "activation_mib_per_pair": round(self.activation_per_pair / MiB, 2),
                "transient_gib": round(self.transient_bytes / GiB, 2),
                "pairs_per_process": self.pairs_per_process, "checkpointing": self.checkpointing,
                "parameters": self.parameters, "trainable_parameters": self.trainable}


def plan_memory(profile: ActivationProfile, parameters: int, trainable: int, largest_trainable: int,
                pairs_per_process: int, world_size: int, checkpointing: bool) -> MemoryPlan:
    """The `MemoryPlan` of one process training on `pairs_per_process` pairs at a time."""
    return MemoryPlan(parameters, trainable, largest_trainable, pairs_per_process, world_size, checkpointing,
                      profile.per_pair(checkpointing), profile.fixed_bytes)


def model_sizes(model: torch.nn.Module) -> dict[str, int]:
    """`plan_memory`'s parameter counts of `model` (after any freezing)."""
    trainable = [p.numel() for p in model.parameters() if p.requires_grad]
    return {"parameters": sum(p.numel() for p in model.parameters()), "trainable": sum(trainable),
            "largest_trainable": max(trainable, default=0)}


def fits(plan: MemoryPlan, usable_bytes: int) -> bool:
    return plan.total_bytes * (1 + MEMORY_HEADROOM) <= usable_bytes


def choose_checkpointing(setting: str, profile: ActivationProfile, usable_bytes: int, **plan_args) -> MemoryPlan:
    """The plan for `setting` ("on", "off", or "auto": on only when the run does not fit without it)."""
    if setting not in CHECKPOINTING:
        raise UserError(f"--gradient-checkpointing must be one of {CHECKPOINTING}, got {setting!r}")
    without = plan_memory(profile, checkpointing=False, **plan_args)
    if setting == "off" or (setting == "auto" and fits(without, usable_bytes)):
        return without
    return plan_memory(profile, checkpointing=True, **plan_args)


def check_memory(plan: MemoryPlan, usable_bytes: int, device_name: str, profile: ActivationProfile,
                 global_pairs: int) -> None:
    """Refuse a plan that cannot fit `usable_bytes`, saying what would (checkpointing, more GPUs)."""
    if fits(plan, usable_bytes):
        return
    options = []
    sizes = {"parameters": plan.parameters, "trainable": plan.trainable,
             "largest_trainable": plan.largest_trainable}
    if not plan.checkpointing:
        with_ckpt = plan_memory(profile, **sizes, pairs_per_process=plan.pairs_per_process,
                                world_size=plan.world_size, checkpointing=True)
        options.append(f"--gradient-checkpointing on (~{with_ckpt.total_bytes / GiB:.1f} GiB)")
    for gpus in (2, 4, 8):
        if global_pairs % gpus == 0 and gpus > plan.world_size:
            more = plan_memory(profile, **sizes, pairs_per_process=global_pairs // gpus, world_size=gpus,
                               checkpointing=plan.checkpointing)
            if fits(more, usable_bytes):
                options.append(f"{gpus} GPUs of this size (train_accelerator_count={gpus}: "
                               f"~{more.total_bytes / GiB:.1f} GiB each)")
                break
    options.append("a GPU with more memory")
    raise UserError(
        f"this training run needs {plan.describe()}, plus {MEMORY_HEADROOM:.0%} headroom, but {device_name} has "
        f"{usable_bytes / GiB:.1f} GiB usable. Options: {'; '.join(options)}. A larger --grad-accum also fits, "
        "but it shrinks the set of negatives each pair is contrasted with, which changes what the sigmoid loss "
        "learns. --no-memory-check skips this check.")


def _cgroup_memory_left() -> int | None:
    """Memory this container may still allocate under its cgroup v2 limit (None: no limit)."""
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit == "max":
            return None
        return int(limit) - int(open("/sys/fs/cgroup/memory.current").read())
    except (OSError, ValueError):
        return None


def usable_memory(device: torch.device, held_bytes: int = 0, processes: int = 1) -> tuple[int, str]:
    """(bytes this process can use on `device` in all, a name for messages).

    On a GPU: its free memory plus what this process's allocator already holds. On the
    CPU: available RAM (cgroup-limited) plus `held_bytes` this process already holds,
    shared by the `processes` training on this machine.
    """
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        name = f"{device} ({torch.cuda.get_device_name(device)}, {total / GiB:.1f} GiB)"
        return free + torch.cuda.memory_reserved(device), name
    available = None
    with contextlib.suppress(OSError, ValueError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    cgroup = _cgroup_memory_left()
    if cgroup is not None:
        available = min(available, cgroup)
    return available // max(1, processes) + held_bytes, "this machine's RAM"


# ---- shared memory and loader workers ---------------------------------------------------------------

def cpus_available() -> int:
    """CPUs this process may run on (its affinity mask: a container's quota, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_num_workers(local_processes: int, cpus: int | None = None) -> int:
    """Loader workers per training process: the machine's CPUs shared out, one left to each process."""
    per_process = (cpus or cpus_available()) // max(1, local_processes)
    return max(1, min(16, per_process - 1))


def shared_memory_free(path: str = "/dev/shm") -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def nccl_shared_memory_needed(local_processes: int) -> int:
    """/dev/shm NCCL's shared-memory transport uses between the GPUs of one machine (an estimate)."""
    return NCCL_SHM_PER_PROCESS * local_processes if local_processes > 1 else 0


def disable_nccl_shared_memory_if_short(local_processes: int, free_bytes: int | None) -> bool:
    """Set NCCL_SHM_DISABLE=1 (before the process group starts) when /dev/shm cannot hold NCCL's
    buffers: NCCL then uses P2P or sockets instead of dying with "Bus error". Never overrides
    a value the user set."""
    need = nccl_shared_memory_needed(local_processes)
    if not need or free_bytes is None or free_bytes >= need or "NCCL_SHM_DISABLE" in os.environ:
        return False
    os.environ["NCCL_SHM_DISABLE"] = "1"
    log.warning("/dev/shm has %.0f MiB free, NCCL needs ~%.0f MiB for %d GPUs: NCCL_SHM_DISABLE=1 set. "
                "Give the container more shared memory (docker run --shm-size=8g; Kubernetes: an emptyDir "
                "with medium: Memory at /dev/shm).", free_bytes / MiB, need / MiB, local_processes)
    return True


@dataclass(frozen=True)
class SharedMemoryPlan:
    """How loader workers hand batches over: shared memory when it has room, else pipes."""

    free_bytes: int | None
    needed_bytes: int  # every local process's in-flight batches, plus NCCL's buffers when NCCL uses shm
    batches_in_shared_memory: bool

    def as_dict(self) -> dict[str, Any]:
        return {"free_mib": None if self.free_bytes is None else round(self.free_bytes / MiB),
                "needed_mib": round(self.needed_bytes / MiB),
                "batches_in_shared_memory": self.batches_in_shared_memory}

    def advice(self) -> str:
        return (f"/dev/shm has {(self.free_bytes or 0) / MiB:.0f} MiB free, the loader workers need "
                f"~{self.needed_bytes / MiB:.0f} MiB: batches go through the workers' pipes instead (a copy "
                "per batch, slower on fast GPUs). Give the container more shared memory (docker run "
                "--shm-size=8g; Kubernetes: an emptyDir with medium: Memory at /dev/shm), or pass fewer "
                "--num-workers.")


def plan_shared_memory(num_workers: int, batch_bytes: int, local_processes: int, nccl_bytes: int,
                       free_bytes: int | None) -> SharedMemoryPlan:
    """Whether /dev/shm holds every local process's in-flight batches next to NCCL's `nccl_bytes`.

    PyTorch's loader workers put each batch's tensors in shared memory and crash with
    "Bus error" when it is full. When it is too small, batches travel as NumPy arrays
    through the workers' pipes instead: slower, never a crash.
    """
    loader = num_workers * PREFETCH_FACTOR * batch_bytes * local_processes
    if free_bytes is None or num_workers == 0:
        return SharedMemoryPlan(free_bytes, loader + nccl_bytes, True)
    return SharedMemoryPlan(free_bytes, loader + nccl_bytes, loader + nccl_bytes <= free_bytes)
