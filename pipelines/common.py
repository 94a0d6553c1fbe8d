"""What the pipeline scripts share: the repository root, the process's memory, and measurements in a fresh child
interpreter that runs a sibling module and answers with one line of JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["REPO", "bundle_overrides", "child_env", "memory_mb", "module_command", "run_child", "run_step"]

#: the repository root (the folder holding ``pipelines/`` and ``volcnn/``)
REPO = Path(__file__).resolve().parents[1]


def module_command(module: str, *args: str) -> list[str]:
    """``python -m pipelines.<module> *args`` with this interpreter (``module`` e.g. ``"bench_train"``)."""
    return [sys.executable, "-m", f"pipelines.{module}", *args]


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment (plus ``extra``) with the repository root first on ``PYTHONPATH``.

    A child started by :func:`module_command` then imports ``pipelines`` and ``volcnn`` from this checkout whatever
    its working directory.
    """
    env = {**os.environ, **(extra or {})}
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *paths])
    return env


def run_child(
    module: str,
    args: Sequence[str],
    what: str,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
) -> Any:
    """One measurement in a fresh interpreter: ``python -m pipelines.<module> *args``; the JSON on its last stdout line.

    Args:
        what: names the measurement in the error.
        timeout: seconds before :class:`subprocess.TimeoutExpired` is raised (default: none).
        env: variables added to the child's environment (see :func:`child_env`).

    Raises:
        RuntimeError: ``"<what> failed (exit N): <the end of its stderr>"`` when the child fails or prints nothing.
    """
    done = subprocess.run(
        module_command(module, *args), capture_output=True, text=True, timeout=timeout, env=child_env(env)
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip()[-3000:]
        raise RuntimeError(f"{what} failed (exit {done.returncode}):\n{tail}")
    return json.loads(lines[-1])


def memory_mb() -> tuple[float, float]:
    """``(current, peak)`` resident set size of this process in MB: ``VmRSS`` and ``VmHWM`` on Linux.

    Not ``ru_maxrss``: Linux carries it over from the parent through fork and exec, so a child started by a large
    process (the benchmark, after synthesising the CT) would report the parent's size. Elsewhere ``ru_maxrss``
    stands in for both.
    """
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        mb = peak / 2**20 if sys.platform == "darwin" else peak / 2**10
        return mb, mb


def bundle_overrides(settings: Mapping[str, object]) -> list[str]:
    """``--key value`` for ``python -m monai.bundle run`` (its command line is parsed by fire: ``False``, not
    ``false``, is a boolean; a list is one argument without spaces)."""
    args = []
    for key, value in settings.items():
        text = json.dumps(value, separators=(",", ":")) if isinstance(value, list) else str(value)
        args += [f"--{key}", text]
    return args


def run_step(cmd: list[str], what: str, pipeline: str = "demo") -> None:
    """Run one step of a pipeline from the repository root, printing the command and its time; exits naming the
    step when it fails."""
    print(f"\n=== {what}\n$ {' '.join(cmd)}", flush=True)
    start = time.time()
    result = subprocess.run(cmd, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"{pipeline}: {what} failed with exit code {result.returncode}")
    print(f"=== {what}: {time.time() - start:.0f} s", flush=True)
