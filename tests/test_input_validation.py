"""Bad input is a one-line error: never a traceback, never silently changed into something else.

Command-line input is checked by click (exit 2, `Error: Invalid value for ...`) or by the library
(exit 1, `Error: ...`); malformed weights are a CheckpointError naming the field or tensor, raised
before a model of that shape is built.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import deadline, hf_to_original, hub_state_dict, random_hf_model, save_hf, synthetic_photo
from safetensors.torch import load_file, save_file

from dinoseek.indexer.store import build_index, check_factory
from dinoseek.model import CheckpointError, PrecisionError, load_vit
from dinoseek.model.precision import resolve_device
from dinoseek.retrieval.cli import main

REPO = Path(__file__).resolve().parents[1]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, exit_code: int, message: str) -> None:
    """Exit code, the `Error:` line, and no traceback anywhere."""
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output



@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_folder):
    root = tmp_path_factory.mktemp("lib") / "photos"
    (root / "a").mkdir(parents=True)
    for i in range(4):
        synthetic_photo(160, 120, seed=i).save(root / "a" / f"p{i}.jpg", quality=90)
    (root / "a" / "copy.jpg").write_bytes((root / "a" / "p0.jpg").read_bytes())
    result = invoke("index", root, "--weights", tiny_folder, "--precision", "fp32", "--workers", 0)
    assert result.exit_code == 0, result.output
    return root


# ---- numbers on the command line ------------------------------------------------------------
@pytest.mark.parametrize("k", ["99999999999", "0", "-3"])
def test_top_k_is_bounded(root, tiny_folder, k):
    result = invoke("search", root / "a/p0.jpg", "--root", root, "--weights", tiny_folder, "-k", k)
    assert_one_line_error(result, 2, "Invalid value for '-k' / '--top'")
    assert_one_line_error(invoke("similar", "a/p0.jpg", "--root", root, "-k", k), 2, "is not in the range 1<=x<=10000")


@pytest.mark.parametrize("option", ["--min-bytes", "--max-bytes", "--min-pixels"])
@pytest.mark.parametrize("value", [str(2**64), "99999999999999999999999", "-1"])
def test_sizes_fit_64_bits(root, option, value):
    result = invoke("similar", "a/p0.jpg", "--root", root, option, value)
    assert_one_line_error(result, 2, f"Invalid value for '{option}'")


def test_sizes_in_range_still_filter(root):
    result = invoke("similar", "a/p0.jpg", "--root", root, "--min-bytes", 0, "--max-bytes", 2**63 - 1, "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)) == 4


@pytest.mark.parametrize("value, message", [("0", "0<x<=1"), ("-0.5", "0<x<=1"), ("1.5", "0<x<=1"),
                                            ("nan", "'nan' is not a number"), ("inf", "0<x<=1")])
def test_threshold_is_never_replaced(root, value, message):
    # `threshold or 0.95` used to turn an explicit 0 into the default.
    assert_one_line_error(invoke("dedup", root, "--threshold", value), 2, message)


def test_explicit_threshold_is_used(root):
    def sizes(*args):
        return [len(g["members"]) for g in json.loads(invoke("dedup", root, *args, "--json").output)["groups"]]

    assert sizes() == [2]  # the default 0.95: only the exact copy
    assert sizes("--threshold", "0.5") == [5]  # random tiny weights: every photo is above 0.5


@pytest.mark.parametrize("args, message", [
    (["--crops", "--candidates", "nan"], "'nan' is not a number"),
    (["--crops", "--candidates", "-5"], "-5.0 is not in the range 0<x<=1"),
    (["--crops", "--threshold", "0.9", "--candidates", "0.95"], "0.95 is above the --threshold 0.9"),
    (["--candidates", "0.5"], "only means something with --crops"),
])
def test_candidates_are_checked(root, tiny_folder, args, message):
    result = invoke("dedup", root, "--weights", tiny_folder, *args)
    assert_one_line_error(result, 2, message)


@pytest.mark.parametrize("args, code, message", [
    (["--size", "0"], 2, "0 is not in the range 14<=x<=4096"),
    (["--size", "50000"], 2, "50000 is not in the range 14<=x<=4096"),
    (["--mode", "full", "--size", "300"], 1, "size for mode 'full' must be a multiple of 14, got 300"),
])
def test_embed_size_is_bounded(root, tiny_folder, args, code, message):
    result = invoke("embed", "--weights", tiny_folder, *args, root / "a/p0.jpg")
    assert_one_line_error(result, code, message)


def test_index_numbers_are_bounded(root, tiny_folder):
    for args in (["--batch-size", "0"], ["--workers", "-1"], ["--checkpoint-seconds", "nan"]):
        result = invoke("index", root, "--weights", tiny_folder, *args)
        assert_one_line_error(result, 2, f"Invalid value for '{args[0]}'")


# ---- devices -----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cuda:-1", "gpu0", "cpu cuda"])
def test_unknown_device(root, tiny_folder, device):
    result = invoke("embed", "--weights", tiny_folder, "--device", device, root / "a/p0.jpg")
    assert_one_line_error(result, 1, f"device {device!r} is not supported; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")


def test_cuda_without_cuda(root, tiny_folder, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = invoke("embed", "--weights", tiny_folder, "--device", "cuda:0", root / "a/p0.jpg")
    assert_one_line_error(result, 1, "device 'cuda:0' requested but CUDA is not available; use --device cpu")


def test_cuda_index_beyond_the_device_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(PrecisionError, match=r"'cuda:7' does not exist: this machine has 2 CUDA device\(s\)"):
        resolve_device("cuda:7")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_beyond_the_real_device_count(root, tiny_folder):
    device = f"cuda:{torch.cuda.device_count()}"
    result = invoke("embed", "--weights", tiny_folder, "--device", device, root / "a/p0.jpg")
    assert_one_line_error(result, 1, f"device {device!r} does not exist")


# ---- FAISS factory strings ---------------------------------------------------------------------
UNUSABLE_FACTORIES = {
    "IDMap,Flat": "must not contain IDMap",
    "IDMap2,Flat": "must not contain IDMap",
    "Flat,IDMap": "must not contain IDMap",
    "PCA32,Flat": "starts with a vector transform",
    "OPQ16,IVF4,PQ16": "starts with a vector transform",
    "garbage": "could not parse index string garbage",
    "HNSW32": "(IndexHNSWFlat) cannot remove vectors",
    "PQ16": "(IndexPQ) cannot do what the library needs",
    "IVF4,FlatDedup": "(IndexIVFFlatDedup) cannot do what the library needs",
}


@pytest.mark.parametrize("factory", UNUSABLE_FACTORIES)
def test_unusable_factory_is_refused_before_anything_is_written(tmp_path, root, tiny_folder, factory):
    library = tmp_path / "lib"
    result = invoke("index", root, "--weights", tiny_folder, "--workers", 0, "--library", library, "--index", factory)
    assert_one_line_error(result, 1, UNUSABLE_FACTORIES[factory])
    assert not library.exists()


@pytest.mark.parametrize("factory", UNUSABLE_FACTORIES)
def test_build_index_refuses_unusable_factories(factory):
    with pytest.raises(ValueError, match=UNUSABLE_FACTORIES[factory].replace("(", r"\(").replace(")", r"\)")):
        build_index(factory, 64, np.zeros((0, 64), np.float32), np.zeros(0, np.int64), requested=factory)


@pytest.mark.parametrize("factory", ["Flat", "SQ8", "IVF4,Flat", "IVF4,SQ8", "IVF4,PQ16", "IVF1,PQ8x8"])
def test_usable_factories_work_at_every_size(factory):
    """Small libraries start as Flat until there is enough to train (PQ needs 256 points); every
    operation the library uses works on what is built."""
    rng = np.random.default_rng(0)
    check_factory(factory, 64)
    for count in (3, 40, 300):
        vectors = rng.standard_normal((count, 64)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        ids = np.arange(count, dtype=np.int64) + 100
        index = build_index(factory, 64, vectors, ids, requested=factory)
        assert index.remove([100]) == 1 and index.count == count - 1
        index.add(np.array([100]), vectors[:1])
        _, found = index.search(vectors[:1], 1)
        assert found[0][0] == 100
        index.range_search(vectors[:2], 0.5)
        index.search_subset(vectors[:1], 1, ids[1:3])


# ---- Ctrl-C --------------------------------------------------------------------------------------
def test_ctrl_c_in_process_is_one_line_with_exit_130(root, tiny_folder, monkeypatch):
    from dinoseek.indexer import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_index", interrupted)
    result = invoke("index", root, "--weights", tiny_folder, "--workers", 0)
    assert result.exit_code == 130
    assert result.output == (f"interrupted before any image was saved; run `dinoseek index {root} --weights "
                             f"{tiny_folder}` again\n")


@pytest.mark.slow
def test_ctrl_c_during_index_is_one_line_and_the_library_stays_consistent(tmp_path, tiny_folder):
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(120):  # interrupted after 20: the rest takes long enough for the signal to land
        synthetic_photo(96, 72, seed=i).save(root / f"p{i:03d}.jpg", quality=85)
    command = [sys.executable, "-m", "dinoseek.retrieval.cli", "index", root, "--weights", tiny_folder, "--precision", "fp32",
               "--batch-size", "2", "--checkpoint-seconds", "0"]

    def run(*extra):
        return subprocess.run([*map(str, command), *extra], capture_output=True, text=True, cwd=REPO, timeout=300)

    # A new session, and the signal sent to its whole process group: what a terminal's Ctrl-C does,
    # so the decode workers get it too.
    process = subprocess.Popen([*map(str, command), "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=REPO, start_new_session=True,
                               env={**os.environ, "DINOSEEK_PROGRESS_INTERVAL": "0"})  # a count line per image
    for line in process.stderr:  # "index: 20/120 images (16%), ..."
        if line.startswith(b"index: ") and int(line.split(b"/")[0].split()[-1]) >= 20:
            break
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err.decode()[-2000:]
    last = err.decode().rstrip().splitlines()[-1]
    assert "Traceback" not in err.decode() and re.fullmatch(
        r"interrupted: \d+ of 120 images saved in the catalog; run "
        + re.escape(f"`dinoseek index {root} --weights {tiny_folder}` again to resume"), last), last
    assert b"embedded," not in out  # the run did not finish

    rerun = run("--workers", "0")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    verify = subprocess.run([sys.executable, "-m", "dinoseek.retrieval.cli", "verify", str(root)], capture_output=True,
                            text=True, cwd=REPO, timeout=300)
    assert verify.returncode == 0 and "ok: catalog and indexes agree" in verify.stdout, verify.stdout + verify.stderr
    info = json.loads(subprocess.run([sys.executable, "-m", "dinoseek.retrieval.cli", "info", str(root), "--json"],
                                     capture_output=True, text=True, cwd=REPO, timeout=300).stdout)
    assert info["counts"] == {"embedded": 120}


# ---- config.json ---------------------------------------------------------------------------------
def hf_copy(tiny_folder: Path, folder: Path, **config_changes) -> Path:
    """A copy of the tiny checkpoint whose config.json has `config_changes` (None deletes a key)."""
    folder.mkdir()
    shutil.copy(tiny_folder / "model.safetensors", folder)
    config = json.loads((tiny_folder / "config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("changes, message", [
    ({"hidden_size": None}, "config.json: hidden_size is missing"),
    ({"hidden_size": 0}, "config.json: hidden_size must be in 1..16384, got 0"),
    ({"hidden_size": 10**9}, "config.json: hidden_size must be in 1..16384, got 1000000000"),
    ({"hidden_size": "128"}, "config.json: hidden_size must be int, got str '128'"),
    ({"hidden_size": 128.0}, "config.json: hidden_size must be int, got float 128.0"),
    ({"num_hidden_layers": -2}, "config.json: num_hidden_layers must be in 1..512, got -2"),
    ({"num_hidden_layers": True}, "config.json: num_hidden_layers must be int, got bool True"),
    ({"num_attention_heads": 3}, "config.json: num_attention_heads 3 does not divide hidden_size 128"),
    ({"num_attention_heads": 0}, "config.json: num_attention_heads must be in 1..1024, got 0"),
    ({"patch_size": 0}, "config.json: patch_size must be in 1..256, got 0"),
    ({"image_size": 5}, "config.json: image_size must be in 14..14336, got 5"),
    ({"mlp_ratio": 0}, "config.json: mlp_ratio must be in (0, 64], got 0"),
    ({"mlp_ratio": float("nan")}, "config.json: mlp_ratio must be in (0, 64], got nan"),
    ({"mlp_ratio": 10**6}, "config.json: mlp_ratio must be in (0, 64], got 1000000"),
    ({"layer_norm_eps": -1}, "config.json: layer_norm_eps must be in (0, 1), got -1"),
    ({"qkv_bias": "yes"}, "config.json: qkv_bias must be bool, got str 'yes'"),
    ({"num_channels": 0}, "config.json: num_channels must be in 1..64, got 0"),
])
def test_malformed_config_names_the_field(tmp_path, tiny_folder, changes, message):
    folder = hf_copy(tiny_folder, tmp_path / "w", **changes)
    with pytest.raises(CheckpointError) as e:
        load_vit(folder)
    assert str(e.value) == message


def test_config_that_is_not_an_object(tmp_path, tiny_folder):
    folder = hf_copy(tiny_folder, tmp_path / "w")
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json must hold a JSON object, got list"):
        load_vit(folder)


def test_empty_config_is_a_config_without_sizes(tmp_path, tiny_folder):
    folder = hf_copy(tiny_folder, tmp_path / "w")
    (folder / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="config.json: hidden_size is missing"):
        load_vit(folder)


def test_malformed_config_through_the_cli(tmp_path, tiny_folder, root):
    folder = hf_copy(tiny_folder, tmp_path / "w", hidden_size=10**9)
    result = invoke("embed", "--weights", folder, root / "a/p0.jpg")
    assert_one_line_error(result, 1, "config.json: hidden_size must be in 1..16384, got 1000000000")


# ---- tensors ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def original(tiny_folder):
    """The tiny checkpoint in the facebookresearch `.pth` layout (fused qkv)."""
    return hf_to_original(hub_state_dict(tiny_folder))


@pytest.mark.parametrize("name, shape", [
    ("blocks.0.attn.qkv.weight", (2 * 128, 128)),
    ("blocks.1.attn.qkv.weight", (3 * 128, 64)),
    ("blocks.0.attn.qkv.bias", (3 * 128 + 1,)),
])
def test_wrong_fused_qkv_is_named(tmp_path, original, name, shape):
    torch.save({**original, name: torch.zeros(shape)}, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=rf"shape mismatch: {name.replace('.', '[.]')} "):
        load_vit(tmp_path / "w.pth")


@pytest.fixture(scope="module")
def swiglu_original(tmp_path_factory):
    folder = save_hf(random_hf_model(swiglu=True), tmp_path_factory.mktemp("swiglu"))
    return hf_to_original(hub_state_dict(folder))


def test_wrong_fused_swiglu_is_named(tmp_path, swiglu_original):
    w12 = swiglu_original["blocks.0.mlp.w12.weight"]
    odd = torch.zeros(w12.shape[0] + 1, w12.shape[1])
    torch.save({**swiglu_original, "blocks.0.mlp.w12.weight": odd}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"tensor blocks\.0\.mlp\.w12\.weight has \d+ rows, expected an even"):
        load_vit(tmp_path / "odd.pth")
    torch.save({**swiglu_original, "blocks.1.mlp.w12.weight": w12[:-8]}, tmp_path / "short.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatch: blocks\.1\.mlp\.w12\.weight"):
        load_vit(tmp_path / "short.pth")


def test_hf_parts_that_cannot_be_fused(tmp_path, tiny_folder):
    tensors = load_file(str(tiny_folder / "model.safetensors"))
    key = "encoder.layer.1.attention.attention.key.weight"
    tensors[key] = tensors[key][:64].contiguous()
    folder = hf_copy(tiny_folder, tmp_path / "w")
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"cannot fuse blocks\.1\.attn\.qkv\.weight: its parts have shapes"):
        load_vit(folder)


@pytest.mark.parametrize("name, shape", [("cls_token", ()), ("pos_embed", (50, 128)),
                                         ("patch_embed.proj.weight", (128, 3, 14))])
def test_architecture_tensors_of_the_wrong_rank(tmp_path, original, name, shape):
    torch.save({**original, name: torch.zeros(shape)}, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=rf"tensor {name.replace('.', '[.]')} has shape .* dimensions"):
        load_vit(tmp_path / "w.pth")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(tmp_path, original, bad):
    weight = original["blocks.1.mlp.fc1.weight"].clone()
    weight[3, 5] = bad
    later = original["norm.weight"].clone()
    later[0] = bad
    torch.save({**original, "blocks.1.mlp.fc1.weight": weight, "norm.weight": later}, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"tensor blocks\.1\.mlp\.fc1\.weight holds 1 NaN or infinite"):
        load_vit(tmp_path / "w.pth")


def test_non_finite_weights_in_safetensors(tmp_path, tiny_folder):
    tensors = load_file(str(tiny_folder / "model.safetensors"))
    tensors["embeddings.cls_token"] = torch.full_like(tensors["embeddings.cls_token"], float("nan"))
    folder = hf_copy(tiny_folder, tmp_path / "w")
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor cls_token holds 128 NaN or infinite value"):
        load_vit(folder)


def test_integer_weights_are_refused(tmp_path, original):
    torch.save({**original, "norm.bias": torch.zeros(128, dtype=torch.int64)}, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"tensor norm\.bias has dtype torch\.int64, expected floating point"):
        load_vit(tmp_path / "w.pth")


# ---- sharded checkpoints and files that are not regular files ---------------------------------------
@pytest.fixture
def sharded(tmp_path):
    return save_hf(random_hf_model(layers=3), tmp_path / "sharded", max_shard_size="200KB")


@pytest.mark.parametrize("shard", ["../x.safetensors", "/etc/x.safetensors", "sub/../../x.safetensors",
                                   "model.bin", 7])
def test_shard_index_pointing_outside_is_refused(sharded, shard):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    index_path.write_text(json.dumps(index))
    message = "outside the checkpoint folder" if str(shard).endswith(".safetensors") else "expected a .safetensors"
    with pytest.raises(CheckpointError, match=message):
        load_vit(sharded)


def test_sharded_checkpoint_still_loads(sharded):
    assert load_vit(sharded).config.depth == 3


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_fifo_in_a_checkpoint_folder_fails_fast(tmp_path, tiny_folder, name):
    folder = hf_copy(tiny_folder, tmp_path / "w")
    (folder / name).unlink()
    os.mkfifo(folder / name)
    with deadline(20), pytest.raises(CheckpointError, match="not a regular file"):
        load_vit(folder)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_fifo_or_device_as_weights_file_fails_fast(tmp_path, suffix):
    fifo = tmp_path / f"fifo{suffix}"
    os.mkfifo(fifo)
    device = tmp_path / f"zero{suffix}"
    device.symlink_to("/dev/zero")
    for path in (fifo, device):
        with deadline(20), pytest.raises(CheckpointError, match="not a regular file"):
            load_vit(path)


def test_dev_zero_as_config_fails_fast(tmp_path, tiny_folder):
    folder = hf_copy(tiny_folder, tmp_path / "w")
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to("/dev/zero")
    with deadline(20), pytest.raises(CheckpointError, match="unreadable config.json"):
        load_vit(folder)


def test_ctrl_c_while_the_cli_is_still_importing(monkeypatch, capsys):
    """The entry point catches Ctrl-C during the seconds torch takes to import: one line, exit 130."""
    import importlib.abc
    import sys

    from dinoseek.retrieval.entry import run

    class Interrupting(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "dinoseek.retrieval.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "dinoseek.retrieval.cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "Aborted!\n"


def test_importing_the_query_layer_does_not_load_torch(tmp_path):
    import subprocess
    import sys

    code = ("import sys, dinoseek.retrieval, dinoseek.retrieval.entry; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)  # the installed package, not ./retrieval
