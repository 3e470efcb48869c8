"""The kubetune trainer: runs a FineTuneJob spec under torchrun and reports itself.

Parses its configuration with the API models of `kubetune.api` (one definition of every
field). Needs the [trainer] extra (torch, transformers, peft, ...), never kopf.
"""
