"""`Encoder`: images -> L2-normalized CLS and pooled-patch vectors."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .compiled import AUTO_MIN_BATCH, CompiledViT
from .embedder import Embeddings
from .errors import InvalidArgumentError, WeightsNotFoundError
from .fingerprint import tensors_sha256
from .load import Weights, load_weights
from .precision import apply_precision, compute_dtype, resolve_device, resolve_precision
from .preprocess import CROP, InputSpec, normalize_batch, preprocess
from .quant import weight_bytes
from .vit import DinoVisionTransformer

log = logging.getLogger(__name__)

# The preset a command uses when neither it nor the library names a model.
DEFAULT_MODEL = "small"
# Manifest key: where the weights were loaded from (`load.describe_source`; the library adds
# "relative", the path from its root). Not part of the model's identity: the sha256 is. Libraries
# made before it was recorded have none, and learn it the next time their weights are given.
WEIGHTS_SOURCE = "weights_source"


class Encoder:
    """Wraps a loaded ViT with its preprocessing and precision; implements `Embedder`.

    >>> enc = Encoder.from_pretrained("small", device="cpu", precision="auto")
    >>> out = enc.embed([Image.open("a.jpg")])
    >>> out.cls.shape, out.patch.shape
    ((1, 384), (1, 384))
    """

    def __init__(
        self,
        vit: DinoVisionTransformer,
        *,
        device: str | torch.device = "cpu",
        precision: str = "auto",
        mode: str = "crop",
        size: int = CROP,
        fingerprint: str | Callable[[], str] | None = None,
        source: dict | None = None,
        compile: str | bool = "auto",
    ) -> None:
        """`fingerprint` identifies the weights in library manifests: a sha256, or a function giving
        it when first needed (`Weights.fingerprint`, over the checkpoint files). None for a model
        built in memory: its tensors are hashed, before precision changes them. `source` says where
        the weights were loaded from (`Weights.source`), for a library to load them again unasked.

        `compile`: run the ViT through torch.compile and CUDA graphs (`model.compiled`). "auto":
        on CUDA, for batches of AUTO_MIN_BATCH images or more; True: every batch, on any device;
        False: never. int8/int4 models always run eagerly."""
        _check_compile(compile)
        self._fingerprint = tensors_sha256(vit) if fingerprint is None else fingerprint
        self.source = source
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.dtype = compute_dtype(self.precision, self.device)
        self.input_spec = InputSpec(mode, size)
        calibration = None
        if self.precision == "int4":
            from .gptq import calibration_images

            calibration = preprocess(calibration_images(), mode=mode, size=size)
        self.vit = apply_precision(vit, self.precision, self.device, calibration).eval().requires_grad_(False)
        self.compiled = _compiles(compile, self.device, self.precision)
        self._compiled_vit = None
        if self.compiled:
            self._compiled_vit = CompiledViT(self.vit, min_batch=AUTO_MIN_BATCH if compile == "auto" else 1)

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        *,
        device: str | torch.device = "cpu",
        precision: str = "auto",
        mode: str = "crop",
        size: int = CROP,
        compile: str | bool = "auto",
    ) -> "Encoder":
        """Load weights (preset name, HF folder, `.safetensors`, `.pth`) and prepare them for `precision`."""
        check_settings(device=device, precision=precision, mode=mode, size=size, compile=compile)
        return cls.from_weights(load_weights(source), device=device, precision=precision, mode=mode, size=size,
                                compile=compile)

    @classmethod
    def from_weights(
        cls,
        weights: Weights,
        *,
        device: str | torch.device = "cpu",
        precision: str = "auto",
        mode: str = "crop",
        size: int = CROP,
        compile: str | bool = "auto",
    ) -> "Encoder":
        """An encoder over weights already loaded (`load_weights`), fingerprinted by their files."""
        return cls(weights.vit, device=device, precision=precision, mode=mode, size=size,
                   fingerprint=weights.fingerprint, source=weights.source, compile=compile)

    @property
    def dim(self) -> int:
        return self.vit.config.embed_dim

    @property
    def mode(self) -> str:
        return self.input_spec.mode

    @property
    def size(self) -> int:
        return self.input_spec.size

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return preprocess(images, mode=self.mode, size=self.size)

    def embed_pixels(self, pixels: np.ndarray, *, return_tokens: bool = False) -> Embeddings:
        """Embed (B, size, size, 3) uint8 pixels made by `input_spec.pixels` (or `load_pixels`):
        the one way images reach the model, so every caller gets the same vector for a file."""
        side = self.input_spec.size
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (side, side, 3):
            raise InvalidArgumentError(f"pixels must be (B, {side}, {side}, 3) uint8, got {pixels.shape} {pixels.dtype}")
        return self.embed(normalize_batch(np.ascontiguousarray(pixels)), return_tokens=return_tokens)

    @torch.inference_mode()
    def embed(
        self, images: Sequence[Image.Image] | torch.Tensor | Image.Image, *, return_tokens: bool = False
    ) -> Embeddings:
        """Embed PIL images, or `pixel_values` (B, 3, H, W) already preprocessed."""
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, torch.Tensor):
            pixel_values = images if images.ndim == 4 else images.unsqueeze(0)
        elif len(images) and all(isinstance(i, torch.Tensor) for i in images):
            pixel_values = torch.stack(list(images))
        else:
            pixel_values = self.preprocess(images)  # through input_spec.pixels, as embed_pixels' callers
        if self.device.type == "cuda" and pixel_values.device.type == "cpu":
            pixel_values = pixel_values.pin_memory()  # page-locked, so the copy below overlaps compute
        pixel_values = pixel_values.to(self.device, self.dtype, non_blocking=True)
        hidden = self.hidden_states(pixel_values)  # (B, 1 + R + N, D)
        patches = hidden[:, self.vit.num_prefix_tokens :].float()  # (B, N, D)
        cls_vec = torch.nn.functional.normalize(hidden[:, 0].float(), dim=-1)
        patch_vec = torch.nn.functional.normalize(patches.mean(dim=1), dim=-1)
        return Embeddings(
            cls=cls_vec.cpu().numpy(),
            patch=patch_vec.cpu().numpy(),
            tokens=patches.cpu().numpy() if return_tokens else None,
        )

    def hidden_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Final-norm tokens (B, 1 + R + N, D) of pixel values on this encoder's device: through the
        compiled forward where it is on (the first batch of each new size compiles), else the ViT."""
        if self._compiled_vit is None:
            return self.vit(pixel_values)
        return self._compiled_vit(pixel_values)

    @property
    def weights_sha256(self) -> str:
        """The weights' fingerprint (computed once, on first use, when it is a function)."""
        if callable(self._fingerprint):
            self._fingerprint = self._fingerprint()
        return self._fingerprint

    def manifest(self) -> dict:
        """What a library records so vectors from another model are never mixed in, and so that
        later commands load the same weights with the same preprocessing unasked."""
        manifest = {
            "arch": asdict(self.vit.config),
            "weights_sha256": self.weights_sha256,
            "preprocess": self.input_spec.as_dict(),
            "precision": self.precision,
            "dim": self.dim,
            "weight_bytes": weight_bytes(self.vit),
        }
        if self.source is not None:  # a model built in memory has no place to be loaded from again
            manifest[WEIGHTS_SOURCE] = dict(self.source)
        return manifest


def check_settings(*, device: str | torch.device = "cpu", precision: str = "auto", mode: str = "crop",
                   size: int = CROP, compile: str | bool = "auto") -> None:
    """Raise unless an encoder can be made with these settings. Cheap, so that callers check them
    before gigabytes of weights are read, or anything is created."""
    InputSpec(mode, size)
    resolve_precision(precision, resolve_device(device))
    _check_compile(compile)


def _check_compile(compile) -> None:
    if compile is not True and compile is not False and not (isinstance(compile, str) and compile == "auto"):
        raise InvalidArgumentError(f"compile must be 'auto', True or False, got {compile!r}")


def _compiles(compile: str | bool, device: torch.device, precision: str) -> bool:
    """Whether the encoder runs compiled. int8/int4 stay eager: their layers run kernels of their
    own (model/quant.py) that compiling would trace through or around, for little gain -- their
    time goes to unpacking weights, not to the elementwise passes compiling fuses."""
    if precision in ("int8", "int4") or compile is False:
        return False
    return compile is True or device.type == "cuda"


def encoder_for_library(
    manifest: dict | None,
    source: str | Path | Weights | None = None,
    *,
    root: str | Path | None = None,
    device: str | torch.device = "cpu",
    precision: str = "auto",
    mode: str | None = None,
    size: int | None = None,
) -> Encoder:
    """The encoder for a library with this model `manifest` (None: a new library), built in this one
    place for every command.

    `source` is a preset name, a weights path, or `Weights` already loaded; None (no --model or
    --weights given) loads the weights the library recorded (`library_weights`, `root` being the
    library's photo folder), or the default preset for a new library.

    A new library gets the input asked for (default crop at 224 px). An existing one gets the
    preprocessing it recorded, since only vectors made the same way compare; asking for another
    mode or size is refused rather than ignored. Whether the weights are the library's is the
    library's check (`check_model`, `bind_model`), which knows everything else that must match.
    """
    recorded = (manifest or {}).get("preprocess")
    if recorded is None:
        spec = InputSpec(mode or "crop", CROP if size is None else size)
    else:
        spec = InputSpec(recorded["mode"], recorded["size"])
        asked = {name: value for name, value in (("mode", mode), ("size", size))
                 if value is not None and value != getattr(spec, name)}
        if asked:
            raise InvalidArgumentError(
                f"this library was made with mode {spec.mode!r} at size {spec.size}, not "
                f"{' at '.join(f'{name} {value!r}' for name, value in asked.items())}; leave it unset to use "
                f"the library's, or make a new library")
    precision = _library_precision(manifest, device, precision)
    settings = dict(device=device, precision=precision, mode=spec.mode, size=spec.size)
    if isinstance(source, Weights):
        return Encoder.from_weights(source, **settings)
    return Encoder.from_pretrained(library_weights(manifest, root) if source is None else source, **settings)


def _library_precision(manifest: dict | None, device: str | torch.device, precision: str) -> str:
    """`precision`, or for "auto" the precision the library's vectors were made at where this device
    runs it well: query vectors then match the stored ones exactly. fp32, int8 and int4 run
    anywhere; fp16/bf16 only where "auto" itself would pick them (a GPU, a CPU with native bf16)."""
    recorded = (manifest or {}).get("precision")
    if precision != "auto" or recorded is None:
        return precision
    if recorded in ("fp32", "int8", "int4") or recorded == resolve_precision("auto", resolve_device(device)):
        return recorded
    return precision


def library_weights(manifest: dict | None, root: str | Path | None = None) -> str | Path:
    """The weights to load for a library when the command names none: those it recorded.

    A Hub repo id is found in the Hugging Face cache as a preset is. A recorded path that is gone
    is looked for where it was relative to the library's photo folder `root` (photos and weights
    moved together); otherwise WeightsNotFoundError names the recorded path. A new library, or one
    made before the source was recorded, gets the default preset. Whichever file is found, the
    library checks its sha256 before using it.
    """
    recorded = (manifest or {}).get(WEIGHTS_SOURCE)
    if not isinstance(recorded, dict):
        return DEFAULT_MODEL
    if recorded.get("hub"):
        return recorded["hub"]
    if not isinstance(recorded.get("path"), str):  # a source this version does not know: as if none
        return DEFAULT_MODEL
    path = Path(recorded["path"])
    if path.exists():
        return path
    relative = recorded.get("relative")
    if relative is not None and root is not None:
        beside = Path(root).resolve() / relative
        if beside.exists():
            log.info("weights not at %s any more; using %s, found where they were relative to %s", path, beside, root)
            return beside
    raise WeightsNotFoundError(f"the weights this library was built with are no longer at {path}")
