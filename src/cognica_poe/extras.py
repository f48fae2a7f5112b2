"""
Optional dependencies: packages only some features need, installed with an extra (pip install
'cognica-poe[plots]'). A feature imports them through `require`, so a missing one is one line that says which
extra to install, not a traceback from deep inside the feature.
"""

import importlib
from types import ModuleType


def require(module: str, extra: str, purpose: str, instead: str | None = None) -> ModuleType:
    """Import `module`, or raise ModuleNotFoundError naming the extra that provides it (and `instead`, another way
    out, e.g. a flag that skips the feature)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise ModuleNotFoundError(f"{purpose} needs {top}, which is not installed: pip install "
                                  f"'cognica-poe[{extra}]'" + (f" (or {instead})" if instead else ""), name=top) from e
