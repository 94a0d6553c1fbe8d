"""Compute section of the benchmark: one training step (forward + backward + AdamW) per network, patch, precision
and variant, on random data, with FLOPs, the fraction of the GPU's bf16 ceiling and the GPU's utilisation.

Variants: ``eager``; ``channels_last`` (model and input in ``torch.channels_last_3d``); ``compile``
(``torch.compile(model)``, its first step, which compiles forward and backward, reported apart as
``first_step_s``/``compile_s``). Precisions: ``fp32``, ``bf16`` (autocast), ``fp16`` (autocast + GradScaler, CUDA
only). Each configuration runs in a fresh process with empty Inductor/Triton caches, so peak memory and the
compile time are its own. On a shared machine, ``--interleave`` times the variants of one network, patch and
precision in one process, their steps in turn, so other load falls on all of them alike::

    python -m pipelines.bench_compute                      # CPU: valid_cnn3d,resnet10 at 32^3, fp32/bf16, 3 variants
    python -m pipelines.bench_compute --interleave --steps 12
    python -m pipelines.bench_compute --device cuda        # densenet121,resnet18 at 64^3,96^3, bf16/fp32
    python -m pipelines.bench_compute --networks resnet10 --variants eager,compile --steps 10 --out compute.json

FLOPs are model FLOPs (convolutions and matrix products, 2 per multiply-add) counted once per network and patch by
``torch.utils.flop_counter.FlopCounterMode`` on the meta device: batch norm, activations, pooling and the optimiser
are not counted. The ceiling fraction is achieved FLOP/s over the GPU's dense bf16 tensor-core peak (fp32 runs are
shown against the same bf16 peak, as a reference). GPU utilisation is ``nvidia-smi``'s ``utilization.gpu``: the
share of time some kernel was running, not how busy the SMs were.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.common import memory_mb, run_child
from volcnn.networks import create_network

PRECISIONS = ("fp32", "bf16", "fp16")
VARIANTS = ("eager", "channels_last", "compile")

#: Dense (no 2:4 sparsity) bf16 tensor-core peaks, FLOP/s, from NVIDIA's datasheets (which print the sparse figure,
#: twice these). Checked in order, first match on the upper-cased ``torch.cuda.get_device_name()``; ``None`` means
#: not known here (H100/H200 NVL boards run at lower clocks; their dense figure is not in this table).
BF16_PEAKS: tuple[tuple[str, float | None], ...] = (
    ("H100 NVL", None),
    ("H200 NVL", None),
    ("H100 PCIE", 756e12),
    ("H100", 989.4e12),  # SXM5, "NVIDIA H100 80GB HBM3"
    ("H200", 989.4e12),  # SXM, same compute as the H100 SXM; also matches GH200
    ("A100", 312e12),  # SXM4 and PCIe
)


def peak_bf16_flops(gpu_name: str | None) -> float | None:
    """Dense bf16 peak FLOP/s of the GPU named ``gpu_name``, or ``None`` when not in :data:`BF16_PEAKS`."""
    if not gpu_name:
        return None
    name = gpu_name.upper()
    for key, peak in BF16_PEAKS:
        if key in name:
            return peak
    return None


# ----------------------------------------------------------------------------------------------------------- FLOPs


def _build(network: str | nn.Module, patch: int, in_channels: int, num_classes: int) -> nn.Module:
    if isinstance(network, nn.Module):
        return network
    return create_network(network, in_channels=in_channels, num_classes=num_classes, spatial_size=(patch,) * 3)


def count_flops(
    network: str | nn.Module,
    patch: int,
    *,
    in_channels: int = 1,
    num_classes: int = 2,
    batch: int = 2,
    device: str = "meta",
) -> dict[str, float]:
    """Model FLOPs per sample of one forward and of forward + backward, by ``FlopCounterMode``.

    A registry name is built on ``device`` (the meta device by default: no memory, no arithmetic); a module is used
    where it is. Counted at ``batch`` (2: batch norm in training mode needs more than one value per channel at a
    1^3 feature map) and divided by it. The backward is of ``output.sum()``; the input needs no gradient, so the
    first convolution's backward computes the weight gradient only, as in training.

    Returns:
        ``{"forward": f, "forward_backward": fb}``, FLOPs per sample.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if isinstance(network, nn.Module):
        model = network
        dev = next(iter(model.parameters()), torch.empty(0)).device
    else:
        dev = torch.device(device)
        with dev:
            model = _build(network, patch, in_channels, num_classes)
    model.train()
    x = torch.randn(batch, in_channels, patch, patch, patch, device=dev)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        forward = counter.get_total_flops()
        out.float().sum().backward()
        total = counter.get_total_flops()
    return {"forward": forward / batch, "forward_backward": total / batch}


# ------------------------------------------------------------------------------------------------- GPU utilisation


class UtilisationSamples:
    """Samples of ``utilization.gpu`` (%) and ``memory.used`` (MiB) taken during a :func:`gpu_utilisation` block."""

    def __init__(self, backend: str | None) -> None:
        self.backend = backend
        self.util: list[float] = []
        self.mem_mib: list[float] = []

    def summary(self) -> dict[str, Any] | None:
        """``{"mean", "median", "max_memory_used_mib", "samples", "backend"}``, or ``None`` with no samples."""
        if not self.util:
            return None
        return {
            "mean": statistics.fmean(self.util),
            "median": statistics.median(self.util),
            "max_memory_used_mib": max(self.mem_mib) if self.mem_mib else None,
            "samples": len(self.util),
            "backend": self.backend,
        }


def _gpu_id(device_index: int | None) -> str | None:
    """The nvidia-smi id of the CUDA device torch sees as ``device_index``: its UUID where torch gives it."""
    if device_index is None:
        if not torch.cuda.is_available():
            return None
        device_index = torch.cuda.current_device()
    with contextlib.suppress(Exception):
        uuid = str(torch.cuda.get_device_properties(device_index).uuid)
        return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
    return str(device_index)


@contextlib.contextmanager
def gpu_utilisation(interval_ms: int = 100, device_index: int | None = None) -> Iterator[UtilisationSamples]:
    """Sample the GPU's utilisation while the block runs, by pynvml if importable, else ``nvidia-smi -lms``.

    Yields a :class:`UtilisationSamples`; after the block ``samples.summary()`` is the mean/median utilisation, or
    ``None`` when there is no pynvml/nvidia-smi, no GPU, or no sample came in (a block shorter than the interval).
    Never raises for a missing tool.
    """
    gpu = _gpu_id(device_index)
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        if gpu and gpu.startswith("GPU-"):
            handle = pynvml.nvmlDeviceGetHandleByUUID(gpu)
        else:
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(gpu or 0))
    except Exception:  # no pynvml, no driver, unknown device: fall back to nvidia-smi
        handle = None
    if handle is not None:
        samples = UtilisationSamples("pynvml")
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                with contextlib.suppress(Exception):
                    samples.util.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))
                    samples.mem_mib.append(pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20)
                stop.wait(interval_ms / 1000)

        try:
            with _sampling(samples, poll, stop.set):
                yield samples
        finally:
            with contextlib.suppress(Exception):
                pynvml.nvmlShutdown()
        return

    smi = shutil.which("nvidia-smi")
    if smi is None:
        yield UtilisationSamples(None)
        return
    samples = UtilisationSamples("nvidia-smi")
    cmd = [smi, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", f"-lms={interval_ms}"]
    if gpu is not None:
        cmd.append(f"--id={gpu}")
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    except OSError:
        yield UtilisationSamples(None)
        return

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            with contextlib.suppress(ValueError, IndexError):
                util, mem = float(parts[0]), float(parts[1])
                samples.util.append(util)
                samples.mem_mib.append(mem)

    def end() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    with _sampling(samples, read, end):
        yield samples


@contextlib.contextmanager
def _sampling(
    samples: UtilisationSamples, poll: Callable[[], None], stop: Callable[[], None]
) -> Iterator[UtilisationSamples]:
    """Run ``poll`` (which appends to ``samples``) in a daemon thread while the block runs; then ``stop`` it."""
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop()
        thread.join(timeout=5)


# -------------------------------------------------------------------------------------------------- one step timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_mb() -> float:
    return memory_mb()[1]


class _Trainer:
    """One network's training step (zero_grad, forward, CrossEntropyLoss, backward, AdamW) on fixed random data."""

    def __init__(
        self,
        network: str | nn.Module,
        patch: int,
        batch: int,
        device: torch.device,
        precision: str,
        variant: str,
        *,
        lr: float = 1e-4,
        in_channels: int = 1,
        num_classes: int = 2,
        seed: int = 0,
    ) -> None:
        torch.manual_seed(seed)
        fmt = torch.channels_last_3d if variant == "channels_last" else torch.contiguous_format
        self.model = _build(network, patch, in_channels, num_classes).to(device).train()
        if variant == "channels_last":
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        self.x = torch.randn(batch, in_channels, patch, patch, patch, device=device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, num_classes, (batch,), device=device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr)
        self.loss_fn = nn.CrossEntropyLoss()
        self.device = device
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.variant = variant
        self.forward: Any = None

    def step(self) -> torch.Tensor:
        """One step; the first call of ``compile`` compiles (lazily, forward and backward, inside this call)."""
        if self.forward is None:
            self.forward = torch.compile(self.model) if self.variant == "compile" else self.model
        self.optimizer.zero_grad(set_to_none=True)
        dtype = self.amp_dtype or torch.float32
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.amp_dtype is not None):
            logits = self.forward(self.x)
        loss = self.loss_fn(logits.float(), self.y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return loss.detach()

    def timed_step(self) -> tuple[float, torch.Tensor]:
        _sync(self.device)
        t0 = time.perf_counter()
        loss = self.step()
        _sync(self.device)
        return time.perf_counter() - t0, loss


def _check(device: str | torch.device, precision: str, variants: Sequence[str]) -> torch.device:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    for variant in variants:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    dev = torch.device(device)
    if precision == "fp16" and dev.type != "cuda":
        raise ValueError("fp16 (with GradScaler) is measured on CUDA only; use bf16 on CPU")
    return dev


def _new_result(network: str | nn.Module, patch: int, batch: int, dev: torch.device, precision: str, variant: str,
                steps: int, warmup: int, mode: str) -> dict[str, Any]:  # fmt: skip
    name = network if isinstance(network, str) else type(network).__name__
    result: dict[str, Any] = {
        "network": name, "patch": patch, "batch": batch, "device": str(dev), "precision": precision,
        "variant": variant, "mode": mode, "steps": steps, "warmup": warmup, "threads": torch.get_num_threads(),
        "samples_per_s": None, "step_s": None, "best_step_s": None, "step_times_s": [], "first_step_s": None,
        "compile_s": None, "peak_mem_mb": None,
        "peak_mem_kind": "cuda_max_allocated" if dev.type == "cuda" else "process_peak_rss",
        "gpu_util": None, "final_loss": None, "error": None,
    }  # fmt: skip
    if dev.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(dev)
    return result


def _finish(result: dict[str, Any], times: list[float], loss: torch.Tensor | None) -> None:
    if result["error"] is None and times:
        med = statistics.median(times)
        result.update(step_s=med, best_step_s=min(times), step_times_s=times, samples_per_s=result["batch"] / med)
        if result["variant"] == "compile" and result["first_step_s"] is not None:
            result["compile_s"] = max(0.0, result["first_step_s"] - med)
        result["final_loss"] = None if loss is None else float(loss)


def _peak_mem_mb(dev: torch.device) -> float:
    return torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else _peak_rss_mb()


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def _release(compiled: bool) -> None:
    if compiled:
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_step(
    network: str | nn.Module,
    patch: int,
    batch: int,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    variant: str = "eager",
    steps: int = 5,
    warmup: int = 2,
    *,
    lr: float = 1e-4,
    in_channels: int = 1,
    num_classes: int = 2,
    sample_utilisation: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Time ``steps`` training steps (zero_grad, forward, CrossEntropyLoss, backward, AdamW step) after ``warmup``.

    Args:
        network: registry name (built for ``patch``) or a module (moved to ``device``).
        patch: cubic patch side P; inputs are ``randn(batch, in_channels, P, P, P)``, labels ``randint(num_classes)``.
        batch: samples per step.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        precision: ``"fp32"``; ``"bf16"`` (autocast); ``"fp16"`` (autocast and GradScaler, CUDA only).
        variant: ``"eager"``; ``"channels_last"`` (model and input in ``channels_last_3d``); ``"compile"``
            (``torch.compile(model)``).
        steps: timed steps; their median time gives ``samples_per_s``.
        warmup: untimed steps before them (at least 1); the first is timed alone as ``first_step_s`` (for
            ``compile`` it includes compiling forward and backward).
        sample_utilisation: on CUDA, sample the GPU's utilisation during the timed steps.

    Returns:
        dict with ``samples_per_s`` (batch / median step), ``step_s`` (median), ``best_step_s`` (the fastest: on a
        shared machine other load only adds time), ``step_times_s``, ``first_step_s``, ``compile_s``
        (``first_step_s - step_s`` for ``compile``, else ``None``), ``peak_mem_mb`` and ``peak_mem_kind``
        (``"cuda_max_allocated"``, or ``"process_peak_rss"``: the whole process's lifetime peak), ``gpu_util``
        (:meth:`UtilisationSamples.summary`), ``final_loss``, ``error`` (``None``, or the exception text when
        building, compiling or stepping failed; the timings are then ``None``) and the configuration.

    Raises:
        ValueError: for an unknown precision or variant, or fp16 off CUDA.
    """
    dev = _check(device, precision, [variant])
    warmup = max(1, int(warmup))
    result = _new_result(network, patch, batch, dev, precision, variant, steps, warmup, "isolated")
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    times: list[float] = []
    loss = None
    try:
        trainer = _Trainer(network, patch, batch, dev, precision, variant, lr=lr, in_channels=in_channels,
                           num_classes=num_classes, seed=seed)  # fmt: skip
        result["first_step_s"], loss = trainer.timed_step()
        for _ in range(warmup - 1):
            trainer.step()
        sampling = dev.type == "cuda" and sample_utilisation
        with gpu_utilisation(device_index=dev.index) if sampling else contextlib.nullcontext() as util:
            for _ in range(steps):
                seconds, loss = trainer.timed_step()
                times.append(seconds)
        result["gpu_util"] = util.summary() if util is not None else None
    except Exception as exc:  # compile (gcc, triton) and out-of-memory failures are results, not crashes
        result["error"] = _error(exc)
    finally:
        trainer = None  # type: ignore[assignment]
    _finish(result, times, loss)
    result["peak_mem_mb"] = _peak_mem_mb(dev)
    loss = None
    _release(variant == "compile")
    return result


def measure_interleaved(
    network: str | nn.Module,
    patch: int,
    batch: int,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    variants: Sequence[str] = VARIANTS,
    steps: int = 5,
    warmup: int = 2,
    *,
    lr: float = 1e-4,
    in_channels: int = 1,
    num_classes: int = 2,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """:func:`measure_step` for several variants in one process, their timed steps taken in turn (A B C A B C ...).

    On a shared machine, load from other processes then falls on every variant alike, so their ratios hold where
    separate runs minutes apart do not. Every variant keeps its own model, optimiser and data. Peak memory is the
    whole process's, over all variants; GPU utilisation is not sampled. A variant that fails is recorded with its
    ``error`` and leaves the rotation.

    Returns:
        one :func:`measure_step`-shaped dict per variant, ``mode == "interleaved"``.
    """
    dev = _check(device, precision, variants)
    warmup = max(1, int(warmup))
    results = {v: _new_result(network, patch, batch, dev, precision, v, steps, warmup, "interleaved") for v in variants}
    trainers: dict[str, _Trainer] = {}
    times: dict[str, list[float]] = {v: [] for v in variants}
    losses: dict[str, torch.Tensor] = {}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for v in variants:
        try:
            trainers[v] = _Trainer(network, patch, batch, dev, precision, v, lr=lr, in_channels=in_channels,
                                   num_classes=num_classes, seed=seed)  # fmt: skip
            results[v]["first_step_s"], losses[v] = trainers[v].timed_step()
            for _ in range(warmup - 1):
                trainers[v].step()
        except Exception as exc:
            results[v]["error"] = _error(exc)
            trainers.pop(v, None)
    for _ in range(steps):
        for v in list(trainers):
            try:
                seconds, losses[v] = trainers[v].timed_step()
                times[v].append(seconds)
            except Exception as exc:
                results[v]["error"] = _error(exc)
                del trainers[v]
    trainers.clear()
    for v in variants:
        _finish(results[v], times[v], losses.get(v))
        results[v]["peak_mem_mb"] = _peak_mem_mb(dev)
        results[v]["peak_mem_kind"] += " (all variants)"
    losses.clear()
    _release("compile" in variants)
    return [results[v] for v in variants]


# -------------------------------------------------------------------------------------------------------- run all


def _defaults(device: str) -> dict[str, Any]:
    if device.startswith("cuda"):
        return {"networks": ["densenet121", "resnet18"], "patches": [64, 96], "precisions": ["bf16", "fp32"],
                "steps": 20}  # fmt: skip
    return {"networks": ["valid_cnn3d", "resnet10"], "patches": [32], "precisions": ["fp32", "bf16"], "steps": 5}


def _child(config: dict[str, Any], timeout_s: float, cold_compile_cache: bool = True) -> list[dict[str, Any]]:
    """:func:`measure_step` (``config["variant"]``) or :func:`measure_interleaved` (``config["variants"]``) in a
    fresh interpreter; a crash or timeout becomes an ``error`` result per variant.

    With ``cold_compile_cache`` the child gets empty Inductor and Triton caches, so ``first_step_s`` of ``compile``
    is a first compile on this machine, not a cache hit from an earlier run (tens of seconds vs a few on CPU).
    """
    variants = config.get("variants") or [config["variant"]]
    with tempfile.TemporaryDirectory(prefix="bench_compute_") as tmp:
        caches = {"TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor"), "TRITON_CACHE_DIR": str(Path(tmp) / "triton")}
        try:
            out = run_child("bench_compute", ["--child", json.dumps(config)], "compute child", timeout=timeout_s,
                            env=caches if cold_compile_cache else None)  # fmt: skip
            return out if isinstance(out, list) else [out]
        except subprocess.TimeoutExpired:
            error = f"timeout after {timeout_s:.0f} s"
        except RuntimeError as exc:
            error = str(exc)
    base = {k: v for k, v in config.items() if k != "variants"}
    return [{**base, "variant": v, "error": error} for v in variants]


def run(
    device: str = "cpu",
    networks: Sequence[str] | None = None,
    patches: Sequence[int] | None = None,
    batch: int = 16,
    precisions: Sequence[str] | None = None,
    variants: Sequence[str] | None = None,
    steps: int | None = None,
    warmup: int = 2,
    *,
    isolate: bool = True,
    interleave: bool = False,
    cold_compile_cache: bool = True,
    timeout_s: float = 1800,
    verbose: bool = False,
) -> dict[str, Any]:
    """Measure every network x patch x precision x variant; ``None`` arguments take the device's defaults.

    Args:
        device: ``"cpu"`` or ``"cuda"`` (defaults then: densenet121,resnet18 at 64, 96; bf16 and fp32; 20 steps).
        isolate: run each configuration in a fresh process (peak memory, compile caches and allocator its own).
        interleave: run the variants of one network, patch and precision together, their timed steps in turn
            (:func:`measure_interleaved`): the fair comparison on a shared machine; peak memory is then shared.
        cold_compile_cache: isolated runs start with empty Inductor/Triton caches (see :func:`_child`).
        timeout_s: per child process, when isolated.
        verbose: print one line per configuration as it finishes.

    Returns:
        ``{"config", "environment", "flops", "peak_bf16_flops", "peak_note", "results"}``; ``flops`` maps
        ``"network@patch"`` to :func:`count_flops`; each result is :func:`measure_step`'s dict plus
        ``flops_per_sample`` (forward + backward), ``achieved_tflops``, ``fraction_of_bf16_peak`` (CUDA with a
        known peak, else ``None``), ``speedup_vs_eager`` (same network, patch, precision) and
        ``speedup_vs_fp32_eager``.
    """
    d = _defaults(device)
    networks = list(networks or d["networks"])
    patches = [int(p) for p in (patches or d["patches"])]
    precisions = list(precisions or d["precisions"])
    variants = list(variants or VARIANTS)
    steps = int(steps or d["steps"])
    env: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "processor": platform.processor(), "threads": torch.get_num_threads(), "gpu": None,
    }  # fmt: skip
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
        env["cuda"] = torch.version.cuda
        if not isolate:  # isolated, the children name the GPU: no CUDA context held here while they run
            env["gpu"] = torch.cuda.get_device_name(torch.device(device))

    flops: dict[str, Any] = {}
    for net in networks:
        for p in patches:
            try:
                flops[f"{net}@{p}"] = count_flops(net, p)
            except Exception:  # a network the meta device cannot build: count on the CPU
                try:
                    flops[f"{net}@{p}"] = count_flops(net, p, device="cpu")
                except Exception as exc:
                    flops[f"{net}@{p}"] = {"error": f"{type(exc).__name__}: {exc}"}

    results = []
    for net in networks:
        for p in patches:
            for prec in precisions:
                cfg = {"network": net, "patch": p, "batch": batch, "device": device, "precision": prec,
                       "steps": steps, "warmup": warmup}  # fmt: skip
                single = [{**cfg, "variant": var} for var in variants]
                group = [{**cfg, "variants": variants}] if interleave else single
                for c in group:
                    if isolate:
                        measured = _child(c, timeout_s, cold_compile_cache)
                    elif interleave:
                        measured = measure_interleaved(**c)
                    else:
                        measured = [measure_step(**c)]
                    fb = flops[f"{net}@{p}"].get("forward_backward")
                    for r in measured:
                        r["flops_per_sample"] = fb
                        rate = r.get("samples_per_s")
                        r["achieved_tflops"] = fb * rate / 1e12 if fb and rate else None
                        results.append(r)
                        if verbose:
                            print(_row(r), file=sys.stderr, flush=True)
    if device.startswith("cuda") and env["gpu"] is None:
        env["gpu"] = next((r["gpu"] for r in results if r.get("gpu")), None)
    peak = peak_bf16_flops(env["gpu"])
    if not device.startswith("cuda"):
        note = "CPU run: no tensor-core ceiling"
    elif peak is None:
        note = f"no dense bf16 peak known for {env['gpu']!r}: ceiling fraction not reported"
    else:
        note = f"{env['gpu']}: dense bf16 peak {peak / 1e12:.1f} TFLOP/s (NVIDIA datasheet, without sparsity)"
    for r in results:
        r["fraction_of_bf16_peak"] = r["achieved_tflops"] * 1e12 / peak if peak and r["achieved_tflops"] else None
        base = [q for q in results if q["network"] == r["network"] and q["patch"] == r["patch"]
                and q["variant"] == "eager" and q.get("samples_per_s")]  # fmt: skip
        same = [q for q in base if q["precision"] == r["precision"]]
        fp32 = [q for q in base if q["precision"] == "fp32"]
        rate = r.get("samples_per_s")
        r["speedup_vs_eager"] = rate / same[0]["samples_per_s"] if rate and same else None
        r["speedup_vs_fp32_eager"] = rate / fp32[0]["samples_per_s"] if rate and fp32 else None
    config = {"device": device, "networks": networks, "patches": patches, "batch": batch, "precisions": precisions,
              "variants": variants, "steps": steps, "warmup": warmup, "isolate": isolate, "interleave": interleave,
              "cold_compile_cache": cold_compile_cache}  # fmt: skip
    return {"config": config, "environment": env, "flops": flops, "peak_bf16_flops": peak, "peak_note": note,
            "results": results}  # fmt: skip


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    if value is None:
        return format("-", f">{spec.split('.')[0]}") + " " * len(suffix)
    return format(value, spec) + suffix


HEADER = (
    f"{'network':12} {'patch':>5} {'prec':5} {'variant':13} {'samples/s':>9} {'step ms':>8} {'best ms':>7} "
    f"{'vs eager':>8} {'vs fp32':>7} {'1st step s':>10} {'peak MB':>8} {'TFLOP/s':>8} {'% peak':>6} {'GPU util':>8}"
)


def _row(r: dict[str, Any]) -> str:
    if r.get("error"):
        return f"{r['network']:12} {r['patch']:>5} {r['precision']:5} {r['variant']:13} ERROR {r['error'][:150]}"
    frac = r.get("fraction_of_bf16_peak")
    util = (r.get("gpu_util") or {}).get("mean")
    step_ms = r["step_s"] * 1e3 if r.get("step_s") else None
    best_ms = r["best_step_s"] * 1e3 if r.get("best_step_s") else None
    return (
        f"{r['network']:12} {r['patch']:>5} {r['precision']:5} {r['variant']:13} {_fmt(r['samples_per_s'], '9.1f')} "
        f"{_fmt(step_ms, '8.0f')} {_fmt(best_ms, '7.0f')} {_fmt(r.get('speedup_vs_eager'), '7.2f', 'x')} "
        f"{_fmt(r.get('speedup_vs_fp32_eager'), '6.2f', 'x')} "
        f"{_fmt(r.get('first_step_s'), '10.1f')} {_fmt(r.get('peak_mem_mb'), '8.0f')} "
        f"{_fmt(r.get('achieved_tflops'), '8.3f')} {_fmt(frac * 100 if frac else None, '6.1f')} {_fmt(util, '8.0f')}"
    )


def print_table(report: dict[str, Any]) -> None:
    """The results of :func:`run` as a text table."""
    c, env = report["config"], report["environment"]
    where = env["gpu"] or f"CPU {env['processor'] or env['machine']}, {env['threads']} threads"
    print(f"\ntraining step (fwd+bwd+AdamW), batch {c['batch']}, {c['steps']} timed steps after {c['warmup']}, {where}")
    print(report["peak_note"])
    for key, f in report["flops"].items():
        if "error" in f:
            print(f"  {key}: FLOPs not counted ({f['error'][:100]})")
        else:
            print(f"  {key}: {f['forward'] / 1e9:.2f} GFLOP forward, {f['forward_backward'] / 1e9:.2f} GFLOP fwd+bwd "
                  "per sample")  # fmt: skip
    print(HEADER)
    for r in report["results"]:
        print(_row(r))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--networks", default=None, help="comma list (cpu: valid_cnn3d,resnet10; cuda: densenet121,...)")
    p.add_argument("--patches", default=None, help="comma list of cubic patch sides (cpu: 32; cuda: 64,96)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precisions", default=None, help="comma list of fp32,bf16,fp16 (cpu: fp32,bf16; cuda: bf16,fp32)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of eager,channels_last,compile")
    p.add_argument("--steps", type=int, default=None, help="timed steps (cpu: 5; cuda: 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one is reported apart)")
    p.add_argument("--no-isolate", action="store_true", help="run every configuration in this process")
    p.add_argument("--interleave", action="store_true", help="time the variants together, steps in turn (fair on a "
                   "shared machine)")  # fmt: skip
    p.add_argument("--warm-compile-cache", action="store_true", help="let compile reuse Inductor's on-disk cache")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # one configuration; JSON on the last stdout line
        config = json.loads(args.child)
        print(json.dumps(measure_interleaved(**config) if "variants" in config else measure_step(**config)))
        return 0

    def split(s: str | None) -> list[str] | None:
        return [v.strip() for v in s.split(",") if v.strip()] if s else None

    patches = split(args.patches)
    report = run(
        device=args.device, networks=split(args.networks), patches=[int(v) for v in patches] if patches else None,
        batch=args.batch, precisions=split(args.precisions), variants=split(args.variants), steps=args.steps,
        warmup=args.warmup, isolate=not args.no_isolate, interleave=args.interleave,
        cold_compile_cache=not args.warm_compile_cache, timeout_s=args.timeout, verbose=True,
    )  # fmt: skip
    print_table(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
