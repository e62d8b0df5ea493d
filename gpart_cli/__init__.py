"""gpart: end-to-end isometric fine-tuning via global parameter partitioning (arXiv 2605.14841).

Public API (docs/design.md §8)::

    import gpart_cli as gpart
    model = gpart.apply(model, gpart.GPartConfig(d=23_040, target_modules=["query", "value"]))
    gpart.theta(model)                      # the one trainable vector, fp32 [d], zeros at start
    gpart.save(model, "run/adapter.gpart")
    model = gpart.load(base_model, "run/adapter.gpart")
    merged = gpart.merge(model)
    gpart.swap(merged, "other.gpart")         # W += P(θ_other - θ), one fp32 pass; on an unmerged model: θ replaced
    ids = gpart.group_ids(n=1000, d=7, seed=0)  # feistel-v1; gpart.Partition(...) for any of gpart.ALGORITHMS
    Trainer = gpart.trainer(SFTTrainer)       # a transformers/TRL trainer that saves and resumes the .gpart adapter
"""

from .versions import __version__
from .versions import require as _require_versions

_require_versions()  # before anything else: an outdated dependency is named here, not deep inside a run

from .core.artifact import load, read_artifact, save  # noqa: E402
from .core.config import GPartConfig  # noqa: E402
from .core.model import apply, merge, theta  # noqa: E402
from .core.swap import swap  # noqa: E402
from .errors import GpartError  # noqa: E402
from .partition import ALGORITHMS, Partition  # noqa: E402
from .partition.feistel import ALGORITHM, group_ids, group_sizes  # noqa: E402
from .train.hf_trainer import trainer  # noqa: E402

__all__ = ["ALGORITHM", "ALGORITHMS", "GPartConfig", "GpartError", "Partition", "apply", "group_ids", "group_sizes",
           "load", "merge", "read_artifact", "save", "swap", "theta", "trainer", "__version__"]
