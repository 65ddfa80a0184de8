"""Small control-flow components around the evaluation gate.

`gate_decision` exists so the pipeline can branch on a component with ONE plain-string
output (kfp.local silently skips a `dsl.If` on a named output of a multi-output
component, and `evaluate` also emits artifacts).
"""

from kfp import dsl
from kfp.dsl import Artifact, Input

from components.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def gate_decision(evaluation: Input[Artifact]) -> str:
    """The gate's decision from the evaluation's metrics.json: `deploy` or `reject` (anything else fails)."""
    from components.artifacts import location
    from visrec.stages.evaluate.gate import gate_decision_of

    return gate_decision_of(location(evaluation))


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def resolve_champion(registry: str) -> str:
    """URI of the production release's own item embeddings, or '' when nothing is in production yet."""
    from visrec.stages.release.registry import champion_embeddings_uri

    return champion_embeddings_uri(registry) or ""


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def record_rejection(evaluation: Input[Artifact], registry: str) -> str:
    """Append the rejected candidate's gate result to the registry's rejection log; returns its path."""
    from components.artifacts import location
    from visrec.stages.evaluate.gate import record_rejection as record

    return record(registry, location(evaluation))
