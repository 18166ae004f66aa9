"""Where the kernels run: compiled for the GPU, or in Triton's CPU interpreter (``TRITON_INTERPRET=1``).

Triton fixes the mode of a ``@triton.jit`` function when it decorates it, from ``TRITON_INTERPRET`` at that
moment, and that includes Triton's own library (``triton.language``). The library is decorated when Triton is
first imported, and torch.compile's machinery, bitsandbytes and PEFT all import it. A kernel interpreted over
a library compiled for the GPU fails inside the kernel. So the mode is one decision per process: set the
variable before importing anything. It is fixed the first time lora_engine runs a kernel (``load_kernels``):
Triton's library is checked against it and every kernel module is imported at once, in that mode. Until then
it is read from the environment. This module itself does not import Triton.
"""

from __future__ import annotations

import os
from typing import Optional

ENV_VAR = "TRITON_INTERPRET"

_settled: Optional[bool] = None  # the mode the kernels were loaded in, once they are


def interpreter_requested() -> bool:
    """Whether the environment asks for the interpreter now (``TRITON_INTERPRET=1``)."""
    return os.environ.get(ENV_VAR, "0") == "1"


def interpreter_active() -> bool:
    """Whether the kernels run in the interpreter: the settled mode, or what the environment asks for until then."""
    return _settled if _settled is not None else interpreter_requested()


def load_kernels() -> None:
    """Fix the mode and import every kernel module in it; raise if Triton's own library runs in the other mode.

    Cheap after the first call. Raises ``RuntimeError`` naming the cause and the fix on a mismatch.
    """
    global _settled
    if _settled is not None:
        return
    wanted = interpreter_requested()
    import triton.language.standard as library
    from triton.runtime.interpreter import InterpretedFunction

    # all at once, so that no kernel is decorated later under another value of the variable
    from . import decode, dequantize, dropout, lora_gemv, lora_lowrank, lora_matmul, lora_multi  # noqa: F401

    # one @triton.jit function of Triton's library and one of ours (imported earlier, e.g. by a test or a bench)
    for where, function in (
        ("Triton was first imported", library.cdiv),
        ("lora_engine's kernels were imported", dropout._dropout_scale_kernel),
    ):
        if isinstance(function, InterpretedFunction) != wanted:
            now, then = ("set", "unset") if wanted else ("unset", "set")
            raise RuntimeError(
                f"{ENV_VAR} is {now} now but was {then} when {where} (torch.compile, bitsandbytes and PEFT import "
                f"Triton), so those functions run in the other mode and the kernels would fail. Set {ENV_VAR} before "
                "importing anything: in the shell, or in the first lines of the program."
            )
    _settled = wanted
