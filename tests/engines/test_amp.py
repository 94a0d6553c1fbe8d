"""Unit tests of :mod:`volcnn.engines.amp`: which autocast dtype and scaler each device/option pair resolves to.

``resolve_amp`` only looks at the device type and ``torch.cuda.is_bf16_supported``, so the CUDA rows of the table
are checked on a CPU-only machine by passing ``"cuda"`` and monkeypatching the capability query.
"""

from __future__ import annotations

import logging

import pytest
import torch

import volcnn.engines.amp as amp_mod
from volcnn.engines.amp import AmpPolicy, resolve_amp


@pytest.fixture(autouse=True)
def _keep_torch_rng():
    """Building layers and inputs draws from torch's global generator."""
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


@pytest.fixture
def fast_bf16(monkeypatch):
    monkeypatch.setattr(amp_mod, "cpu_has_fast_bf16", lambda: True)


@pytest.fixture
def slow_bf16(monkeypatch):
    monkeypatch.setattr(amp_mod, "cpu_has_fast_bf16", lambda: False)


def _cuda_bf16(monkeypatch, supported: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)


@pytest.mark.parametrize("amp", [False, "false", "False", 0, "no"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_amp_off_gives_fp32_without_scaler(fast_bf16, amp, device):
    policy = resolve_amp(amp, "bfloat16", device)
    assert policy.dtype is None
    assert not policy.enabled
    assert not policy.needs_scaler
    assert policy.make_scaler() is None
    assert policy.device_type == device


@pytest.mark.parametrize("amp", [True, "true", "TRUE", 1, "yes"])
def test_cpu_auto_is_bf16_when_the_cpu_has_native_bf16(fast_bf16, amp):
    policy = resolve_amp(amp, "auto", "cpu")
    assert policy == AmpPolicy("cpu", torch.bfloat16)
    assert policy.enabled and not policy.needs_scaler
    assert policy.make_scaler() is None


@pytest.mark.parametrize("amp", [True, "true"])
def test_cpu_auto_stays_off_without_native_bf16(slow_bf16, amp, caplog):
    with caplog.at_level(logging.INFO, logger="volcnn.engines.amp"):
        policy = resolve_amp(amp, "auto", torch.device("cpu"))
    assert policy == AmpPolicy("cpu", None)
    assert "no native bf16" in caplog.text


def test_cpu_explicit_bf16_without_native_support_is_kept_with_a_warning(slow_bf16, caplog):
    with caplog.at_level(logging.WARNING, logger="volcnn.engines.amp"):
        policy = resolve_amp(True, "bf16", "cpu")
    assert policy.dtype == torch.bfloat16
    assert any(r.levelno == logging.WARNING and "emulated" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("dtype", ["float16", "fp16", "half", " Float16 "])
def test_cpu_float16_becomes_bf16_with_a_warning(fast_bf16, dtype, caplog):
    with caplog.at_level(logging.WARNING, logger="volcnn.engines.amp"):
        policy = resolve_amp(True, dtype, "cpu")
    assert policy == AmpPolicy("cpu", torch.bfloat16)
    assert policy.make_scaler() is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("fp16" in r.getMessage() and "bf16" in r.getMessage() for r in warnings)


def test_real_cpu_detection_matches_torch():
    expected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert amp_mod.cpu_has_fast_bf16() == expected
    policy = resolve_amp(True, "auto", "cpu")
    assert policy.dtype == (torch.bfloat16 if expected else None)


@pytest.mark.parametrize("dtype", ["float32", "int8", "bf8", "", None])
def test_unknown_amp_dtype_is_refused(dtype):
    with pytest.raises(ValueError, match="amp_dtype"):
        resolve_amp(True, dtype, "cpu")


def test_unknown_dtype_is_not_checked_when_amp_is_off():
    assert resolve_amp(False, "float32", "cpu").dtype is None


@pytest.mark.parametrize("amp", ["maybe", "enabled", "2x"])
def test_non_boolean_amp_is_refused(amp):
    with pytest.raises(ValueError, match="boolean"):
        resolve_amp(amp, "auto", "cpu")


@pytest.mark.parametrize("dtype", ["auto", "float16", "fp16"])
def test_cuda_auto_and_fp16_give_fp16_with_a_scaler(monkeypatch, dtype):
    _cuda_bf16(monkeypatch, True)  # even with bf16 available, auto means MONAI's fp16 behaviour
    policy = resolve_amp("true", dtype, "cuda")
    assert policy == AmpPolicy("cuda", torch.float16)
    assert policy.needs_scaler
    assert "GradScaler" in policy.describe()


def test_cuda_bf16_when_supported_needs_no_scaler(monkeypatch):
    _cuda_bf16(monkeypatch, True)
    policy = resolve_amp(True, "bfloat16", "cuda:0")
    assert policy == AmpPolicy("cuda", torch.bfloat16)
    assert not policy.needs_scaler
    assert policy.make_scaler() is None
    assert "GradScaler" not in policy.describe()


def test_cuda_bf16_unsupported_falls_back_to_fp16(monkeypatch, caplog):
    _cuda_bf16(monkeypatch, False)
    with caplog.at_level(logging.WARNING, logger="volcnn.engines.amp"):
        policy = resolve_amp(True, "bf16", "cuda")
    assert policy == AmpPolicy("cuda", torch.float16)
    assert policy.needs_scaler
    assert "no bf16 support" in caplog.text


def test_other_devices_train_in_fp32(caplog):
    with caplog.at_level(logging.WARNING, logger="volcnn.engines.amp"):
        policy = resolve_amp(True, "bfloat16", "meta")
    assert policy.dtype is None
    assert "not supported on meta" in caplog.text


def test_make_scaler_only_for_fp16():
    scaler = AmpPolicy("cpu", torch.float16).make_scaler()
    assert isinstance(scaler, torch.amp.GradScaler)
    assert scaler.is_enabled()
    assert AmpPolicy("cpu", torch.bfloat16).make_scaler() is None
    assert AmpPolicy("cpu", None).make_scaler() is None


def test_autocast_context_follows_the_policy():
    conv = torch.nn.Conv3d(1, 2, 3, padding=1)
    x = torch.randn(1, 1, 4, 4, 4)
    with AmpPolicy("cpu", torch.bfloat16).autocast():
        assert conv(x).dtype == torch.bfloat16
    with AmpPolicy("cpu", None).autocast():
        assert not torch.is_autocast_enabled("cpu")
        assert conv(x).dtype == torch.float32


def test_describe_names_dtype_and_device():
    assert AmpPolicy("cpu", None).describe() == "fp32 on cpu"
    assert AmpPolicy("cpu", torch.bfloat16).describe() == "bfloat16 autocast on cpu"
    assert AmpPolicy("cuda", torch.float16).describe() == "float16 autocast on cuda with GradScaler"
