"""Operations: metric definitions, KubeRay rendering, size estimates.

Used by the ingress and the replicas (metrics, sizes) and by the CLI (`k8s render`); imports
nothing from them.
"""

__all__: list[str] = []
