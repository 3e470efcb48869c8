"""The `kubetune` command.

Each subcommand imports what it needs when it runs: `kubetune validate` works with only the base
install, `kubetune train` needs the [trainer] extra, `kubetune operator` the [operator] extra.
"""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import get_args

import yaml

from . import __version__
from .api.finetunejob import DatasetFormat
from .api.merging import MergeMethod
from .logs import quiet_libraries
from .storage import StorageError

EXIT_USAGE = 2
# Errors that describe the input, not the program: unreadable or missing files, invalid manifests
# and configurations (pydantic's ValidationError is a ValueError), unusable URIs.
USER_ERRORS = (OSError, ValueError, yaml.YAMLError, StorageError)
# The package extra each subcommand needs beyond the core.
EXTRA_OF = {
    "train": "trainer",
    "plan": "trainer",
    "generate": "trainer",
    "eval": "trainer",
    "tiny-model": "trainer",
    "merge": "serve",
    "serve": "serve",
    "operator": "operator",
}


def cmd_crds(args: argparse.Namespace) -> int:
    from .api import crdgen

    if args.check:
        stale = crdgen.stale(Path(args.check))
        for name in stale:
            print(f"{args.check}/{name} is stale: run `kubetune crds --write {args.check}`", file=sys.stderr)
        return 1 if stale else 0
    if args.write:
        for path in crdgen.write(Path(args.write)):
            print(f"wrote {path}")
        return 0
    sys.stdout.write(crdgen.render_all())
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .api.manifest import check_file
    from .api.yamlsafe import ManifestError

    failed = 0
    for file in args.filename:
        try:
            results = check_file(Path(file), local=args.local)
        except ManifestError as error:  # not YAML, too large, too deep, an alias bomb: names the file
            print(error, file=sys.stderr)
            failed += 1
            continue
        except OSError as error:  # missing or unreadable file
            print(f"{file}: {_one_line(error)}", file=sys.stderr)
            failed += 1
            continue
        if not results:
            print(f"{file}: no objects found", file=sys.stderr)
            failed += 1
        for checked in results:
            label = f"{file}: {checked.kind}/{checked.name}"
            if checked.ok:
                print(f"{label}: valid")
                continue
            failed += 1
            print(f"{label}: invalid", file=sys.stderr)
            for problem in checked.problems:
                print(f"  {problem}", file=sys.stderr)
    return EXIT_USAGE if failed else 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from kubetune_trainer.tiny_model import TinyModelConfig, build_tiny_model

    out = build_tiny_model(Path(args.out), TinyModelConfig(arch=args.arch, seed=args.seed, vocab_size=args.vocab_size))
    print(f"wrote tiny {args.arch} model to {out}")
    return 0


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def check_training_manifest(path: Path) -> None:
    """Refuse, in one line, a file that `train` and `plan` cannot take, before the trainer reads
    it: anything but exactly one valid FineTuneJob, or one trainer config (`spec` and optionally
    `runtime`, what the operator mounts). The file is read within the safe loader's limits, so an alias bomb
    or a document nested 200,000 deep is refused here, before anything expands or recurses into it."""
    from .api.manifest import load_documents, load_one

    documents = load_documents(path)
    if len(documents) == 1 and isinstance(documents[0], dict) and "kind" not in documents[0] and "spec" in documents[0]:
        return  # a trainer config: the trainer validates it
    load_one(path, "FineTuneJob", local=True)


def cmd_train(args: argparse.Namespace) -> int:
    from kubetune_trainer.launch import train_main  # first: without the extra, that is the one thing to say

    check_training_manifest(Path(args.filename))
    quiet_libraries()
    argv = ["train", "-f", args.filename, "--metrics-port", str(args.metrics_port)]  # what each torchrun worker runs
    return int(train_main(Path(args.filename), args.nproc_per_node, args.metrics_port, argv))


def cmd_plan(args: argparse.Namespace) -> int:
    from kubetune_trainer.launch import load_config
    from kubetune_trainer.plan import plan_for_config

    check_training_manifest(Path(args.filename))
    quiet_libraries()
    config = load_config(Path(args.filename))
    print(plan_for_config(config).summary())
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from kubetune_trainer.generate import answer, load_for_inference

    from .storage import local_cache, resolve_input

    quiet_libraries()
    cache = local_cache() / "inputs"
    model_dir = resolve_input(args.model, cache_dir=cache, local=True)
    adapter_dir = resolve_input(args.adapter, cache_dir=cache, local=True) if args.adapter else None
    model, tokenizer = load_for_inference(model_dir, adapter_dir)
    print(answer(model, tokenizer, args.prompt, args.max_new_tokens))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from kubetune_trainer.evaluation import evaluate_local, render_table

    from .storage import local_cache

    quiet_libraries()
    result = evaluate_local(
        model=args.model,
        adapter=args.adapter,
        data=args.data,
        data_format=args.format,
        max_examples=args.max_examples,
        max_new_tokens=args.max_new_tokens,
        reference=args.reference,
        cache_dir=local_cache() / "inputs",
    )
    print(json.dumps(result, indent=1) if args.json else render_table(result))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from kubetune_serve.merging import merge_to_folder

    from .storage import local_cache, local_input

    quiet_libraries()
    cache = local_cache() / "inputs"
    model_dir = local_input(args.model, cache, "--model")
    sources = [local_input(adapter, cache, "--adapter") for adapter in args.adapter]
    out = merge_to_folder(
        model_dir,
        sources,
        args.weight,
        args.method,
        args.density,
        Path(args.out),
        labels=[f"--adapter {adapter}" for adapter in args.adapter],
    )
    print(f"wrote the {args.method} merge of {len(sources)} adapters to {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from kubetune_serve.server import run

    return int(run(args))


def cmd_operator(args: argparse.Namespace) -> int:
    from kubetune_operator.main import Options, run_operator

    options = Options(
        namespaces=tuple(args.namespace or ()),
        liveness=args.liveness,
        metrics_port=args.metrics_port,
        allow_metrics_url_annotation=args.allow_metrics_url_annotation,
        verbose=args.verbose,
        debug=args.debug,
        leader_elect=args.leader_elect,
        leader_elect_lease=args.leader_elect_lease,
        leader_elect_namespace=args.leader_elect_namespace,
        leader_elect_lease_duration=args.leader_elect_lease_duration,
        leader_elect_renew_deadline=args.leader_elect_renew_deadline,
        leader_elect_retry_period=args.leader_elect_retry_period,
    )
    return int(run_operator(options))


def cmd_upload(args: argparse.Namespace) -> int:
    from .upload import Options, upload

    options = Options(
        src=Path(args.src),
        uri=args.target,
        namespace=args.namespace,
        size=args.size,
        storage_class=args.storage_class,
        image=args.image,
        kubeconfig=args.kubeconfig,
        context=args.context,
        timeout=args.timeout,
    )
    print(upload(options).summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune",
        description=(
            "Kubernetes-native fine-tuning: validate manifests, train locally, serve adapters, run the operator."
        ),
    )
    parser.add_argument("--version", action="version", version=f"kubetune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    crds = sub.add_parser("crds", help="print the CustomResourceDefinitions generated from the API models")
    crds.add_argument("--write", metavar="DIR", help="write one file per CRD into DIR instead of printing")
    crds.add_argument("--check", metavar="DIR", help="exit 1 if the CRDs in DIR differ from the models")
    crds.set_defaults(func=cmd_crds)

    validate = sub.add_parser(
        "validate",
        help="validate manifests offline (schema, CEL rules, semantic checks)",
        description=(
            "Validate FineTuneJob and AdapterDeployment manifests without a cluster. Exit 2 when any is invalid."
        ),
    )
    validate.add_argument("-f", "--filename", action="append", required=True, help="manifest file (repeatable)")
    validate.add_argument("--local", action="store_true", help="allow file:// URIs, as `kubetune train` does")
    validate.set_defaults(func=cmd_validate)

    tiny = sub.add_parser(
        "tiny-model",
        help="write a tiny random Llama-style model + tokenizer (trains on CPU in seconds)",
        description="Build a small causal LM with a byte-level BPE tokenizer trained offline on bundled text, "
        "saved as an ordinary Hugging Face folder. Deterministic for a given seed.",
    )
    tiny.add_argument("out", help="output folder")
    tiny.add_argument("--arch", default="llama", choices=["llama"], help="architecture (default llama)")
    tiny.add_argument("--seed", type=int, default=0, help="seed for weights and tokenizer (default 0)")
    tiny.add_argument("--vocab-size", type=int, default=1024, help="tokenizer vocabulary size (default 1024)")
    tiny.set_defaults(func=cmd_tiny_model)

    train = sub.add_parser(
        "train",
        help="run a FineTuneJob manifest (or the operator's trainer config) on this machine",
        description="Train as the pods do: resumes from the newest checkpoint in the output, writes the adapter and "
        "report.json atomically. With --nproc-per-node N, runs N processes under torchrun.",
    )
    train.add_argument("-f", "--filename", required=True, help="FineTuneJob manifest or trainer config")
    train.add_argument(
        "--nproc-per-node", type=int, help="processes on this machine, under torchrun (default: $NPROC_PER_NODE or 1)"
    )
    train.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port (0: off)")
    train.set_defaults(func=cmd_train)

    plan = sub.add_parser("plan", help="print the memory and parallelism plan of a FineTuneJob")
    plan.add_argument("-f", "--filename", required=True, help="FineTuneJob manifest")
    plan.set_defaults(func=cmd_plan)

    generate = sub.add_parser("generate", help="answer a prompt with a base model and an adapter (greedy)")
    generate.add_argument("--model", required=True, help="base model URI (file://, pvc://, hf://, s3://)")
    generate.add_argument("--adapter", help="adapter URI (a FineTuneJob's output/adapter)")
    generate.add_argument("--max-new-tokens", type=int, default=64, help="default 64")
    generate.add_argument("prompt", help="the user message")
    generate.set_defaults(func=cmd_generate)

    evaluate = sub.add_parser(
        "eval",
        help="compare a base model with an adapter: task metrics on held-out data, perplexity (forgetting)",
        description="What a FineTuneJob measures after training, on this machine: greedy answers of the base "
        "model and of the tuned one (base + --adapter, or a fine-tuned model folder) to the first rows of --data, "
        "scored with exact match, token F1 and ROUGE-L (preference data: preference accuracy and reward margin), "
        "and the perplexity of both on a reference text (the forgetting ratio, tuned / base).",
    )
    evaluate.add_argument("--model", required=True, help="base model URI (file://, pvc://, hf://, s3://) or path")
    evaluate.add_argument("--adapter", help="adapter (a job's output/adapter) or fine-tuned model, URI or path")
    evaluate.add_argument("--data", metavar="FILE", help="held-out examples (.jsonl, .json, .csv, .parquet)")
    evaluate.add_argument(
        "--format",
        default="chat",
        choices=list(get_args(DatasetFormat)),
        help="format of --data, as a FineTuneJob's dataset.format (default chat)",
    )
    evaluate.add_argument(
        "--max-examples", type=int, default=32, help="rows of --data scored, the first N (default 32)"
    )
    evaluate.add_argument("--max-new-tokens", type=int, default=64, help="tokens per answer, at most (default 64)")
    evaluate.add_argument(
        "--reference", metavar="FILE", help="plain text for perplexity (default: the general-English text shipped)"
    )
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON (status.evaluation's shape)")
    evaluate.set_defaults(func=cmd_eval)

    merge = sub.add_parser(
        "merge",
        help="merge LoRA adapters of one base model into one adapter (linear, cat, ties, dare_linear, dare_ties)",
        description="Combine adapters trained on different tasks into one, with PEFT's add_weighted_adapter, on "
        "the CPU. cat puts the adapters' factors side by side: the exact weighted sum of their updates, of rank "
        "the sum of theirs. linear sums their factors (same rank; exact only for adapters trained from the same "
        "initialisation, i.e. the same seed). ties and dare_ties keep each adapter's --density share of entries "
        "and resolve sign conflicts; dare_linear and dare_ties drop a random share (seeded, reproducible). The "
        "output is an ordinary adapter folder, for `kubetune generate --adapter`, `kubetune serve` or PEFT.",
    )
    merge.add_argument("--model", required=True, help="the adapters' base model: URI (file://, pvc://, hf://) or path")
    merge.add_argument(
        "--adapter", action="append", required=True, help="source adapter folder, URI or path (repeat: 2 or more)"
    )
    merge.add_argument(
        "--weight",
        action="append",
        type=float,
        help="one per --adapter, in order. Default: 1.0 each for cat, ties and dare_ties (each adapter at full "
        "strength), 1/N each for linear and dare_linear (their summed A factors already count each adapter N "
        "times when the adapters share their initialisation)",
    )
    merge.add_argument("--method", required=True, choices=list(get_args(MergeMethod)), help="how to combine")
    merge.add_argument(
        "--density", type=float, help="ties, dare_linear, dare_ties: share of each adapter's entries kept, in (0, 1]"
    )
    merge.add_argument("-o", "--out", required=True, help="folder for the merged adapter (replaced whole)")
    merge.set_defaults(func=cmd_merge)

    serve = sub.add_parser(
        "serve",
        help="serve a base model with hot-swappable LoRA adapters (OpenAI-compatible)",
        description="The builtin runtime of AdapterDeployment: OpenAI /v1/completions, /v1/chat/completions and "
        "/v1/models; vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter; /health (ready), /live and /metrics. "
        "Requests pick the base model or an adapter with the `model` field. Loading adapters over HTTP needs "
        "--admin-key-file (or --api-key) and --allow-source.",
    )
    serve.add_argument("--model", required=True, help="base model URI (hf://, pvc://, s3://, file://) or a path")
    serve.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=URI",
        help="adapter to load at startup (repeatable; the process exits if one fails); /health waits for every one",
    )
    serve.add_argument(
        "--adapters-file",
        metavar="PATH",
        help='JSON {"adapters": [{"name", "path"}]} to load before /health turns 200 and to re-read '
        "when it changes (an AdapterDeployment's ConfigMap); an adapter in it that fails is reported, "
        "not fatal",
    )
    serve.add_argument(
        "--adapters-file-interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how often the adapters file is checked for changes (default 2)",
    )
    serve.add_argument(
        "--served-model-name",
        help="the base model's name in `model` (default: ORG/NAME for hf://ORG/NAME, else --model as written)",
    )
    serve.add_argument("--host", default="0.0.0.0", help="default 0.0.0.0")
    serve.add_argument("--port", type=int, default=8000, help="default 8000")
    serve.add_argument("--max-adapters", type=int, default=8, help="adapters resident at once (default 8)")
    serve.add_argument("--max-lora-rank", type=int, default=64, help="largest adapter rank accepted (default 64)")
    serve.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda or cuda:N")
    serve.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on GPU (float16 where unsupported), float32 on CPU",
    )
    serve.add_argument(
        "--cache-dir",
        help="where s3:// and https:// inputs are downloaded "
        "(default $KUBETUNE_CACHE/inputs or ~/.cache/kubetune/inputs)",
    )
    access = serve.add_argument_group(
        "access",
        "Clients send OpenAI's `Authorization: Bearer KEY`. /health, /ready, /live and /metrics stay open. "
        "Key files are re-read when they change (a mounted Secret is updated in place).",
    )
    access.add_argument(
        "--admin-key-file",
        metavar="PATH",
        default=os.environ.get("KUBETUNE_SERVE_ADMIN_KEY_FILE") or None,
        help="file holding the key required by /v1/load_lora_adapter and /v1/unload_lora_adapter "
        "(env KUBETUNE_SERVE_ADMIN_KEY_FILE)",
    )
    access.add_argument(
        "--api-key-file",
        metavar="PATH",
        default=os.environ.get("KUBETUNE_SERVE_API_KEY_FILE") or None,
        help="file holding the key required by inference and /v1/models, also accepted by the admin endpoints "
        "(env KUBETUNE_SERVE_API_KEY_FILE); without it and --api-key, inference is open",
    )
    access.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get("KUBETUNE_SERVE_API_KEY") or None,
        help="the api key itself, for local use (env KUBETUNE_SERVE_API_KEY; --api-key-file wins)",
    )
    access.add_argument(
        "--allow-unauthenticated-admin",
        action="store_true",
        help="with no key at all, let anyone load and unload adapters (a laptop only; otherwise they answer 403)",
    )
    access.add_argument(
        "--allow-source",
        action="append",
        metavar="PREFIX",
        default=[os.environ.get("KUBETUNE_SERVE_ALLOWED_SOURCES", "")],
        help="URI prefix runtime loads may read from, e.g. pvc://adapters/team-a/ or s3://bucket/adapters/ "
        "(repeatable; env KUBETUNE_SERVE_ALLOWED_SOURCES, comma- or newline-separated; a prefix allows "
        "itself and what lies below it after a '/'). None: every runtime load is refused. --adapter and "
        "--adapters-file are not restricted by it",
    )
    limits = serve.add_argument_group("limits", "Bounds on what one client can ask of the server.")
    limits.add_argument(
        "--max-adapter-bytes",
        type=int,
        default=2 * 1024**3,
        metavar="BYTES",
        help="largest adapter read or downloaded, all files together (default 2 GiB)",
    )
    limits.add_argument(
        "--max-concurrent-loads",
        type=int,
        default=2,
        metavar="N",
        help="runtime loads running at once; one more is answered 429 (default 2)",
    )
    limits.add_argument(
        "--load-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="a runtime load taking longer is abandoned and answered 504 (default 300)",
    )
    limits.add_argument(
        "--max-request-bytes",
        type=int,
        default=1024 * 1024,
        metavar="BYTES",
        help="largest request body; larger is answered 413 (default 1 MiB)",
    )
    limits.add_argument(
        "--max-sequences-per-request",
        type=int,
        default=16,
        metavar="N",
        help="prompts x n of one request; more is answered 400 (default 16)",
    )
    limits.add_argument(
        "--max-queued-requests",
        type=int,
        default=64,
        metavar="N",
        help="generation requests waiting for the model; one more is answered 429 with Retry-After (default 64)",
    )
    limits.add_argument(
        "--max-num-seqs",
        type=int,
        default=32,
        metavar="N",
        help="requests generated together in one batch (continuous batching; as vLLM's flag) (default 32)",
    )
    limits.add_argument(
        "--stall-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="/health answers 503 when generation makes no progress for this long (default 120)",
    )
    serve.set_defaults(func=cmd_serve)

    upload = sub.add_parser(
        "upload",
        help="copy a local file or directory onto a PersistentVolumeClaim (pvc://CLAIM/PATH), with kubectl",
        description="Copy SRC onto the claim through a short-lived pod that mounts it, creating the claim when "
        "missing. A directory's contents become PATH, replacing what was there (at the claim's root, each file "
        "replaces its namesake); a file is written as PATH. Every file's sha256 is checked before the new content "
        "is renamed into place, and the pod is deleted afterwards. Uses the kubectl on PATH.",
    )
    upload.add_argument("src", metavar="SRC", help="local file or directory")
    upload.add_argument(
        "target", metavar="pvc://CLAIM/PATH", help="the claim, and the path in it (relative to its root)"
    )
    upload.add_argument("-n", "--namespace", help="namespace of the claim (default: the kubeconfig context's)")
    upload.add_argument("--size", default="2Gi", help="size of the claim when it is created (default 2Gi)")
    upload.add_argument(
        "--storage-class", metavar="NAME", help="StorageClass of the claim when it is created (default: the cluster's)"
    )
    upload.add_argument(
        "--image",
        help="image of the upload pod: runs as uid 1000, with sh, tar, sleep and sha256sum "
        "(default: $KUBETUNE_UPLOAD_IMAGE, else the kubetune operator image of this version)",
    )
    upload.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig file (default: kubectl's, $KUBECONFIG)")
    upload.add_argument("--context", metavar="NAME", help="kubeconfig context (default: the current one)")
    upload.add_argument(
        "--timeout",
        type=int,
        default=300,
        metavar="SECONDS",
        help="how long the pod may take to start, and how long it lives: raise it for large uploads (default 300)",
    )
    upload.set_defaults(func=cmd_upload)

    operator = sub.add_parser(
        "operator",
        help="run the operator against the current kubeconfig (or in-cluster service account)",
        description="Reconcile FineTuneJobs: admission, the Job that trains, status from the Job, its pods and "
        "rank 0's metrics. Watches every namespace unless --namespace or the configuration's namespaces say otherwise.",
    )
    operator.add_argument("-n", "--namespace", action="append", help="namespace to watch (repeatable; default: all)")
    operator.add_argument("--liveness", metavar="URL", help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    operator.add_argument("--metrics-port", type=int, default=8000, help="operator Prometheus metrics port (0: off)")
    operator.add_argument(
        "--allow-metrics-url-annotation",
        action="store_true",
        help=(
            "testing/debugging: scrape the URL in a FineTuneJob's kubetune.io/metrics-url annotation instead of rank 0"
        ),
    )
    operator.add_argument("-v", "--verbose", action="store_true", help="log more")
    operator.add_argument("--debug", action="store_true", help="log everything kopf does")
    election = operator.add_argument_group(
        "leader election",
        "Run several replicas, one reconciling: each holds off until it holds a coordination.k8s.io Lease "
        "(client-go's rules and defaults); a leader that cannot renew in time exits with code 3.",
    )
    election.add_argument(
        "--leader-elect", action="store_true", help="elect a leader with a Lease before reconciling (replicas > 1)"
    )
    election.add_argument(
        "--leader-elect-lease", default="kubetune-operator", metavar="NAME", help="the Lease (default: %(default)s)"
    )
    election.add_argument(
        "--leader-elect-namespace",
        metavar="NS",
        help="the Lease's namespace (default: $KUBETUNE_OPERATOR_NAMESPACE, else default)",
    )
    election.add_argument(
        "--leader-elect-lease-duration",
        type=int,
        default=15,
        metavar="SECONDS",
        help="how long a standby waits on a Lease that is not renewed before taking it (default 15)",
    )
    election.add_argument(
        "--leader-elect-renew-deadline",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long the leader keeps reconciling without a renewal before it exits (default 10)",
    )
    election.add_argument(
        "--leader-elect-retry-period",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how often candidates try to take, and the leader to renew, the Lease (default 2)",
    )
    operator.set_defaults(func=cmd_operator)

    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. A user's mistake is one message on stderr and exit code 2, never a
    traceback; KUBETUNE_DEBUG=1 shows the traceback anyway."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except USER_ERRORS as error:
        if os.environ.get("KUBETUNE_DEBUG"):
            raise
        print(f"kubetune {args.command}: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as error:  # the subcommand's extra is not installed
        extra = EXTRA_OF.get(args.command)
        if extra is None or os.environ.get("KUBETUNE_DEBUG"):
            raise
        print(
            f"kubetune {args.command}: needs the [{extra}] extra ({error}): pip install 'kubetune[{extra}]'",
            file=sys.stderr,
        )
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
