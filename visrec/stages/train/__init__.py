"""Stage 2: fine-tune SigLIP on image-title pairs (sigmoid loss, DDP), with the loader and the
device/memory planning done before the first step.
"""
