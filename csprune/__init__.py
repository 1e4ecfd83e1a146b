"""csprune: compressed-sensing-based pruning for PyTorch models.

Public API (docs/design.md §2)::

    pruner = csprune.Pruner(model, method=csprune.methods.CSP(), schedule=csprune.schedules.Cubic(0.9, 0, 2000, 100))
    csprune.prune_once(model, csprune.methods.Magnitude(), sparsity=0.7)
    csprune.save_sparse(model, "model.safetensors"); csprune.load_sparse("model.safetensors")
"""

__version__ = "0.1.0"

from . import deploy, methods, schedules, solvers  # noqa: E402
from .errors import CheckpointError, CsPruneError  # noqa: E402
from .export import inspect_sparse, load_sparse, read_sparse_meta, save_sparse  # noqa: E402
from .pruner import Pruner, prune_once  # noqa: E402

__all__ = [
    "Pruner", "prune_once", "methods", "schedules", "solvers", "deploy",
    "save_sparse", "load_sparse", "inspect_sparse", "read_sparse_meta", "CheckpointError", "CsPruneError",
    "__version__",
]
