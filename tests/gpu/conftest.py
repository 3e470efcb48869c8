"""The tiny model, built once for the whole gpu tier."""

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from kubetune_trainer.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny")
