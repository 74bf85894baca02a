"""Pruning: ``prune`` (torch.nn.utils.prune's methods on ONNX weights) and ``prune_remove``.

- :mod:`.masks` — the mask arithmetic, identical to torch.nn.utils.prune;
- :mod:`.state` — masks kept in the model's metadata and as explicit mask nodes;
- :mod:`.passes` — the two passes;
- :mod:`.channels` — ``apply: remove_channels``: channel dependency groups, then one removal;
- :mod:`.sparse` — ``storage: sparse``: bitmask + values decoded in the graph.
"""

from onnxcomp.passes.prune.passes import Prune, PruneRemove

__all__ = ["Prune", "PruneRemove"]
