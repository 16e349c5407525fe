"""The one error type of the pack's rooms: what is wrong, which input, and the fix.

Every room raises a subclass of :class:`CompartmentsError` (SoupError, StoreError, TrainError,
...: the subclass says which room, the fields say the rest). ``nodes/`` turns any of them into
ComfyUI's error naming the node and the input, in one place (``nodes._host.translated``); the
command line prints it as one line on stderr and exits 2. Anything else that escapes is a bug,
and is reported as one, with where the full traceback is. Plain Python: no ComfyUI, no torch.
"""

from __future__ import annotations


class CompartmentsError(ValueError):
    """A user-facing problem. ``field`` names the input or flag at fault (may be empty), ``fix``
    what to do (may be empty: then the problem says it)."""

    def __init__(self, problem: str = "", fix: str = "", field: str = ""):
        self.problem, self.fix, self.field = str(problem), fix, field
        super().__init__(self.problem + (f" Fix: {fix}" if fix else ""))
