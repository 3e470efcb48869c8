"""The kubetune trainer: runs a FineTuneJob spec under torchrun and reports itself.

Parses its configuration with the core's models (`kubetune.contract.TrainerConfig`, one definition
of every field) and reports a `kubetune.contract.TrainerResult`. Depends on the core only (never on
the operator or the serving runtime); needs the [trainer] extra (torch, transformers, peft, ...).
"""
