"""A supervisor for the commands that write a model file (``merge``, ``cross-merge``, ``train-diff``, ``demo``).

Inputs are memory-mapped, so an input truncated by another program while a tensor is being read makes the kernel
kill the process with SIGBUS: no Python code runs, nothing is said, and the temporary output stays. The console
command therefore runs such a command in a child process and waits. Signals reach only this parent (the child has
its own session) and are passed on one by one, so Ctrl-C, a second Ctrl-C, SIGTERM and SIGHUP behave exactly as
documented. When the child dies of a signal instead of exiting, the parent says what happened in one line,
removes the temporary files of processes that no longer exist beside the output, and exits with status 2.

The parent imports neither torch nor the engine's merge code; on Linux the child also stops (SIGTERM) when the
parent is killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import List, Optional, Sequence

CHILD_ENV = "MODEL_MERGER_SUPERVISED"
WRITING = {"merge", "cross-merge", "train-diff", "demo", "extract-lora", "merge-loras", "verify"}
FORWARDED = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))

CRASHES = {
    "SIGBUS": "an input file was truncated or overwritten while it was being read (bus error)",
    "SIGSEGV": "the merge process crashed (segmentation fault)",
    "SIGKILL": "the merge process was killed (SIGKILL; the out-of-memory killer does this when memory runs out)",
}


def wants_supervisor(argv: Sequence[str]) -> bool:
    if os.name != "posix" or os.environ.get(CHILD_ENV) == "1":
        return False
    command = next((a for a in argv if not a.startswith("-")), None)
    return command in WRITING


def _outputs(argv: Sequence[str], build_parser) -> List[str]:
    """The model files the command would write (where the child's temporary files are)."""
    try:
        args, _ = build_parser().parse_known_args(list(argv))
    except SystemExit:
        return []
    out = getattr(args, "output", None)
    if out:
        return [os.path.abspath(out)]
    if getattr(args, "dir", None):
        return [os.path.join(os.path.abspath(args.dir), "merged.safetensors")]
    return []


def _pdeathsig() -> None:  # in the child, before exec: stop when the parent dies (Linux)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_supervised(argv: Sequence[str], build_parser, child_cmd: Optional[List[str]] = None) -> int:
    """Run ``model-merger ARGV`` in a child process; ``build_parser`` is the CLI's (to find the output it names),
    ``child_cmd`` replaces the child's command line (tests)."""
    env = dict(os.environ)
    env[CHILD_ENV] = "1"
    cmd = child_cmd or [sys.executable, "-m", "merger_core", *argv]
    child = subprocess.Popen(cmd, env=env, start_new_session=True,
                             preexec_fn=_pdeathsig if sys.platform.startswith("linux") else None)
    old = {}

    forwarded = set()

    def forward(signum, frame):
        forwarded.add(signum)
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    for signum in FORWARDED:
        old[signum] = signal.signal(signum, forward)
    try:
        rc = child.wait()
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)
    if rc >= 0:
        return rc
    name = signal.Signals(-rc).name
    from ..io.writer import sweep_stale_partials

    removed = [p for target in _outputs(argv, build_parser) for p in sweep_stale_partials(target)]
    if -rc in forwarded:  # the child stopped on a signal it was sent through us: the usual interruption
        print(f"interrupted ({name}); no output was written", file=sys.stderr)
        return 128 - rc
    what = CRASHES.get(name, f"the process stopped on {name}")
    print(f"error: {what}; no output was written"
          + (f" (removed its temporary file {', '.join(removed)})" if removed else ""), file=sys.stderr)
    return 2
