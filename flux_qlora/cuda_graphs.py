"""CUDA graphs: record a GPU step's kernels once, then replay them with one launch, so the GPU never waits for
Python (the trainer's micro step; the transformer's forward at inference)."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


class CudaGraphStep:
    """Calls `step(*inputs)` (CUDA tensors in, a tensor out) eagerly `warmup` times per input shape, on a side
    stream as capture requires (compilation, autotuning and lazy allocations happen there), then captures it in a
    CUDA graph and from then on replays that: the inputs are copied into the graph's own, and the output returned
    is the graph's, overwritten by the next replay (clone what you keep). All graphs share one memory pool.

    The step must not wait for the host, read CPU tensors or change its Python-side decisions between calls;
    whatever it writes outside its own allocations (e.g. accumulated gradients) must keep its address.
    """

    def __init__(self, step, warmup: int = 2, name: str = "the training step"):
        self.step, self.warmup, self.name = step, warmup, name
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}
        self.calls: dict[tuple, int] = {}
        self.pool = None
        self.stream = torch.cuda.Stream()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        if key in self.graphs:
            graph, static_inputs, output = self.graphs[key]
            for static, tensor in zip(static_inputs, inputs):
                static.copy_(tensor, non_blocking=True)
            graph.replay()
            return output
        self.calls[key] = self.calls.get(key, 0) + 1
        if self.calls[key] <= self.warmup:
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                output = self.step(*inputs)
            torch.cuda.current_stream().wait_stream(self.stream)
            return output
        return self._capture(key, inputs)

    def _capture(self, key: tuple, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        static_inputs = [t.clone() for t in inputs]
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.step(*static_inputs)
        self.pool = graph.pool()
        self.graphs[key] = (graph, static_inputs, output)
        logger.info("Captured %s in a CUDA graph (inputs %s)", self.name, [k[0] for k in key])
        graph.replay()  # capturing records the work without running it: this runs the current call
        return output


class GraphedTransformerForward:
    """Stands in for a diffusers transformer's `forward`: keyword tensors in, replayed from a CUDA graph per set of
    input shapes (CudaGraphStep) after two eager warm-up calls. Calls with positional arguments or other values
    (say a non-empty joint_attention_kwargs; None and {} are dropped) run eagerly. The output is cloned: a
    pipeline may call twice per step (true CFG) before using the first result.

    Weights must keep their addresses: LoRA hotswapping copies in place, so swaps need no new capture.
    """

    def __init__(self, forward):
        self.forward = forward
        self.steps: dict[tuple[str, ...], CudaGraphStep] = {}

    def __call__(self, *args, return_dict: bool = True, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if v is not None and not (isinstance(v, dict) and not v)}
        if args or not all(isinstance(v, torch.Tensor) for v in kwargs.values()):
            return self.forward(*args, return_dict=return_dict, **kwargs)
        names = tuple(sorted(kwargs))
        if names not in self.steps:
            self.steps[names] = CudaGraphStep(self._call_with(names), name="the transformer's forward")
        output = self.steps[names](*(kwargs[n] for n in names)).clone()
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=output)
        return (output,)

    def _call_with(self, names: tuple[str, ...]):
        def step(*tensors: torch.Tensor) -> torch.Tensor:
            return self.forward(**dict(zip(names, tensors)), return_dict=False)[0]
        return step


def replay_forward_from_cuda_graphs(transformer: torch.nn.Module) -> None:
    """From now on the transformer's forward calls replay CUDA graphs (see GraphedTransformerForward)."""
    transformer.forward = GraphedTransformerForward(transformer.forward)
