"""Encoder throughput: ours vs transformers on the same random weights, batch and precision.

    python benchmarks/encoder.py --preset small --batch 16 --precisions fp32 bf16
    python benchmarks/encoder.py --device cuda --presets small base large --batch 256 --precisions fp16

Both models run in this process on the same input; each timing is the median of --repeats runs
after --warmup runs. Also prints the weight bytes of each precision (ours) and cosine to fp32.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinoseek.model import PRESETS, Encoder, load_weights  # noqa: E402
from dinoseek.model.precision import apply_precision, compute_dtype, resolve_device, resolve_precision  # noqa: E402
from dinoseek.model.quant import weight_bytes  # noqa: E402

HF_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def reference_model(preset: str, folder: Path):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = PRESETS[preset]
    kwargs = dict(hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                  image_size=518, patch_size=14, use_swiglu_ffn=cfg.ffn == "swiglu")
    torch.manual_seed(0)
    if cfg.num_registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=cfg.num_registers, **kwargs))
    else:
        model = Dinov2Model(Dinov2Config(**kwargs))
    model.save_pretrained(folder)
    return model.eval()


def median_seconds(fns: dict, warmup: int, repeats: int, device: torch.device) -> dict:
    """Median wall time of each callable; runs are interleaved so drift hits all of them alike."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small"], choices=sorted(PRESETS))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# device: {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, {args.size}px, median of {args.repeats}")
    header = f"{'preset':<10}{'precision':<10}{'ours img/s':>12}{'ref img/s':>12}{'ratio':>8}{'weights MB':>12}{'cos vs fp32':>13}"
    print(header)
    for preset in args.presets:
        with tempfile.TemporaryDirectory() as tmp:
            ref_fp32 = reference_model(preset, Path(tmp))
            torch.manual_seed(0)
            x = torch.randn(args.batch, 3, args.size, args.size)
            baseline = None
            for precision in args.precisions:
                precision = resolve_precision(precision, device)
                encoder = Encoder.from_weights(load_weights(tmp), device=device, precision=precision)
                xd = x.to(device, compute_dtype(precision, device))
                fns = {"ours": lambda: encoder.vit(xd)}
                if precision in HF_DTYPES:  # the reference has no weight-only int8/int4 of its own
                    ref = ref_fp32.to(device=device, dtype=HF_DTYPES[precision])
                    fns["ref"] = lambda: ref(pixel_values=xd)
                with torch.inference_mode():
                    seconds = median_seconds(fns, args.warmup, args.repeats, device)
                    out = encoder.embed(x).cls
                ref_fp32 = ref_fp32.float().cpu()
                if baseline is None:
                    baseline = Encoder.from_weights(load_weights(tmp), device=device, precision="fp32").embed(x).cls
                cos = float((out * baseline).sum(1).min())
                ours_s = seconds["ours"]
                ref_cell = ratio_cell = "-"
                if "ref" in seconds:
                    ref_cell, ratio_cell = f"{args.batch / seconds['ref']:.1f}", f"{seconds['ref'] / ours_s:.2f}x"
                mb = weight_bytes(encoder.vit) / 1e6
                print(f"{preset:<10}{precision:<10}{args.batch / ours_s:>12.1f}{ref_cell:>12}{ratio_cell:>8}{mb:>12.1f}{cos:>13.4f}",
                      flush=True)
                del encoder


if __name__ == "__main__":
    main()
