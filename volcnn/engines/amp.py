"""Device-aware mixed precision: which autocast dtype to use where, and whether a GradScaler is needed.

MONAI's engines hard-code ``torch.autocast("cuda")`` and build a fresh ``GradScaler`` on every ``run()``, so
``amp`` does nothing on a CPU and the scaler's state is lost on resume. :class:`AmpPolicy` is the one place that
decides, for a device and the bundle's ``amp`` / ``amp_dtype`` keys:

=========  ==============  ======================================================================
device     ``amp_dtype``   result
=========  ==============  ======================================================================
cuda       auto, float16   fp16 autocast + GradScaler (MONAI's default behaviour, scaler kept)
cuda       bfloat16        bf16 autocast, no scaler (falls back to fp16 when the GPU lacks bf16)
cpu        auto, bfloat16  bf16 autocast when the CPU has native bf16 (AVX512-BF16 / AMX), else off
cpu        float16         bf16 instead, with a warning (fp16 on CPU is slow and needs a scaler)
=========  ==============  ======================================================================

Only the network's forward pass runs under autocast; HU windowing and normalisation happen in the data
pipeline, in float32, before the batch reaches the engine, and network outputs are cast back to float32
before the loss, metrics and post-processing.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from volcnn.core.options import as_bool

__all__ = ["AmpPolicy", "resolve_amp", "cpu_has_fast_bf16"]

logger = logging.getLogger(__name__)

_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 convolutions natively (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


@dataclass(frozen=True)
class AmpPolicy:
    """The resolved mixed-precision settings for one device.

    Attributes:
        device_type: ``"cuda"`` or ``"cpu"`` (the autocast device type).
        dtype: the autocast dtype, or ``None`` when autocast is off.
    """

    device_type: str
    dtype: torch.dtype | None

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    @property
    def needs_scaler(self) -> bool:
        """fp16 needs loss scaling against gradient underflow; bf16 has fp32's exponent range and does not."""
        return self.dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` for this policy, or a no-op context when autocast is off."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def make_scaler(self) -> torch.amp.GradScaler | None:
        """A new ``GradScaler`` for fp16, else ``None``. Its ``state_dict`` belongs in every checkpoint."""
        return torch.amp.GradScaler(self.device_type) if self.needs_scaler else None

    def describe(self) -> str:
        if self.dtype is None:
            return f"fp32 on {self.device_type}"
        name = str(self.dtype).replace("torch.", "")
        return f"{name} autocast on {self.device_type}" + (" with GradScaler" if self.needs_scaler else "")


def resolve_amp(amp: object, amp_dtype: object = "auto", device: str | torch.device = "cpu") -> AmpPolicy:
    """Decide the autocast dtype for ``device`` from the bundle's ``amp`` (bool-like) and ``amp_dtype`` keys.

    Args:
        amp: ``true``/``false`` (strings from the command line accepted).
        amp_dtype: ``"auto"``, ``"float16"`` or ``"bfloat16"`` (aliases fp16/half/bf16).
        device: the training device.

    Raises:
        ValueError: for an unknown ``amp_dtype`` or a non-boolean ``amp``.
    """
    device_type = torch.device(device).type
    if device_type not in ("cuda", "cpu"):
        logger.warning("mixed precision is not supported on %s; training in fp32", device_type)
        return AmpPolicy(device_type, None)
    if not as_bool(amp):
        return AmpPolicy(device_type, None)
    key = str(amp_dtype).strip().lower()
    if key != "auto" and key not in _DTYPES:
        raise ValueError(f"amp_dtype {amp_dtype!r} is not one of: auto, float16, bfloat16")
    wanted = _DTYPES.get(key)
    if device_type == "cuda":
        if wanted == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            logger.warning("this GPU has no bf16 support; using fp16 autocast with a GradScaler instead")
            wanted = torch.float16
        return AmpPolicy("cuda", wanted or torch.float16)
    if wanted == torch.float16:
        logger.warning("fp16 autocast is not useful on CPU; using bf16 autocast instead")
    if not cpu_has_fast_bf16():
        if wanted is None:
            logger.info("this CPU has no native bf16 (AVX512-BF16/AMX); amp stays off on CPU")
            return AmpPolicy("cpu", None)
        logger.warning("this CPU has no native bf16; bf16 autocast will be emulated and may be slower than fp32")
    return AmpPolicy("cpu", torch.bfloat16)
