"""Encoder throughput: ours (eager and compiled) vs transformers on the same random weights, batch and precision.

    python benchmarks/encoder.py --preset small --batch 16 --precisions fp32 bf16
    python benchmarks/encoder.py --device cuda --presets small base large --batch 256 --precisions fp16

All models run in this process on the same input. Throughputs are medians of --repeats runs,
interleaved (eager, compiled, reference, eager, ...) so drift hits all alike, after --warmup runs.
The reference is transformers' `Dinov2Model` with attn_implementation="sdpa".
Columns: img/s of ours eager, ours compiled (torch.compile + CUDA graphs; "-" where the encoder
runs eagerly: compile off, the CPU under --compile auto, int8/int4) and the reference; compiled /
reference; seconds the first compiled batch took (compiling and capturing); peak device memory of
ours and of the reference (weights plus the most a batch allocated; on the CPU the process's peak
RSS is printed at the end); CLS cosine to fp32 (min over the batch) and of compiled to eager.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinoseek.model import PRESETS, Encoder, load_weights  # noqa: E402
from dinoseek.model.precision import compute_dtype, resolve_device, resolve_precision  # noqa: E402
from dinoseek.model.quant import weight_bytes  # noqa: E402

HF_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPILE = {"auto": "auto", "on": True, "off": False}


def reference_model(preset: str, folder: Path):
    """transformers' model for `preset` with random weights, SDPA attention, saved to `folder`."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = PRESETS[preset]
    kwargs = dict(hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                  image_size=518, patch_size=14, use_swiglu_ffn=cfg.ffn == "swiglu", attn_implementation="sdpa")
    torch.manual_seed(0)
    if cfg.num_registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=cfg.num_registers, **kwargs))
    else:
        model = Dinov2Model(Dinov2Config(**kwargs))
    if model.config._attn_implementation != "sdpa":  # a transformers that ignored the config's choice
        model.config._attn_implementation = "sdpa"
    model.save_pretrained(folder)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fns: dict, warmup: int, repeats: int, device: torch.device) -> dict:
    """Median wall time of each callable; runs are interleaved so drift hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_mb(fn, device: torch.device, resident_bytes: int) -> tuple[object, float | None]:
    """fn()'s result and `resident_bytes` (its weights) plus the most it allocated, in MB (CUDA only)."""
    if device.type != "cuda":
        return fn(), None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    sync(device)
    return result, (resident_bytes + torch.cuda.max_memory_allocated(device) - before) / 1e6


def cls_cosines(a: torch.Tensor, b: torch.Tensor) -> float:
    """Min cosine between the CLS tokens of two hidden-state batches."""
    a, b = a[:, 0].float(), b[:, 0].float()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


def cell(value, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def row(folder: str, reference, precision: str, x: torch.Tensor, baseline, args, device: torch.device) -> str:
    """The table's cells after preset and precision, for one encoder of `precision`."""
    encoder = Encoder.from_weights(load_weights(folder), device=device, precision=precision,
                                   compile=COMPILE[args.compile])
    xd = x.to(device, compute_dtype(precision, device))
    with torch.inference_mode():
        start = time.perf_counter()
        first, ours_mb = peak_mb(lambda: encoder.hidden_states(xd), device, weight_bytes(encoder.vit))
        compile_s = time.perf_counter() - start if encoder.compiled else None
        cos_eager = cls_cosines(first, encoder.vit(xd)) if encoder.compiled else None
        del first
        fns = {"eager": lambda: encoder.vit(xd)}
        if encoder.compiled:
            fns["compiled"] = lambda: encoder.hidden_states(xd)
        ref_mb = None
        if precision in HF_DTYPES:  # the reference has no weight-only int8/int4 of its own
            ref = reference.to(device=device, dtype=HF_DTYPES[precision])
            _, ref_mb = peak_mb(lambda: ref(pixel_values=xd), device,
                                sum(p.numel() * p.element_size() for p in ref.parameters()))
            fns["ref"] = lambda: ref(pixel_values=xd)
        seconds = median_seconds(fns, args.warmup, args.repeats, device)
        out = encoder.embed(x).cls
    cos = float((out * baseline).sum(1).min())
    rate = {name: args.batch / s for name, s in seconds.items()}
    ratio = rate["compiled"] / rate["ref"] if {"compiled", "ref"} <= rate.keys() else None
    return (f"{rate['eager']:>12.1f}{cell(rate.get('compiled'), '.1f', 10)}{cell(rate.get('ref'), '.1f', 10)}"
            f"{cell(ratio, '.2f', 8)}{'x' if ratio else ' '}{cell(compile_s, '.1f', 10)}{cell(ours_mb, '.0f', 9)}"
            f"{cell(ref_mb, '.0f', 9)}{cos:>9.4f}{cell(cos_eager, '.5f', 10)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small"], choices=sorted(PRESETS))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", choices=sorted(COMPILE), default="auto",
                        help="the encoder's compile setting (auto: on CUDA)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    started = time.perf_counter()
    device = resolve_device(args.device)
    import transformers

    transformers.utils.logging.disable_progress_bar()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# device: {device} ({name}), torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}, batch {args.batch}, {args.size}px, compile {args.compile}, "
          f"median of {args.repeats} interleaved runs after {args.warmup} warmup", flush=True)
    print(f"{'preset':<8}{'precision':<10}{'eager img/s':>12}{'compiled':>10}{'ref sdpa':>10}{'comp/ref':>9}"
          f"{'compile s':>10}{'ours MB':>9}{'ref MB':>9}{'cos fp32':>9}{'cos eager':>10}", flush=True)
    for preset in args.presets:
        with tempfile.TemporaryDirectory() as tmp:
            reference = reference_model(preset, Path(tmp))
            torch.manual_seed(0)
            x = torch.randn(args.batch, 3, args.size, args.size)
            # fp32 CLS vectors, eager, on the same device: what each precision is compared to.
            baseline = Encoder.from_weights(load_weights(tmp), device=device, precision="fp32", compile=False).embed(x).cls
            for precision in args.precisions:
                precision = resolve_precision(precision, device)
                print(f"{preset:<8}{precision:<10}{row(tmp, reference, precision, x, baseline, args, device)}", flush=True)
                reference = reference.float().cpu()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"# host peak RSS {rss_mb:.0f} MB; total {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
