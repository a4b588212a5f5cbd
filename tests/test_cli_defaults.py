"""CLI defaults: --device auto, and the library found from the current folder upwards."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from model.precision import resolve_device, resolve_precision
from retrieval.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ---- --device auto -------------------------------------------------------------------------------
def test_device_defaults_to_auto_in_help():
    result = invoke("index", "--help")
    assert result.exit_code == 0 and "--device TEXT" in result.output
    assert "auto (CUDA, else Apple MPS, else cpu)" in result.output and "[default: auto]" in result.output


def test_auto_device_is_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_precision("auto", resolve_device("auto")) in ("bf16", "fp32")


def test_auto_device_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    device = resolve_device("auto")
    assert device == torch.device("cuda") and resolve_precision("auto", device) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device = resolve_device("auto")
    assert device == torch.device("mps") and resolve_precision("auto", device) == "fp32"


def test_mps_requested_without_mps(monkeypatch):
    from model.errors import DeviceUnavailableError

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match="Apple MPS is not available"):
        resolve_device("mps")


def test_embed_runs_with_the_default_device(tmp_path, tiny_folder, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    image = tmp_path / "p.png"
    Image.new("RGB", (64, 48), (200, 10, 10)).save(image)
    result = invoke("embed", "--weights", tiny_folder, image)
    assert result.exit_code == 0, result.output
