"""Training (single process or torchrun/DDP), checkpoints, model configs."""
from __future__ import annotations

import contextlib
import math
import os
import signal
import tempfile
import threading
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from torchvision.models.detection._utils import overwrite_eps

from . import builders, data
from .graphed import GraphedStep

# The CPU-trainable default: what `python -m maskrcnn train` builds (see README).
SMALL_CONFIG = dict(
    fpn_channels=32, representation_size=128, mask_layers=[32, 32, 32, 32],
    mask_dim_reduced=32, rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
    rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100, rpn_batch_size_per_image=128,
    box_batch_size_per_image=64, box_detections_per_img=20,
)


def model_config(arch: str, num_classes: int, image_size: int, categories: list[dict],
                 **overrides) -> dict:
    """A JSON-able description of a model, stored in checkpoints to rebuild it."""
    if arch == "resnet18_fpn":
        kwargs = dict(SMALL_CONFIG, min_size=image_size, max_size=image_size)
    elif arch == "resnet50_fpn":
        kwargs = dict(min_size=image_size, max_size=max(image_size, round(image_size * 1333 / 800)))
    else:
        raise ValueError(f"arch must be resnet18_fpn or resnet50_fpn, got {arch!r}")
    kwargs.update(overrides)
    return {"arch": arch, "num_classes": num_classes, "kwargs": kwargs,
            "categories": categories, "image_size": image_size}


def build_model(config: dict, ops="kernels"):
    kwargs = dict(config["kwargs"])
    if config["arch"] == "resnet18_fpn":
        if "rpn_anchor_generator" not in kwargs:
            kwargs["rpn_anchor_generator"] = builders.small_anchor_generator()
        model = builders.maskrcnn_resnet18_fpn(num_classes=config["num_classes"], ops=ops,
                                               **kwargs)
    else:
        model = builders.maskrcnn_resnet50_fpn(num_classes=config["num_classes"], ops=ops,
                                               **kwargs)
    if config.get("bn_eps") is not None:   # not in the state dict: the weights' convention
        overwrite_eps(model, config["bn_eps"])
    return model


def _load(path: str, missing: str, unreadable: str):
    """``torch.load(path, weights_only=True)`` onto the CPU; a missing or unreadable file
    raises DataError with ``missing`` or ``unreadable`` ({path}, {error} filled in)."""
    if not os.path.isfile(path):
        raise data.DataError(missing.format(path=path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types on a truncated/foreign file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise data.DataError(unreadable.format(path=path, error=first)) from None


def _read_weights(path: str) -> tuple[Optional[dict], dict]:
    """(config, state dict) of a checkpoint of ours, or (None, state dict) of a plain state
    dict (torchvision's Mask R-CNN layout); read with ``weights_only=True``."""
    obj = _load(path, "--weights: file not found: {path}", "--weights: cannot read {path}: {error}")
    if isinstance(obj, dict) and "model" in obj and "config" in obj:
        return obj["config"], obj["model"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return None, obj
    raise data.DataError(f"--weights: {path} is neither a state dict nor a checkpoint of ours")


def finetune_model(path: str, num_classes: int, categories: list[dict], image_size: Optional[int],
                   trainable_layers: int = 3, ops="kernels"):
    """(model, config): the weights at ``path`` with new box and mask predictors for
    ``num_classes`` classes (background included): torchvision's fine-tuning recipe.

    ``path`` holds a state dict of torchvision's ``maskrcnn_resnet50_fpn`` (or of ours, the
    same layout) or a checkpoint of ours (any arch; its config rebuilds the model). The
    backbone gets FrozenBatchNorm2d and trains its last ``trainable_layers`` ResNet stages,
    as torchvision's ``trainable_backbone_layers``. A state dict saved with FrozenBatchNorm2d
    (no ``num_batches_tracked``, as torchvision's COCO weights) is taken to use eps 0, as
    torchvision sets for those weights."""
    if not 0 <= trainable_layers <= 5:
        raise data.DataError(f"--trainable-layers must be in [0, 5], got {trainable_layers}")
    source, state = _read_weights(path)
    if source is None:
        key = "roi_heads.box_predictor.cls_score.weight"
        if key not in state or "backbone.body.layer1.0.conv3.weight" not in state:
            raise data.DataError(f"--weights: {path} is not a Mask R-CNN ResNet-50-FPN state "
                                 f"dict (torchvision's layout): no {key} or ResNet-50 body")
        arch, kwargs, source_classes = "resnet50_fpn", {}, int(state[key].shape[0])
        bn_eps = None if any(k.endswith("num_batches_tracked") for k in state) else 0.0
        image_size = image_size or 800
    else:
        arch, source_classes, bn_eps = source["arch"], source["num_classes"], source.get("bn_eps")
        kwargs = {k: v for k, v in source["kwargs"].items() if k not in ("min_size", "max_size")}
        image_size = image_size or source["image_size"]
    kwargs.update(frozen_batchnorm=True, trainable_backbone_layers=trainable_layers)
    config = model_config(arch, source_classes, image_size, categories, **kwargs)
    config["bn_eps"] = bn_eps
    model = build_model(config, ops=ops)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        why = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise data.DataError(f"--weights: {path} does not fit a {arch} model: {why[:300]}") \
            from None
    builders.replace_predictors(model, num_classes)
    config["num_classes"] = num_classes
    return model, config


def save_checkpoint(path: str, state: dict) -> None:
    """Write atomically: a temp file in the same folder, then os.replace."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str) -> dict:
    """A checkpoint this package wrote, loaded with ``weights_only=True``: tensors, numbers,
    strings and containers only, so a pickle from elsewhere cannot run code."""
    ckpt = _load(path, "checkpoint not found: {path}", "cannot read checkpoint {path}: {error}")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise data.DataError(f"{path} is not a maskrcnn checkpoint (no model/config)")
    return ckpt


def model_from_checkpoint(path: str, device, ops="kernels"):
    ckpt = load_checkpoint(path)
    model = build_model(ckpt["config"], ops=ops)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


# ---------------------------------------------------------------------------------------

def distributed_setup(device_arg: Optional[str]):
    """(rank, world_size, device); init the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg:
        try:
            device = torch.device(device_arg)
        except RuntimeError:
            raise data.DataError(f"--device {device_arg!r} is not a torch device") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise data.DataError(f"--device {device_arg}: no CUDA device is available")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def cpu_shared() -> bool:
    """Other work runs on this CPU now: the runnable threads /proc/loadavg counts at this
    instant (ours among them), sampled 5 times over a quarter second, exceed the cores in
    most samples. The 1-minute load average (the fallback where /proc/loadavg is missing)
    also counts this process's and the previous run's own work: it sent a second training
    run started right after a first to one thread (other float sums, other weights), and
    the benchmark's model to one thread in most CPU report runs."""
    cores = os.cpu_count() or 1
    try:
        samples = []
        for _ in range(5):
            with open("/proc/loadavg") as f:
                samples.append(int(f.read().split()[3].split("/")[0]))
            time.sleep(0.05)
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] > cores
    return sorted(samples)[2] - 1 >= cores


def lr_at(progress: float, base: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` of training, then cosine decay to 0."""
    if progress < warmup:
        return base * (0.001 + 0.999 * progress / warmup)
    t = (progress - warmup) / max(1e-9, 1 - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _rank0_or_any(value: float, flag: bool, device) -> tuple[float, bool]:
    """``value`` as rank 0 has it, and whether ``flag`` is set on any rank: under DDP every
    rank must take the same branch. One all-reduce: the maximum of rank 0's value (-inf
    elsewhere) and of the flags."""
    if not dist.is_initialized():
        return value, flag
    mine = value if dist.get_rank() == 0 else -math.inf
    t = torch.tensor([mine, float(flag)], dtype=torch.float64,
                     device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t[0]), bool(t[1])


def _rank0(value: float, device) -> float:
    """``value`` as rank 0 has it."""
    return _rank0_or_any(value, False, device)[0]


class Progress:
    """Training progress in [0, 1]: steps done over the step budget, until a time budget
    binds. Time binds once the time spent leads the steps by more than ``TIME_LEAD`` of the
    schedule, or the budget is spent; from then on progress is whichever is further, so
    training still ends on time with the learning-rate schedule completed. A run that fits
    its budget follows the step schedule alone: the same learning rates, and (same seed,
    same thread count) the same weights, every run. Under DDP the ranks agree: on rank
    0's progress, and on a Ctrl-C that reached any of them."""

    TIME_LEAD = 0.05

    def __init__(self, total_steps: int, time_budget: Optional[float], start_step: int,
                 spent: float, device) -> None:
        self.total, self.budget = total_steps, time_budget
        self.t0 = time.time() - spent
        self.device = device
        self.time_bound = False
        self.requested = False          # set by Ctrl-C on this rank (stop_on_interrupt)
        self.interrupted = False        # a Ctrl-C on any rank, as the ranks agreed: progress 1
        self.value = self.at(start_step)

    def spent(self) -> float:
        return time.time() - self.t0

    def at(self, step: int) -> float:
        p = step / max(1, self.total)
        if self.budget:
            by_time = self.spent() / self.budget
            self.time_bound = self.time_bound or by_time > min(p + self.TIME_LEAD, 1.0)
            if self.time_bound:
                p = max(p, by_time)
        # (a Ctrl-C during the agreement is agreed on at the next step)
        p, self.interrupted = _rank0_or_any(p, self.requested, self.device)
        self.value = 1.0 if self.interrupted else min(1.0, p)
        return self.value


@contextlib.contextmanager
def stop_on_interrupt(progress: "Progress"):
    """Ctrl-C (SIGINT) inside the block ends training after the step under way, as if its
    budget were spent: the loop stops between steps and writes its checkpoint (a step cut
    halfway would leave the weights half updated). A second Ctrl-C interrupts at once.
    Main thread only (where Python delivers signals). A process that ignores SIGINT (as a
    shell starts background jobs without job control, or nohup) keeps ignoring it, as
    Python itself does."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is signal.SIG_IGN):
        yield
        return

    def handler(signum, frame):
        progress.requested = True
        signal.signal(signal.SIGINT, previous)
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _rng_states(device) -> dict:
    """Every rank's random state (each rank's model draws its own): a list, rank by rank,
    gathered to every rank (the CUDA generator's too on CUDA)."""
    states = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    if not dist.is_initialized():
        return {k: [v] for k, v in states.items()}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, states)
    return {k: [g[k] for g in gathered] for k in states}


def _set_rng_states(ckpt: dict, rank: int, device) -> None:
    """This rank's random state from a checkpoint (one state: older checkpoints)."""
    def mine(states):
        return states[rank % len(states)] if isinstance(states, list) else states
    torch.set_rng_state(mine(ckpt["rng"]))
    if device.type == "cuda" and "cuda_rng" in ckpt:
        torch.cuda.set_rng_state(mine(ckpt["cuda_rng"]), device)


def _check_mid_epoch(ckpt: dict, path: str, **now) -> None:
    """A checkpoint taken mid-epoch resumes with the seed, batch size and process count it
    was written with: they fix which samples the epoch's first batches were."""
    if not ckpt.get("batch"):
        return
    then = ckpt.get("loader", {})
    changed = [f"{k} {then[k]} -> {v}" for k, v in now.items() if k in then and then[k] != v]
    if changed:
        raise data.DataError(
            f"{path} was written mid-epoch (after batch {ckpt['batch']} of epoch "
            f"{ckpt['epoch'] + 1}); resuming it needs the same {', '.join(now)} "
            f"(changed: {', '.join(changed)})")


def _to_device(images, targets, device):
    return ([img.to(device, non_blocking=True) for img in images],
            [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets])


def _read_losses(losses: dict[str, Tensor], step: int) -> dict[str, float]:
    """The losses as numbers (one host sync reads them all); a non-finite total stops."""
    values = dict(zip(losses, torch.stack([v.detach().float()
                                           for v in losses.values()]).tolist()))
    if not math.isfinite(values["loss"]):
        raise FloatingPointError(f"loss is {values['loss']} at step {step}: {values}")
    return values


def _step(model, optimizer, scaler, params, images, targets, device, use_amp: bool,
          clip_grad: float, step: int) -> dict[str, float]:
    """One optimizer step on a batch; its losses (one host sync reads them all)."""
    images, targets = _to_device(images, targets, device)
    with torch.autocast(device.type, enabled=use_amp):
        loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
    values = _read_losses({**loss_dict, "loss": loss}, step)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    # from-scratch training spikes early on; clipping keeps it from diverging
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return values


def train(*, model, config: dict, train_set, epochs: int, batch_size: int, lr: float,
          device, output: str, resume: Optional[str] = None, amp: bool = True,
          workers: int = 0, seed: int = 0, max_steps: Optional[int] = None,
          weight_decay: float = 1e-4, clip_grad: float = 10.0,
          time_budget: Optional[float] = None, transforms: Optional[Callable] = None,
          save_every: Optional[int] = None, save_minutes: float = 10.0,
          cuda_graph: bool = False, log=print) -> dict:
    """Train; checkpoint ``output`` after every epoch, every ``save_every`` steps (default:
    every ``save_minutes`` of training) and when training stops early (step or time budget,
    Ctrl-C). ``transforms``: the augmentation, seeded per sample (:class:`data.Augmented`).
    A resume continues where the checkpoint was taken, mid-epoch too, and ends with the
    weights an uninterrupted run ends with. Returns the losses averaged over the last
    epoch, with ``interrupted`` set when Ctrl-C ended it. ``cuda_graph``: each step a
    CUDA graph replay (:class:`graphed.GraphedStep`: one process, CUDA; ``amp`` is then
    bfloat16 autocast, with no loss scaler)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    torch.manual_seed(seed)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    use_amp = amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    start_epoch, step, spent, done, sums = 0, 0, 0.0, 0, {}
    if resume:
        ckpt = load_checkpoint(resume)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt.get("scaler", {}))
        start_epoch, step, spent = ckpt["epoch"], ckpt["step"], ckpt.get("spent", 0.0)
        done, sums = ckpt.get("batch", 0), dict(ckpt.get("epoch_sums", {}))
        _check_mid_epoch(ckpt, resume, seed=seed, batch_size=batch_size, processes=world)
        _set_rng_states(ckpt, rank, device)
    graphed = None
    if cuda_graph:
        if device.type != "cuda":
            raise ValueError(f"cuda_graph needs a CUDA device, got {device}")
        if world > 1:
            raise ValueError("cuda_graph runs in one process (not under torchrun)")
        graphed = GraphedStep(model, optimizer, clip_grad, device, amp=use_amp)
    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                        else None) if world > 1 else model

    shards = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank,
                                                 shuffle=True, seed=seed)
    steps_per_epoch = len(shards) // batch_size
    sampler = data.EpochKeys(shards, skip=done * batch_size)
    # the loader's own generator seeds its workers: the global one (the model's random
    # draws, saved in checkpoints) is not drawn from when an epoch's iterator starts
    loader = torch.utils.data.DataLoader(
        data.Augmented(train_set, transforms, seed), batch_size=batch_size, sampler=sampler,
        num_workers=workers, collate_fn=data.collate, drop_last=True,
        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed))
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps,
                                                                   epochs * steps_per_epoch)
    progress = Progress(total, time_budget, step, spent, device)
    warmup = 0.1
    averages: dict[str, float] = {}
    last_save = time.time()

    def save(epoch: int, done: int, sums: dict) -> None:
        """Every rank calls it (the random states are gathered); rank 0 writes."""
        finished = done == steps_per_epoch
        states = _rng_states(device)
        if rank == 0:
            save_checkpoint(output, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch + finished, "step": step,
                "batch": 0 if finished else done, "epoch_sums": {} if finished else sums,
                "config": config, **states,
                "loader": {"seed": seed, "batch_size": batch_size, "processes": world},
                "losses": {k: v / max(1, done) for k, v in sums.items()},
                "spent": progress.spent(), "time": time.time()})

    with stop_on_interrupt(progress):
        for epoch in range(start_epoch, epochs):
            if progress.value >= 1:
                break
            sampler.set_epoch(epoch)
            model.train()
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=rank != 0,
                       dynamic_ncols=True, leave=True, initial=done, total=steps_per_epoch)
            for images, targets in bar:
                if progress.at(step) >= 1:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(progress.value, lr, warmup)
                if graphed is not None:
                    graphed.lr = optimizer.param_groups[0]["lr"]
                    values = _read_losses(graphed(*_to_device(images, targets, device)),
                                          step)
                else:
                    values = _step(ddp_model, optimizer, scaler, params, images, targets,
                                   device, use_amp, clip_grad, step)
                step += 1
                done += 1
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                bar.set_postfix(loss=f"{values['loss']:.3f}", mask=f"{values['loss_mask']:.3f}",
                                lr=f"{optimizer.param_groups[0]['lr']:.4f}")
                due = (step % save_every == 0 if save_every
                       else bool(_rank0(time.time() - last_save >= 60 * save_minutes,
                                        device)))
                if due and done < steps_per_epoch:
                    save(epoch, done, sums)
                    if rank == 0:
                        bar.write(f"step {step}: checkpoint -> {output}")
                    last_save = time.time()
            if done == 0:       # stopped before its first step: nothing new to save
                break
            averages = {k: v / max(1, done) for k, v in sums.items()}
            save(epoch, done, sums)
            if rank == 0:
                stopped = ("" if done == steps_per_epoch
                           else f" (stopped at {done}/{steps_per_epoch})")
                log(f"epoch {epoch + 1}{stopped}: "
                    + ", ".join(f"{k}={v:.4f}" for k, v in averages.items()) + f" -> {output}")
            last_save = time.time()
            done, sums = 0, {}
    if world > 1:
        dist.barrier()
    if progress.interrupted:
        averages["interrupted"] = True
    return averages
