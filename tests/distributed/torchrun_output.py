"""What a failed torchrun job printed, for the distributed tests' assertion messages.

torchrun's closing summary fills the last lines of stderr, so the tail alone hides the cause (a Python traceback or
a C++ ``terminate called ... what(): ...`` from one worker). The report keeps every line that names an error, then
the tails.
"""

from __future__ import annotations

import re
import subprocess

_CAUSE = re.compile(r"terminate called|what\(\)|Traceback|Error|Exception|Abort|Signal|Killed|core dumped")


def failure_report(done: subprocess.CompletedProcess, tail: int = 3000, causes: int = 60) -> str:
    """``done``'s exit code, up to ``causes`` lines that name an error (in order, from stdout and stderr), then the
    last ``tail`` characters of each stream."""
    lines = [line for text in (done.stdout or "", done.stderr or "") for line in text.splitlines()]
    found = [line for line in lines if _CAUSE.search(line)][:causes]
    out, err = done.stdout or "", done.stderr or ""
    parts = [f"exit code {done.returncode}", "--- lines naming an error:", *found]
    return "\n".join([*parts, "--- stdout tail:", out[-tail:], "--- stderr tail:", err[-tail:]])
