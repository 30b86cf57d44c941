"""``python -m maskrcnn {train,evaluate,predict}``.

Bad input (missing file, malformed annotation JSON, corrupt image or checkpoint) prints
``error: ...`` on stderr and exits with code 2, before anything is written; so do
``evaluate``, ``predict`` and COCO data without pycocotools (``train`` on the synthetic set
then skips its held-out evaluation and says so).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from . import data, engine, evaluation


def _add_data_args(p: argparse.ArgumentParser, split_seed: int, num: int) -> None:
    g = p.add_argument_group("data (default: the synthetic shapes set)")
    g.add_argument("--images", help="COCO-format image folder")
    g.add_argument("--annotations", help="COCO instances JSON for --images")
    g.add_argument("--num-images", type=int, default=num, help="synthetic: number of images")
    g.add_argument("--image-size", type=int, default=None,
                   help="synthetic: image side in pixels; model: input size "
                        "(default 64 for synthetic data, 800 otherwise)")
    g.add_argument("--data-seed", type=int, default=split_seed,
                   help="synthetic: seed of the split (train and evaluate default to disjoint "
                        "seeds)")


def _dataset(args):
    if bool(args.images) != bool(args.annotations):
        raise data.DataError("--images and --annotations go together")
    if args.images:
        return data.CocoDetection(args.images, args.annotations)
    return data.SyntheticShapes(args.num_images, image_size=args.image_size or 64,
                                seed=args.data_seed)


def _write_atomic(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_json(path: str, obj) -> None:
    _write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


# ---------------------------------------------------------------------------------------

def _set_threads(threads, world: int) -> None:
    """Torch CPU threads: ``threads`` if given; otherwise one per process when the CPU is
    oversubscribed (other work running now, see ``engine.cpu_shared``, or several DDP
    processes), where multi-threaded kernels spend most of their time waiting at barriers
    (measured 5-10x slower on a shared 2-core machine), else torch's default."""
    if threads:
        torch.set_num_threads(threads)
    elif world > 1 or engine.cpu_shared():
        torch.set_num_threads(1)


def cmd_train(args) -> int:
    rank, world, device = engine.distributed_setup(args.device)
    _set_threads(args.threads, world)
    if args.cuda_graph and (device.type != "cuda" or world > 1):
        raise data.DataError(f"--cuda-graph needs one process on a CUDA device (this run: "
                             f"{world} process(es) on {device})")
    train_set = _dataset(args)
    if args.weights and args.resume:
        raise data.DataError("--weights starts a run from weights, --resume continues one: "
                             "give one of them")
    if args.trainable_layers is not None and not args.weights:
        raise data.DataError("--trainable-layers needs --weights (from scratch, every layer "
                             "trains, as in torchvision)")
    torch.manual_seed(args.seed)
    if args.weights:
        model, config = engine.finetune_model(
            args.weights, train_set.num_classes + 1, train_set.categories, args.image_size,
            3 if args.trainable_layers is None else args.trainable_layers, ops=args.ops)
        if args.arch and args.arch != config["arch"]:
            raise data.DataError(f"--arch {args.arch}: the weights are {config['arch']}")
    else:
        if args.resume:
            config = engine.load_checkpoint(args.resume)["config"]
        else:
            image_size = args.image_size or (64 if not args.images else 800)
            config = engine.model_config(args.arch or "resnet18_fpn", train_set.num_classes + 1,
                                         image_size, train_set.categories)
        model = engine.build_model(config, ops=args.ops)
    if rank == 0:
        # the thread count changes float sums: runs compare bit for bit only at the same one
        threads = f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""
        print(f"training {config['arch']} on {len(train_set)} images, {world} process(es), "
              f"device {device}{threads}", flush=True)
    time_budget = args.time_budget
    if time_budget is None and not args.images:
        time_budget = 480.0
    evaluate_after = rank == 0 and args.val_images > 0 and not args.images
    if evaluate_after:
        try:
            data.require_pycocotools()
        except data.DataError as e:
            evaluate_after = False
            print(f"note: no held-out evaluation after training: {e}", flush=True)
    t0 = time.time()
    result = engine.train(
        model=model, config=config, train_set=train_set, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, device=device, output=args.output,
        resume=args.resume, amp=not args.no_amp, workers=args.workers, seed=args.seed,
        max_steps=args.max_steps, time_budget=time_budget, save_every=args.save_every,
        transforms=data.train_transforms(), cuda_graph=args.cuda_graph)
    if result.get("interrupted"):
        if rank == 0:
            print(f"interrupted: checkpoint {args.output}; continue with --resume "
                  f"{args.output}", flush=True)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return 130
    if rank == 0:
        print(f"training took {time.time() - t0:.0f} s; checkpoint: {args.output}", flush=True)
        if evaluate_after:
            val = data.SyntheticShapes(args.val_images, image_size=config["image_size"],
                                       seed=args.data_seed + 1000)
            metrics, table = evaluation.evaluate(model.eval(), val, device)
            print(table)
            print(f"held-out synthetic split ({len(val)} images): "
                  f"mask AP50 = {metrics['segm']['AP50']:.3f}, "
                  f"box AP50 = {metrics['bbox']['AP50']:.3f}")
            metrics_path = os.path.splitext(args.output)[0] + "_eval.json"
            _write_json(metrics_path, {"split": "synthetic held-out", "images": len(val),
                                       "seed": args.data_seed + 1000, **metrics,
                                       "train_seconds": time.time() - t0})
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def cmd_evaluate(args) -> int:
    _, world, device = engine.distributed_setup(args.device)
    _set_threads(None, world)
    model, ckpt = engine.model_from_checkpoint(args.checkpoint, device)
    data.require_pycocotools()
    if args.image_size is None:
        args.image_size = ckpt["config"]["image_size"]
    dataset = _dataset(args)
    metrics, table = evaluation.evaluate(model, dataset, device, progress=True)
    print(table)
    _write_json(args.output, {"checkpoint": args.checkpoint, "images": len(dataset), **metrics})
    print(f"box AP {metrics['bbox']['AP']:.3f}  mask AP {metrics['segm']['AP']:.3f}  "
          f"mask AP50 {metrics['segm']['AP50']:.3f} -> {args.output}")
    return 0


def cmd_predict(args) -> int:
    import torchvision
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks
    # read every input first: a bad one fails the run before anything is written
    images = [(path, data.read_image(path)) for path in args.inputs]
    data.require_pycocotools()   # the JSON holds RLE masks
    _, _, device = engine.distributed_setup(args.device)
    model, ckpt = engine.model_from_checkpoint(args.checkpoint, device)
    names = {c["id"]: c["name"] for c in ckpt["config"].get("categories", [])}
    os.makedirs(args.output_dir, exist_ok=True)
    summary = []
    with torch.no_grad():
        for path, image in images:
            out = model([image.to(device)])[0]
            keep = out["scores"] >= args.score_thresh
            out = {k: v[keep].cpu() for k, v in out.items()}
            masks = out["masks"][:, 0] > 0.5 if out["masks"].dtype != torch.bool \
                else out["masks"][:, 0]
            labels = [f"{names.get(int(l), str(int(l)))} {s:.2f}"
                      for l, s in zip(out["labels"], out["scores"].tolist())]
            canvas = (image * 255).round().to(torch.uint8)
            if len(labels):
                canvas = draw_segmentation_masks(canvas, masks, alpha=0.45)
                canvas = draw_bounding_boxes(canvas, out["boxes"], labels=labels, width=2)
            stem = os.path.splitext(os.path.basename(path))[0]
            png = os.path.join(args.output_dir, f"{stem}.png")
            _write_atomic(png, lambda f: f.write(
                torchvision.io.encode_png(canvas).numpy().tobytes()))
            detections = [{"label": int(l), "name": names.get(int(l), str(int(l))),
                           "score": float(s), "box_xyxy": [float(v) for v in b],
                           "segmentation": evaluation.encode_mask(m.numpy())}
                          for l, s, b, m in zip(out["labels"], out["scores"], out["boxes"],
                                                masks)]
            _write_json(os.path.join(args.output_dir, f"{stem}.json"),
                        {"image": path, "height": image.shape[-2], "width": image.shape[-1],
                         "detections": detections})
            summary.append((path, png, len(detections)))
    for path, png, n in summary:
        print(f"{path}: {n} detection(s) -> {png}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m maskrcnn", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (default: synthetic shapes, ResNet-18-FPN)")
    _add_data_args(t, split_seed=0, num=4000)
    t.add_argument("--arch", default=None, choices=["resnet18_fpn", "resnet50_fpn"],
                   help="resnet18_fpn (default: small, trains on a CPU in minutes) or "
                        "resnet50_fpn (torchvision's maskrcnn_resnet50_fpn); with --weights, "
                        "the weights' own")
    t.add_argument("--weights", metavar="PATH",
                   help="fine-tune: a state dict of torchvision's maskrcnn_resnet50_fpn, or a "
                        "checkpoint of ours, given new box and mask predictors sized from the "
                        "data's classes (its categories plus background)")
    t.add_argument("--trainable-layers", type=int, default=None, metavar="N",
                   help="with --weights: ResNet stages that train, counted from the top, 0-5 "
                        "(torchvision's trainable_backbone_layers; default 3)")
    t.add_argument("--ops", default="kernels", choices=["kernels", "torchvision"],
                   help="op set the model is built with (see maskrcnn.ops)")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--batch-size", type=int, default=4,
                   help="images per step and process (under torchrun the step takes "
                        "processes x this many)")
    t.add_argument("--lr", type=float, default=0.02)
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    t.add_argument("--time-budget", type=float, default=None,
                   help="seconds of training; the schedule ends when steps or time run out "
                        "(default: 480 on the synthetic set, so the default run fits in 10 "
                        "minutes with evaluation; none on COCO data)")
    t.add_argument("--workers", type=int, default=0, help="data loader processes")
    t.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on an oversubscribed CPU, else torch's)")
    t.add_argument("--output", default="runs/maskrcnn.pt", help="checkpoint path")
    t.add_argument("--resume", help="checkpoint to resume from (mid-epoch too: exactly where "
                                    "it was written)")
    t.add_argument("--save-every", type=int, default=None, metavar="STEPS",
                   help="also checkpoint every STEPS steps (default: every 10 minutes); "
                        "always after each epoch, and on Ctrl-C after the step under way")
    t.add_argument("--val-images", type=int, default=200,
                   help="synthetic: held-out images evaluated after training (0: skip)")
    t.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    t.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    t.add_argument("--cuda-graph", action="store_true",
                   help="CUDA, one process: each step (forward, backward, clipping, SGD) a "
                        "CUDA graph replay, one graph per batch shape (same-size images "
                        "replay; instance counts are padded); mixed precision is then "
                        "bfloat16 autocast")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="COCO box and mask AP of a checkpoint on a data set")
    e.add_argument("--checkpoint", required=True)
    _add_data_args(e, split_seed=1000, num=200)
    e.add_argument("--output", default="runs/eval.json", help="metrics JSON")
    e.add_argument("--device")
    e.set_defaults(func=cmd_evaluate)

    q = sub.add_parser("predict", help="draw detections on images; PNG + JSON per image")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("inputs", nargs="+", help="image files")
    q.add_argument("--output-dir", default="runs/predictions")
    q.add_argument("--score-thresh", type=float, default=0.5)
    q.add_argument("--device")
    q.set_defaults(func=cmd_predict)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except data.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
