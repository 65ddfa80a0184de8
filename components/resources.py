"""Machine settings of the pipeline's tasks on Vertex AI (kfp.local ignores them)."""

from dataclasses import dataclass

from kfp import dsl
from kfp.dsl import pipeline_channel


@dataclass(frozen=True)
class TaskResources:
    """Defaults of the pipeline's machine parameters (`train_accelerator_type`, ...).

    Training gets one L4 by default (several GPUs: DDP, one process each). The Beam tasks
    are launchers when `beam_runner` is DataflowRunner (the work runs on Dataflow workers)
    and do the work themselves on the DirectRunner; the index holds every vector in memory.
    """

    train_accelerator_type: str = "NVIDIA_L4"
    train_accelerator_count: int = 1
    train_cpu: str = "8"
    train_memory: str = "32G"
    beam_cpu: str = "4"
    beam_memory: str = "16G"
    index_cpu: str = "8"
    index_memory: str = "32G"
    evaluate_cpu: str = "4"
    evaluate_memory: str = "16G"


def set_resources(task: dsl.PipelineTask, cpu, memory, accelerator=None, accelerator_count=None,
                  retries: int = 0) -> dsl.PipelineTask:
    """CPU/memory limits (strings or pipeline parameters), optional GPUs, and retries with
    exponential backoff from 60 s, so a failed Dataflow launch or a lost machine is retried
    rather than failing the run (training resumes from its newest checkpoint)."""
    task.set_cpu_limit(cpu).set_memory_limit(memory)
    if accelerator is not None:
        task.set_accelerator_type(accelerator).set_accelerator_limit(accelerator_count)
    # kfp 2.17 passes a resource parameter into the task but not into the sub-DAG (exit handler,
    # branch) around it unless the task registers it as an input.
    task.register_pipeline_channels([value for value in (cpu, memory, accelerator, accelerator_count)
                                     if isinstance(value, pipeline_channel.PipelineChannel)])
    if retries:
        task.set_retry(num_retries=retries, backoff_duration="60s", backoff_factor=2.0)
    return task
