"""Where a training step's time goes: forward and backward time per component of the detector.

Used by tools/benchmark.py for both models (they share the submodules named below). Forward
time is read from profiler ranges opened around each component; a backward op is charged to
the component whose forward op created it (matched by the autograd sequence number), so
"RoIAlign backward" is exactly the time of the gradient ops RoIAlign's forward left behind.
Times come from the profiler and run a little slower than unprofiled steps; compare shares.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from torch import nn

# component -> attribute path inside the detector (ours and the torchvision wrapper alike)
COMPONENTS = {
    "backbone+FPN": "backbone",
    "RPN head": "rpn.head",
    "RPN rest (anchors, proposals, matching, loss)": "rpn",
    "RoIAlign": "roi_heads.box_roi_pool",
    "box head (2 FC + predictor)": ("roi_heads.box_head", "roi_heads.box_predictor"),
    "RoI rest (sampling, matching, loss)": "roi_heads",
}
LABEL = "component::"


def _module(root: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        root = getattr(root, name)
    return root


def _label_modules(model: nn.Module) -> list:
    """Open a profiler range named after the component around each component's forward."""
    core = getattr(model, "model", model)  # the torchvision wrapper keeps FasterRCNN in .model
    handles = []
    for component, paths in COMPONENTS.items():
        for path in (paths,) if isinstance(paths, str) else paths:
            module = _module(core, path)
            ranges = []

            def enter(_module, _args, name=LABEL + component, ranges=ranges):
                ranges.append(torch.profiler.record_function(name))
                ranges[-1].__enter__()

            def leave(_module, _args, _output, ranges=ranges):
                ranges.pop().__exit__(None, None, None)

            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def _innermost_label(event) -> str | None:
    while event is not None:
        if event.name.startswith(LABEL):
            return event.name[len(LABEL):]
        event = event.cpu_parent
    return None


def profile_steps(model: nn.Module, step, batches, steps: int = 3,
                  backward_nodes: dict[str, set[str]] | None = None) -> dict[str, float]:
    """Milliseconds per step by '<component> fwd|bwd', plus 'optimizer', 'data' and 'other'.
    `backward_nodes`, when given, is filled with component -> names of the backward nodes
    charged to it ('other': those charged to no component)."""
    handles = _label_modules(model)
    totals: dict[str, float] = defaultdict(float)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                t0 = time.perf_counter()
                batch = next(batches)
                totals["data"] += (time.perf_counter() - t0) * 1e3
                with torch.profiler.record_function(LABEL + "step"):
                    step(batch)
    finally:
        for handle in handles:
            handle.remove()
    events = prof.events()
    # an op records the *next* autograd sequence number, so every op since the last node was made
    # carries it; the node comes from the latest of them
    latest_of_sequence: dict[int, tuple[float, str]] = {}
    forward_ms: dict[str, float] = defaultdict(float)
    for event in events:
        label = _innermost_label(event.cpu_parent) if event.cpu_parent is not None else None
        if event.sequence_nr >= 0 and label and not event.name.startswith("autograd::") \
                and not _inside_evaluate(event):
            start = event.time_range.start
            if start >= latest_of_sequence.get(event.sequence_nr, (-1.0, ""))[0]:
                latest_of_sequence[event.sequence_nr] = (start, label)
        if event.name.startswith(LABEL):  # self time of a range = its time minus nested ranges
            nested = sum(c.cpu_time_total for c in _nested_labels(event))
            forward_ms[event.name[len(LABEL):]] += (event.cpu_time_total - nested) / 1e3
    backward_ms: dict[str, float] = defaultdict(float)
    for event in events:
        if event.name.startswith("autograd::engine::evaluate_function") and not _inside_evaluate(event):
            component = latest_of_sequence.get(event.sequence_nr, (0.0, "other"))[1]
            backward_ms[component] += event.cpu_time_total / 1e3
            if backward_nodes is not None:
                backward_nodes.setdefault(component, set()).add(event.name.split(": ", 1)[-1])
    result = {}
    for component in COMPONENTS:
        result[f"{component} fwd"] = forward_ms.get(component, 0.0) / steps
        result[f"{component} bwd"] = backward_ms.get(component, 0.0) / steps
    # the step's own range holds the backward ops (CPU autograd runs on this thread), the
    # optimizer and the glue between components
    glue = forward_ms.get("step", 0.0) / steps - sum(backward_ms.values()) / steps
    result["optimizer, transform, loss sum"] = max(glue, 0.0)
    result["backward outside components"] = backward_ms.get("other", 0.0) / steps
    result["data"] = totals["data"] / steps
    return result


def _nested_labels(event):
    for child in event.cpu_children:
        if child.name.startswith(LABEL):
            yield child
        else:
            yield from _nested_labels(child)


def _inside_evaluate(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("autograd::engine::evaluate_function"):
            return True
        parent = parent.cpu_parent
    return False
