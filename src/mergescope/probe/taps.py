"""Seeing inside a model without hooks: a traced copy that also returns chosen intermediate tensors.

The tapped module is a ``torch.fx.GraphModule`` that shares its parameters with the original model (no copy),
returns ``(output, {tap name: tensor})`` and can splice a transform module in after any node (used by REPAIR
to renormalize pre-activations during its statistics pass). Nothing is registered on the original model, so
nothing can leak.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.fx as fx
from torch import nn

from ..errors import ArchitectureError
from ..perm._graph import canonical_names, trace


def tap_model(
    model: nn.Module,
    taps: Sequence[str] = (),
    transforms: Mapping[str, nn.Module] | None = None,
    traced: fx.GraphModule | None = None,
) -> fx.GraphModule:
    """Trace ``model`` into a module returning ``(output, {name: tensor})`` for every name in ``taps``.

    Args:
        model: the model; its parameters are shared, not copied.
        taps: canonical layer names (see :func:`mergescope.perm.list_layers`) whose outputs to return.
        transforms: canonical layer name -> module applied to that layer's output before the rest of the
            network sees it. A tap at the same layer returns the value *before* the transform.
        traced: ``model`` already traced by torch.fx (e.g. by :func:`mergescope.perm.spec.traced_spec`), to be
            spliced into and returned instead of tracing it again; it is modified.

    Returns:
        The tapped GraphModule. Unknown names raise ArchitectureError listing the available ones.
    """
    transforms = dict(transforms or {})
    gm = traced if traced is not None else trace(model)
    by_name = {name: node for node, name in canonical_names(gm).items()}
    missing = [n for n in list(taps) + list(transforms) if n not in by_name]
    if missing:
        known = ", ".join(n for n in by_name if ":" not in n)
        raise ArchitectureError(f"unknown layer '{missing[0]}' in {type(model).__name__}; known layers: {known}")
    graph = gm.graph
    for i, (name, module) in enumerate(transforms.items()):
        node = by_name[name]
        attr = f"_mergescope_transform_{i}"
        gm.add_submodule(attr, module)
        with graph.inserting_after(node):
            fixed = graph.call_module(attr, (node,))
        node.replace_all_uses_with(fixed, delete_user_cb=lambda user: user is not fixed)
    out_node = next(n for n in graph.nodes if n.op == "output")
    result = out_node.args[0]
    with graph.inserting_before(out_node):
        graph.output((result, {name: by_name[name] for name in taps}))
    graph.erase_node(out_node)
    gm.recompile()
    gm.train(model.training)
    return gm
