"""biglearn: big cooperative learning (Y. Cong, arXiv 2407.21319): one universal model of
p(x_T | x_S) for every pair of disjoint index sets (S, T) of its data.

    import biglearn
    model = biglearn.load("runs/digits-quick/export")
    model.complete({0: 0, 1: 5}, num_samples=4, seed=0).samples

`load`, `Model` and `Completion` come from biglearn.api, imported on first use so that importing a
submodule (a training worker's) does not load the serving code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"
__all__ = ["Completion", "Model", "__version__", "load"]

if TYPE_CHECKING:
    from biglearn.api import Completion, Model, load


def __getattr__(name: str) -> Any:
    if name in ("Completion", "Model", "load"):
        from biglearn import api

        return getattr(api, name)
    raise AttributeError(f"module 'biglearn' has no attribute {name!r}")
