"""pipelines.bench_compute: FLOP counting, the peak table, GPU sampling without a GPU, one timed step."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipelines import bench_compute as bench

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_conv3d_forward_flops_are_two_per_multiply_add():
    conv = nn.Conv3d(1, 8, 3, padding=1)
    x = torch.randn(1, 1, 6, 6, 6)
    expected = 2 * 1 * 8 * 27 * 6**3  # 2 * Cin * Cout * k^3 * output voxels
    with FlopCounterMode(display=False) as counter:
        conv(x)
    assert counter.get_total_flops() == expected
    counted = bench.count_flops(conv, 6, batch=1)
    assert counted["forward"] == expected
    # the input needs no gradient: the backward computes the weight gradient only, as many FLOPs as the forward
    assert counted["forward_backward"] == 2 * expected


def test_network_forward_backward_exceeds_forward_and_meta_matches_cpu():
    meta = bench.count_flops("valid_cnn3d", 32)
    assert meta["forward"] > 0
    assert meta["forward"] < meta["forward_backward"] <= 3 * meta["forward"]
    assert bench.count_flops("valid_cnn3d", 32, device="cpu") == meta


def test_peak_table():
    assert bench.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert bench.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert bench.peak_bf16_flops("NVIDIA H200") == 989.4e12
    assert bench.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert bench.peak_bf16_flops("NVIDIA H100 NVL") is None
    assert bench.peak_bf16_flops("NVIDIA GeForce RTX 3090") is None
    assert bench.peak_bf16_flops(None) is None


def test_gpu_utilisation_without_gpu_is_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)
    with bench.gpu_utilisation(interval_ms=10) as samples:
        sum(range(1000))
    assert samples.summary() is None


def test_gpu_utilisation_summary():
    samples = bench.UtilisationSamples("nvidia-smi")
    samples.util += [10.0, 50.0, 90.0]
    samples.mem_mib += [100.0, 300.0, 200.0]
    assert samples.summary() == {
        "mean": 50.0, "median": 50.0, "max_memory_used_mib": 300.0, "samples": 3, "backend": "nvidia-smi"
    }  # fmt: skip


@pytest.mark.parametrize(("precision", "variant"), [("fp32", "eager"), ("bf16", "channels_last")])
def test_measure_step_cpu(precision, variant):
    r = bench.measure_step("valid_cnn3d", 32, 2, "cpu", precision, variant, steps=2, warmup=1)
    assert r["error"] is None
    assert len(r["step_times_s"]) == 2 and r["samples_per_s"] > 0 and r["first_step_s"] > 0
    assert r["peak_mem_kind"] == "process_peak_rss" and r["peak_mem_mb"] > 0
    assert r["gpu_util"] is None and r["compile_s"] is None


def test_compile_failure_is_recorded(monkeypatch):
    def broken(model, *args, **kwargs):
        def call(*a, **k):
            raise RuntimeError("no compiler here")

        return call

    monkeypatch.setattr(bench.torch, "compile", broken)
    r = bench.measure_step("valid_cnn3d", 32, 2, "cpu", "fp32", "compile", steps=1, warmup=1)
    assert r["samples_per_s"] is None
    assert "no compiler here" in r["error"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="CUDA only"):
        bench.measure_step("valid_cnn3d", 32, 2, "cpu", "fp16", "eager")
    with pytest.raises(ValueError, match="variant"):
        bench.measure_step("valid_cnn3d", 32, 2, "cpu", "fp32", "jit")


def test_run_in_process():
    report = bench.run(
        "cpu", ["valid_cnn3d"], [32], batch=2, precisions=["fp32"], variants=["eager"], steps=1, warmup=1,
        isolate=False,
    )  # fmt: skip
    (r,) = report["results"]
    assert report["flops"]["valid_cnn3d@32"]["forward_backward"] == r["flops_per_sample"]
    assert r["achieved_tflops"] > 0 and r["fraction_of_bf16_peak"] is None and report["peak_bf16_flops"] is None
    assert r["speedup_vs_eager"] == 1.0 and r["speedup_vs_fp32_eager"] == 1.0


def test_measure_interleaved_cpu():
    results = bench.measure_interleaved("valid_cnn3d", 32, 2, "cpu", "bf16", ["eager", "channels_last"], steps=2)
    assert [r["variant"] for r in results] == ["eager", "channels_last"]
    for r in results:
        assert r["error"] is None and r["mode"] == "interleaved" and len(r["step_times_s"]) == 2
        assert r["peak_mem_kind"] == "process_peak_rss (all variants)"


def test_run_interleaved_in_process():
    report = bench.run(
        "cpu", ["valid_cnn3d"], [32], batch=2, precisions=["fp32"], variants=["eager", "channels_last"], steps=1,
        warmup=1, isolate=False, interleave=True,
    )  # fmt: skip
    eager, cl = report["results"]
    assert eager["speedup_vs_eager"] == 1.0
    assert cl["speedup_vs_eager"] == pytest.approx(cl["samples_per_s"] / eager["samples_per_s"])


@pytest.mark.slow
def test_child_crash_becomes_error():
    config = {"network": "valid_cnn3d", "patch": 32, "batch": 2, "device": "cpu", "precision": "fp16",
              "variants": ["eager", "compile"], "steps": 1, "warmup": 1}  # fmt: skip
    results = bench._child(config, timeout_s=300)
    assert [r["variant"] for r in results] == ["eager", "compile"]
    assert all("CUDA only" in r["error"] for r in results)


@pytest.mark.slow
def test_cli_isolated_with_compile(tmp_path):
    out = tmp_path / "compute.json"
    argv = ["--networks", "valid_cnn3d", "--batch", "2", "--precisions", "fp32", "--variants", "eager,compile",
            "--steps", "1", "--warmup", "1", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    import json

    results = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in results] == ["eager", "compile"]
    assert all(r["error"] is None for r in results)
    assert results[1]["compile_s"] is not None


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(("precision", "variant"), [("fp16", "eager"), ("bf16", "channels_last")])
def test_measure_step_cuda(precision, variant):
    r = bench.measure_step("resnet10", 32, 4, "cuda", precision, variant, steps=3, warmup=1)
    assert r["error"] is None and r["samples_per_s"] > 0
    assert r["peak_mem_kind"] == "cuda_max_allocated" and r["peak_mem_mb"] > 0
    assert r["gpu"] == torch.cuda.get_device_name()


@pytest.mark.gpu
@cuda
def test_gpu_utilisation_on_gpu():
    with bench.gpu_utilisation(interval_ms=50) as samples:
        a = torch.randn(4096, 4096, device="cuda")
        for _ in range(200):
            a = a @ a
            a = a / a.norm()
        torch.cuda.synchronize()
    summary = samples.summary()
    if summary is not None:
        assert 0 <= summary["mean"] <= 100
