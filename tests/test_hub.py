"""Preset names resolve through the Hugging Face cache; offline without a copy is one clear error."""

from __future__ import annotations

import shutil

import huggingface_hub.constants
import pytest
import torch

from dinoseek.model import hub
from dinoseek.model import WeightsNotFoundError, load_vit


def fake_hub_cache(cache, repo: str, snapshot_source) -> None:
    """Lay out `cache` the way huggingface_hub does: refs/main -> snapshots/<commit>/files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(snapshot_source, root / "snapshots" / commit)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_preset_loads_from_offline_cache(hub_cache, tiny_folder):
    fake_hub_cache(hub_cache, "facebook/dinov2-small", tiny_folder)
    vit = load_vit("small")
    assert vit.config.embed_dim == 128  # the cached (tiny) weights, not a preset default
    direct = load_vit(tiny_folder)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(vit(x), direct(x))


def test_offline_without_cache_says_how_to_pass_a_file(hub_cache):
    # The library names the problem; the CLI adds how to pass a file (--weights PATH, tests/test_cli.py).
    with pytest.raises(WeightsNotFoundError, match=r"facebook/dinov2-with-registers-base .*HF_HUB_OFFLINE is set$"):
        load_vit("base-reg")


def test_download_failure_says_how_to_pass_a_file(hub_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []

    def no_network(repo_id, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        if kwargs.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(WeightsNotFoundError, match=r"cannot download facebook/dinov2-large \(Failed to resolve.*\)$"):
        load_vit("large")
    assert calls == [True, False]  # cache first, then the network


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        hub.resolve_preset("huge")
