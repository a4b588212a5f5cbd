"""Preset names -> local folders with the official weights, through the Hugging Face cache."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .config import HUB_REPOS
from .errors import InvalidArgumentError, WeightsNotFoundError

log = logging.getLogger(__name__)

# Only what loading reads; the repos also hold a duplicate pytorch_model.bin we never need.
_PATTERNS = ["config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_preset(name: str) -> Path:
    """Return the cached (or freshly downloaded) snapshot folder of a preset's Hub repo.

    The cache is tried first without touching the network; a download is attempted only when the
    preset is not cached and `HF_HUB_OFFLINE` is not set.
    """
    if name not in HUB_REPOS:
        raise InvalidArgumentError(f"unknown preset {name!r}; expected one of {', '.join(HUB_REPOS)}")
    return resolve_repo(HUB_REPOS[name])


def resolve_repo(repo: str) -> Path:
    """`resolve_preset` by the repo id itself (`facebook/dinov2-small`), as library manifests record it.
    Only the presets' repos: anything else on the Hub is not a DINOv2 checkpoint we know how to read."""
    if repo not in HUB_REPOS.values():
        raise InvalidArgumentError(f"unknown Hub repo {repo!r}; expected one of {', '.join(HUB_REPOS.values())}")
    from huggingface_hub import snapshot_download

    try:
        return _complete(Path(snapshot_download(repo, allow_patterns=_PATTERNS, local_files_only=True)), repo)
    except WeightsNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - every cache miss is reported the same way
        cache_miss = e
    if _offline():
        raise WeightsNotFoundError(f"{repo} is not in the Hugging Face cache and HF_HUB_OFFLINE is set") from cache_miss
    log.info("downloading %s from the Hugging Face Hub", repo)
    try:
        return _complete(Path(snapshot_download(repo, allow_patterns=_PATTERNS)), repo)
    except Exception as e:  # noqa: BLE001 - network, auth and hub errors all end the same way
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsNotFoundError(f"cannot download {repo} ({reason})") from e


def _complete(folder: Path, repo: str) -> Path:
    if not (folder / "model.safetensors").exists() and not (folder / "model.safetensors.index.json").exists():
        raise WeightsNotFoundError(f"cached snapshot of {repo} at {folder} has no model.safetensors")
    return folder
