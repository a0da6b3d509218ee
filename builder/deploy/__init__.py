"""Beyond one machine: a container and Kubernetes / KServe manifests from a built repository's plan
(:mod:`.manifests`), and how many replicas a load needs, simulated from measured service curves
(:mod:`.capacity`).

>>> from builder.deploy import DeployOptions, deploy
>>> print(deploy(DeployOptions(repo=Path("generated_repo"), replicas=2)).summary())
"""
from .manifests import DeployError, DeployOptions, DeployResult, deploy

__all__ = ["DeployError", "DeployOptions", "DeployResult", "deploy"]
