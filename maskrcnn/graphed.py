"""The training step as one CUDA graph: forward, backward, gradient clipping and the SGD
update, captured once per batch shape and replayed.

The model's training step reads no value on the host (tests/test_training_step.py), so
it can be captured whole; what still varies from batch to batch is tensor sizes. Images
must come in the same sizes to replay a graph (one graph per distinct list of image
shapes, at most ``max_graphs``); the instance counts are made fixed here:
:func:`~maskrcnn.fixed_size.pad_targets` pads each image's targets to the batch's largest
count rounded up to a power of two (at least 8), and the model ignores the padding rows,
so a padded batch trains as the unpadded one does.

The update is ``torch.optim.SGD``'s (momentum, weight decay, no dampening or Nesterov),
written in foreach operations with the learning rate in a device tensor, so that a graph
replays any learning rate; the momentum buffers are the optimizer's own state, so its
``state_dict`` (checkpoints, resume) is the eager step's. Mixed precision is bfloat16
autocast (no loss scaler: its inf check would sync).

Without capture (``capture=False``, and on the CPU) the same step runs eagerly, padding
and update included: what the tests compare with the eager engine step on a CPU.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from .fixed_size import pad_targets

MIN_ROWS = 8
TARGET_KEYS = ("boxes", "labels", "masks", "valid")


def padded_rows(targets: list[dict[str, Tensor]]) -> int:
    """The gt rows a batch is padded to: its largest instance count rounded up to a power
    of two, at least ``MIN_ROWS`` (a few graphs cover a dataset's counts)."""
    most = max((t["boxes"].shape[0] for t in targets), default=0)
    return max(MIN_ROWS, 1 << max(most - 1, 0).bit_length())


def graph_targets(targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """What the model reads of each target (boxes, labels, masks), padded to
    :func:`padded_rows`: sizes that depend on the image sizes and the row bucket only
    (other keys, such as a COCO set's ``area`` and ``iscrowd``, would vary with the count)."""
    return pad_targets([{k: t[k] for k in TARGET_KEYS if k in t} for t in targets],
                       padded_rows(targets))


def _check_sgd(optimizer: torch.optim.Optimizer) -> None:
    if type(optimizer) is not torch.optim.SGD:
        raise TypeError(f"optimizer must be torch.optim.SGD, got {type(optimizer).__name__}")
    for group in optimizer.param_groups:
        if group["dampening"] or group["nesterov"] or group.get("maximize"):
            raise ValueError("optimizer: only SGD without dampening, Nesterov or maximize "
                             "is graphed")


class GraphedStep:
    """``step(images, targets) -> losses``: one training step (the model's losses summed,
    backward, ``clip_grad_norm_(clip_grad)``, the SGD update) on device tensors, with no
    host sync inside; the losses come back as device tensors (read them when needed).

    ``lr``: set it before a step (``step.lr = 0.01``: a device fill, no sync). With
    ``capture`` (default: on CUDA) each new batch shape is run once on a side stream (the
    model's running statistics and the random state restored after), captured, and then
    every step of that shape is a replay; past ``max_graphs`` shapes, a batch runs the same
    step eagerly. Gradients live inside the graphs: read ``p.grad`` only without capture.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.SGD, clip_grad: float,
                 device: torch.device | str, amp: bool = False, capture: bool | None = None,
                 max_graphs: int = 4) -> None:
        _check_sgd(optimizer)
        self.model, self.optimizer, self.clip_grad = model, optimizer, clip_grad
        self.device = torch.device(device)
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError(f"a CUDA graph needs a CUDA device, got {self.device}")
        self.amp, self.max_graphs = amp, max_graphs
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self._lr = torch.tensor(float(optimizer.param_groups[0]["lr"]), device=self.device)
        for p in self.params:   # the optimizer's own buffers: its state_dict stays valid
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self.graphs: dict[tuple, tuple] = {}
        self.eager_steps = 0       # batches past max_graphs, run without a graph

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = value
        self._lr.fill_(value)

    def _autocast(self):
        return (torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)
                if self.amp else contextlib.nullcontext())

    def _body(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        with self._autocast():
            losses = self.model(images, targets)
            loss = sum(losses.values())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        self._update()
        return {**{k: v.detach().float() for k, v in losses.items()},
                "loss": loss.detach().float()}

    @torch.no_grad()
    def _update(self) -> None:
        """torch.optim.SGD's step in foreach operations, the learning rate a tensor."""
        neg_lr = -self._lr
        for group in self.optimizer.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if group["momentum"]:
                bufs = [self.optimizer.state[p]["momentum_buffer"] for p in params]
                torch._foreach_mul_(bufs, group["momentum"])
                torch._foreach_add_(bufs, grads)
                grads = bufs
            torch._foreach_add_(params, torch._foreach_mul(grads, neg_lr))

    def _eager(self, images, targets) -> dict[str, Tensor]:
        for p in self.params:
            p.grad = None
        return self._body(images, targets)

    def __call__(self, images: list[Tensor], targets: list[dict[str, Tensor]]
                 ) -> dict[str, Tensor]:
        targets = graph_targets(targets)
        if not self.capture:
            return self._eager(images, targets)
        key = (tuple(tuple(im.shape) for im in images),
               tuple((k, tuple(v.shape), v.dtype) for t in targets for k, v in sorted(t.items())))
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                self.eager_steps += 1
                return self._eager(images, targets)
            entry = self.graphs[key] = self._capture(images, targets)
        graph, static_images, static_targets, losses = entry
        for buf, im in zip(static_images, images):
            buf.copy_(im, non_blocking=True)
        for buf_t, t in zip(static_targets, targets):
            for k, v in t.items():
                buf_t[k].copy_(v, non_blocking=True)
        graph.replay()
        return losses

    def _capture(self, images, targets):
        """Warm up on a side stream (Triton compiles, lazy state), the model's buffers and
        the random state restored after (the warm-up step is not a training step), then
        capture. Capturing runs nothing: the first replay is the batch's step."""
        static_images = [im.clone() for im in images]
        static_targets = [{k: v.clone() for k, v in t.items()} for t in targets]
        state = [*self.model.buffers(), *self.params,
                 *(self.optimizer.state[p]["momentum_buffer"] for p in self.params)]
        saved = [t.detach().clone() for t in state]
        rng = torch.cuda.get_rng_state(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._eager(static_images, static_targets)
        torch.cuda.current_stream(self.device).wait_stream(side)
        with torch.no_grad():
            for t, before in zip(state, saved):
                t.copy_(before)
        torch.cuda.set_rng_state(rng, self.device)
        for p in self.params:
            p.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            losses = self._body(static_images, static_targets)
        return graph, static_images, static_targets, losses


__all__ = ["GraphedStep", "graph_targets", "padded_rows", "MIN_ROWS"]
