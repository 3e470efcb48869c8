"""kubetune: a Kubernetes-native fine-tuning operator.

This package holds the API (`kubetune.api`, shared with the trainer), the CLI and the
operator. Importing it pulls in neither kopf nor torch: those are imported by the subcommands
that need them, so the trainer image needs no kopf and the operator image no torch.
"""

__version__ = "0.1.0"
