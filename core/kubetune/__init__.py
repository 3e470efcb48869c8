"""kubetune's core: what the operator, the trainer, the serving runtime and the CLI share.

* `kubetune.api`: the API models (one definition of every field), the CRD generator, validation
  and the manifest loader;
* `kubetune.contract`: the operator↔trainer contract (trainer config, mounts, env, exit codes,
  output layout, `TrainerResult`);
* `kubetune.planning`: memory and parallelism planning;
* `kubetune.storage`: every URI scheme, resolved to local paths, and atomic outputs;
* `kubetune.logs`, `kubetune.cli`: log lines and the `kubetune` command.

The core needs only pydantic and PyYAML: importing it pulls in neither kopf, kubernetes nor torch.
The CLI imports each subcommand's package (`kubetune_operator`, `kubetune_trainer`,
`kubetune_serve`) when that subcommand runs, so each image installs only what it runs.
"""

__version__ = "0.1.0"
