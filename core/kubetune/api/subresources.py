"""The `scale` subresource of a kind, declared on its model and written into its CRD by crdgen.

With it, `kubectl scale` and a HorizontalPodAutoscaler read and write the kind's replica count
through `/scale` the same way they do a Deployment's: the API server maps `specReplicasPath`,
`statusReplicasPath` and `labelSelectorPath` between the object and an autoscaling/v1 Scale.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class ScaleSubresource:
    """JSON paths (`.spec.replicas`) into the kind's own fields; a unit test checks that each names a
    field of the model, so the CRD cannot point at a field that was renamed."""

    spec_replicas_path: str
    status_replicas_path: str
    label_selector_path: str | None = None

    def to_crd(self) -> dict[str, str]:
        out = {"specReplicasPath": self.spec_replicas_path, "statusReplicasPath": self.status_replicas_path}
        if self.label_selector_path:
            out["labelSelectorPath"] = self.label_selector_path
        return out
