"""Stage 2: fine-tune SigLIP on image-title pairs (sigmoid loss, DDP), with the loader and the
device/memory planning done before the first step.

`trainer` runs it; `checkpoints` (atomic, resumable), `encoder` (the towers, schedule,
validation recall), `distributed` (processes, DDP hook), `resources` (device, memory and
loader plan) and `data` (pairs, batches) are its parts.
"""
