"""``python -m volcnn ARGS`` for one torchrun worker that also records its exit code, for the distributed tests.

torchrun reports the exit code of the first worker it sees fail and stops the others, so a test cannot learn every
rank's code from it. Each worker writes its code to ``$VOLCNN_RANK_RC_DIR/rank<RANK>`` and exits only when every
rank has written its own (no worker is stopped before it could), then with that code.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from volcnn.cli import main

if __name__ == "__main__":
    code = main(sys.argv[1:])
    folder = Path(os.environ["VOLCNN_RANK_RC_DIR"])
    tmp = folder / f".rank{os.environ['RANK']}"
    tmp.write_text(str(code))
    tmp.rename(folder / f"rank{os.environ['RANK']}")
    deadline = time.monotonic() + 120
    while len(list(folder.glob("rank*"))) < int(os.environ["WORLD_SIZE"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    sys.exit(code)
