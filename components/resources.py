"""Machine settings of a pipeline task on Vertex AI (kfp.local ignores them)."""

from kfp import dsl


def set_resources(task: dsl.PipelineTask, cpu: str, memory: str, accelerator: str = "", accelerator_count: int = 1,
                  retries: int = 0) -> dsl.PipelineTask:
    """CPU/memory limits, optional GPUs, and retries with exponential backoff from 60 s (so a
    preempted spot machine or a failed Dataflow launch is retried rather than failing the run)."""
    task.set_cpu_limit(cpu).set_memory_limit(memory)
    if accelerator:
        task.set_accelerator_type(accelerator).set_accelerator_limit(accelerator_count)
    if retries:
        task.set_retry(num_retries=retries, backoff_duration="60s", backoff_factor=2.0)
    return task
