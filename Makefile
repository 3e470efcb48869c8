# kubetune — the two commands are `make demo` and `make test`; both set themselves up.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV    := .venv
PYTHON  := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
TINY_MODEL := .cache/models/tiny-llama

.PHONY: help setup lint test test-unit test-trainer demo demo-local crds k8s-binaries cluster-up cluster-down clean

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

setup: ## this clone's .venv from requirements/lock.txt (uv, seconds when cached) and the tiny model
	@bash scripts/setup-venv.sh
	@test -f $(TINY_MODEL)/model.safetensors || $(PYTHON) -m kubetune tiny-model $(TINY_MODEL)

lint: setup ## ruff (check + format), mypy (strict: the core and the operator's pure modules), CRD drift
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .
	@$(VENV)/bin/mypy
	@$(PYTHON) -m kubetune crds --check crds && $(PYTHON) -m kubetune crds --check helm/kubetune/crds
	@echo "lint: clean"

test: setup ## the whole suite: unit, trainer, cluster (builds Kubernetes once), e2e, gpu
	@bash scripts/run-tests.sh

test-unit: setup ## only the unit tier (seconds)
	@$(PYTHON) -m pytest -m unit tests

test-trainer: setup ## only the trainer tier
	@$(PYTHON) -m pytest -m trainer tests

demo: setup ## on kind: cluster up, chart installed, a FineTuneJob trains, an AdapterDeployment answers
	@bash scripts/demo.sh

demo-local: setup ## no cluster: fine-tune the tiny model from a FineTuneJob manifest here, ask the adapter
	@bash scripts/demo-local.sh

crds: setup ## regenerate crds/ and the chart's copy from the API models
	@$(PYTHON) -m kubetune crds --write crds
	@$(PYTHON) -m kubetune crds --write helm/kubetune/crds

k8s-binaries: ## build etcd, kube-apiserver, ..., kwok, helm, kind from the Go module proxy (cached)
	@bash scripts/k8s-build.sh

cluster-up: k8s-binaries ## start a local control plane with kwok GPU nodes; kubeconfig at .cache/cluster/kubeconfig
	@python3 tests/cluster/harness.py up

cluster-down: ## stop it
	@python3 tests/cluster/harness.py down

clean: ## remove this clone's .venv and caches (uv's download cache in ~/.cache/kubetune stays)
	rm -rf .cache .pytest_cache $(VENV)

.PHONY: images test-e2e kind-up kind-down kind-status

images: setup ## container images: Docker engine, debootstrapped base, trainer and operator (offline wheelhouse)
	@bash scripts/images.sh

test-e2e: images ## the e2e tier: kubetune's images as containers, and the scenario on kind (tests/e2e)
	@bash scripts/kind.sh up
	@KUBETUNE_E2E_KUBECONFIG=.cache/kind/kubeconfig $(PYTHON) -m pytest -m e2e tests/e2e

kind-up: setup ## a kind cluster (kind-config.yaml) with kubetune's images and chart; KUBECONFIG=.cache/kind/kubeconfig
	@bash scripts/kind.sh up

kind-down: ## delete the kind cluster (images and caches stay)
	@bash scripts/kind.sh down

kind-status: ## is the kind cluster up and healthy, is the operator running
	@bash scripts/kind.sh status
