"""CUDA graphs for the training step of a model trained from scratch.

LiteSeg is small: on an H200 its training step at batch 16 took about the same time at 256 and 448 px
(docs/performance.md, "On a GPU"), because launching its kernels one by one from Python cost more than
running them. A CUDA graph records the whole step (forward, loss, backward, clipping, the fused AdamW
update) once per input shape and then replays it with one launch.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Hashable

import torch

log = logging.getLogger(__name__)

WARMUP = 2  # eager steps of a shape before it is recorded (on a side stream, as recording requires)


class StepGraphs:
    """Run ``step(**inputs) -> tuple of tensors``, one program per ``key`` (the input shapes and whatever
    else changes what ``step`` does): eagerly for the key's first ``WARMUP`` calls, then recorded once as
    a CUDA graph and replayed for that key (the inputs copied into the graph's own tensors, its outputs
    returned as copies). Every call is one real step: warm-up calls train as usual, and the recording
    call replays the graph it recorded.

    ``step`` must read no device value on the host and must update weights and optimizer state in place
    (train.py's step does both; an optimizer must be ``capturable``, its learning rates device tensors).
    If recording fails, graphs stay off for the rest of the run (logged once) and steps run eagerly.
    """

    def __init__(self):
        self.graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], tuple]] = {}
        self.calls: Counter = Counter()
        self.enabled = True
        self.stream = torch.cuda.Stream()

    def __call__(self, key: Hashable, step: Callable[..., tuple[torch.Tensor, ...]],
                 **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if key in self.graphs:
            graph, static, outputs = self.graphs[key]
            for name, tensor in inputs.items():
                static[name].copy_(tensor)
            graph.replay()
            return tuple(t.clone() for t in outputs)
        self.calls[key] += 1
        if not self.enabled:
            return step(**inputs)
        if self.calls[key] <= WARMUP:
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                outputs = step(**inputs)
            torch.cuda.current_stream().wait_stream(self.stream)
            return outputs
        static = {name: tensor.clone() for name, tensor in inputs.items()}
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                outputs = step(**static)
        except RuntimeError as err:  # nothing ran while recording: this batch's step is still to take
            self.enabled = False
            log.warning("CUDA graphs off for the rest of this run: recording the training step failed (%s)",
                        str(err).splitlines()[0] if str(err) else type(err).__name__)
            torch.cuda.synchronize()
            return step(**inputs)
        self.graphs[key] = (graph, static, outputs)
        graph.replay()
        return tuple(t.clone() for t in outputs)
