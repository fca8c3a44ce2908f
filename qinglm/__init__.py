"""轻LM (QingLM): train Chinese language models from scratch with PyTorch.

    import qinglm
    lm = qinglm.load("runs/my-run")
    print(lm.generate("今天天气真不错", max_new_tokens=50))

Importing the package does not import torch; ``load`` does, so ``qinglm --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LM", "__version__", "load"]

if TYPE_CHECKING:
    from qinglm.api import LM
    from qinglm.config import ContextConfig


def load(
    run_dir: str | Path,
    device: str = "auto",
    tokenizer: str | Path | None = None,
    quantize: str = "none",
    context: ContextConfig | None = None,
    draft: str | Path | None = None,
) -> LM:
    """Return the trained LM in run_dir (see qinglm.api.load); imports torch on first use."""
    from qinglm.api import load as _load

    return _load(run_dir, device, tokenizer, quantize, context, draft)


def __getattr__(name: str) -> Any:
    # qinglm.LM is resolved on first access so that importing qinglm stays free of torch.
    if name == "LM":
        from qinglm.api import LM

        return LM
    raise AttributeError(f"module 'qinglm' has no attribute {name!r}")
