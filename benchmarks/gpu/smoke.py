"""GPU kit step 2: every public op, and both model builders, once on the device.

    python -m benchmarks.gpu.smoke --json PATH [--device cuda] [--tiny]

One realistic Mask R-CNN shape per op (the benchmarks' own input builders), float32 and
bfloat16, forward and backward where the op has one, each compared with torchvision (in
float32 on upcast inputs for bfloat16) or with the plain PyTorch formula; NMS results must
be identical. The models: ``maskrcnn_resnet50_fpn`` against torchvision's with the same
weights, ``maskrcnn_resnet18_fpn`` on our ops against itself on torchvision's ops: eval
detections and training losses. Seconds on a GPU, so a run cut short still says which ops
work: each check prints one line and appends one JSON line to PATH as it ends. ``--tiny``
(the kit's dry run) shrinks every shape for Triton's CPU interpreter. Exits with 1 when a
check fails.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torchvision.models.detection.roi_heads import maskrcnn_loss as tv_maskrcnn_loss
from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste

import kernels
from benchmarks import (bench_mask_loss, bench_mask_predictor_loss, bench_model,
                        bench_multiscale_roi_align, bench_nms, bench_paste_masks_in_image,
                        bench_roi_align)
from kernels._utils import deterministic_algorithms, reference_path

DTYPES = (torch.float32, torch.bfloat16)
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Sizes:
    """One realistic Mask R-CNN shape per op; TINY keeps Triton's CPU interpreter, which
    pays about 0.1 s per program, to a few programs per launch."""
    image: tuple[int, int] = (800, 1216)
    images: int = 2
    channels: int = 256
    rois_per_image: int = 512      # RoI Align, MultiScaleRoIAlign
    roi_stride: int = 8            # single-level RoI Align on P3
    boxes: int = 5000              # nms; batched_nms over 80 classes
    instances: int = 512           # mask losses
    masks: int = 100               # paste
    paste_image: tuple[int, int] = (800, 1216)
    objects: int = 8               # per image, the models' training targets
    model: dict = field(default_factory=lambda: dict(box_detections_per_img=100))


TINY = Sizes(image=(64, 96), images=1, channels=8, rois_per_image=2, roi_stride=16,
             boxes=100, instances=4, masks=2, paste_image=(32, 48), objects=2,
             model=dict(box_detections_per_img=1, rpn_pre_nms_top_n_train=12,
                        rpn_post_nms_top_n_train=3, rpn_pre_nms_top_n_test=12,
                        rpn_post_nms_top_n_test=3, box_batch_size_per_image=2))


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> float:
    """Compare relative to the expected tensor's largest magnitude; return that error."""
    scale = expected.detach().float().abs().max().clamp(min=1e-12)
    a, e = actual.detach().float() / scale, expected.detach().float().to(actual.device) / scale
    torch.testing.assert_close(a, e, rtol=TOL[dtype], atol=TOL[dtype],
                               msg=lambda m: f"{what}: {m}")
    return float((a - e).abs().max()) if a.numel() else 0.0


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


class Smoke:
    def __init__(self, device: str, tiny: bool, out: Path):
        self.device, self.tiny, self.out = device, tiny, out
        self.size = TINY if tiny else Sizes()
        self.failed = 0

    def check(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            err = fn()
            status, detail = "passed", f"max error {err:.2e}" if err is not None else ""
        except Exception as e:  # every check reports; a crash is a failure, not the end
            traceback.print_exc()
            status, detail = "failed", f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"
            self.failed += 1
        if self.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        print(f"{status.upper():6s} {name:60s} {seconds:6.2f} s  {detail}", flush=True)
        with self.out.open("a") as f:
            f.write(json.dumps({"name": name, "status": status, "seconds": seconds,
                                "detail": detail}) + "\n")

    # -- ops -----------------------------------------------------------------------------

    def roi_align(self, dtype, channels_last=False, deterministic=False):
        z = self.size
        x, rois = bench_roi_align.make_inputs(
            z.roi_stride, dtype, self.device, z.rois_per_image, z.images, z.channels,
            channels_last=channels_last, image=z.image)
        args = (7, 1.0 / z.roi_stride, 2, False)
        ours_x, ref_x = leaves(x, x.float())
        with deterministic_algorithms(deterministic):
            out = kernels.roi_align(ours_x, rois, *args)
            grad = torch.randn_like(out)
            out.backward(grad)
        ref = torchvision.ops.roi_align(ref_x, rois, *args)
        ref.backward(grad.float())
        if channels_last and not ours_x.grad.is_contiguous(memory_format=torch.channels_last):
            raise AssertionError("the input gradient lost the channels_last layout")
        return max(close(out, ref, dtype, "forward"),
                   close(ours_x.grad, ref_x.grad, dtype, "input gradient"))

    def multiscale_roi_align(self, dtype):
        z = self.size
        x, boxes, shapes = bench_multiscale_roi_align.make_inputs(
            z.images, z.rois_per_image, dtype, self.device, z.channels, image=z.image)
        names = list(x)
        ours_x = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
        ref_x = {n: t.detach().float().requires_grad_() for n, t in x.items()}
        out = kernels.MultiScaleRoIAlign(names, 7, 2)(ours_x, boxes, shapes)
        ref = torchvision.ops.MultiScaleRoIAlign(names, 7, 2)(ref_x, boxes, shapes)
        grad = torch.randn_like(out)
        out.backward(grad)
        ref.backward(grad.float())
        err = close(out, ref, dtype, "forward")
        for n in names:
            err = max(err, close(ours_x[n].grad, ref_x[n].grad, dtype, f"gradient of map {n}"))
        return err

    def nms(self, dtype):
        for op, classes in (("nms", 1), ("batched_nms", 80)):
            boxes, scores, idxs = bench_nms.make_inputs(self.size.boxes, classes, dtype,
                                                        self.device)
            b32, s32 = boxes.float(), scores.float()   # the same values, torchvision's dtype
            if op == "nms":
                ours = kernels.nms(boxes, scores, 0.5)
                ref = torchvision.ops.nms(b32, s32, 0.5)
            else:
                ours = kernels.batched_nms(boxes, scores, idxs, 0.5)
                ref = torchvision.ops.batched_nms(b32, s32, idxs, 0.5)
                mask = kernels.batched_nms_mask(boxes, scores, idxs, 0.5)
                torch.testing.assert_close(mask.nonzero()[:, 0], ours.sort()[0], rtol=0, atol=0,
                                           msg=lambda m: f"batched_nms_mask: {m}")
            bench_nms.check_equal(ours, ref, s32)
        return None

    def mask_loss(self, dtype):
        z = self.size
        logits, targets, labels, inst = bench_mask_loss.make_instances(
            z.instances, 91, dtype, self.device, images=z.images, image=z.image)
        err = 0.0
        for name, ours_fn, ref_fn, extra, ref_extra in (
                ("mask_loss", kernels.mask_loss, bench_mask_loss.torch_mask_loss,
                 (targets, labels), (targets.float(), labels)),
                ("maskrcnn_loss", kernels.maskrcnn_loss, tv_maskrcnn_loss, inst, inst)):
            ours_x, ref_x = leaves(logits, logits.float())
            ours = ours_fn(ours_x, *extra)
            ours.backward()
            ref = ref_fn(ref_x, *ref_extra)
            ref.backward()
            err = max(err, close(ours, ref, dtype, f"{name} loss"),
                      close(ours_x.grad, ref_x.grad, dtype, f"{name} gradient"))
        return err

    def mask_predictor_loss(self, dtype):
        n, c = self.size.instances, self.size.channels
        g = torch.Generator().manual_seed(1)
        feats = torch.randn(n, c, 28, 28, generator=g).to(self.device, dtype)
        weight = (torch.randn(91, c, 1, 1, generator=g) / 16).to(self.device, dtype)
        bias = torch.randn(91, generator=g).to(self.device, dtype)
        targets = (torch.rand(n, 28, 28, generator=g) > 0.5).to(self.device, torch.uint8)
        labels = torch.randint(0, 91, (n,), generator=g).to(self.device)
        # the targets given, then sampled from uint8 gt masks (vs torchvision's maskrcnn_loss)
        z = self.size
        inst = bench_mask_loss.make_instances(n, 91, dtype, self.device, images=z.images,
                                              image=z.image)[3]
        err = 0.0
        for name, ours_fn, ref_fn, extra, ref_extra in (
                ("mask_predictor_loss", kernels.mask_predictor_loss,
                 bench_mask_predictor_loss.torch_predictor_loss, (targets, labels),
                 (targets.float(), labels)),
                ("maskrcnn_predictor_loss", kernels.maskrcnn_predictor_loss,
                 bench_mask_predictor_loss.torchvision_predictor_loss, inst, inst)):
            ours_p = leaves(feats, weight, bias)
            ref_p = leaves(feats.float(), weight.float(), bias.float())
            ours = ours_fn(*ours_p, *extra)
            ours.backward()
            ref = ref_fn(*ref_p, *ref_extra)
            ref.backward()
            err = max(err, close(ours, ref, dtype, f"{name} loss"))
            for what, o, r in zip(("features", "weight", "bias"), ours_p, ref_p):
                err = max(err, close(o.grad, r.grad, dtype, f"{name} {what} gradient"))
        return err

    def paste_masks_in_image(self, dtype):
        image = self.size.paste_image
        masks, boxes = bench_paste_masks_in_image.make_inputs(self.size.masks, image, dtype, self.device)
        ours = kernels.paste_masks_in_image(masks, boxes, image, 1)
        ref = tv_paste(masks.float(), boxes, image, 1)
        err = close(ours, ref, dtype, "pasted masks")
        binary = kernels.paste_masks_in_image(masks, boxes, image, 1, threshold=0.5)
        bench_paste_masks_in_image.check_equal(binary, ref > 0.5, "threshold", dtype, masks, boxes, image)
        return err

    def patch_torchvision(self):
        x, rois = bench_roi_align.make_inputs(32, torch.float32, self.device, 2, channels=4,
                                              image=(128, 192))
        before = torchvision.ops.roi_align(x, rois, 7, 1 / 32, 2)
        with kernels.patch_torchvision():
            if torchvision.ops.roi_align is not kernels.roi_align:
                raise AssertionError("torchvision.ops.roi_align is not ours while patched")
            patched = torchvision.ops.roi_align(x, rois, 7, 1 / 32, 2)
        if torchvision.ops.roi_align is kernels.roi_align:
            raise AssertionError("the patch was not undone")
        return close(patched, before, torch.float32, "patched roi_align")

    # -- models --------------------------------------------------------------------------

    def _model_kwargs(self) -> dict:
        z = self.size
        return dict(min_size=z.image[0], max_size=z.image[1], box_score_thresh=0.0, **z.model)

    def _compare_models(self, ours, ref):
        z = self.size
        images, targets = bench_model.make_batch(z.image, self.device, z.images, z.objects)
        with torch.no_grad():
            got, expected = ours.eval()(images), ref.eval()(images)
        err = 0.0
        for g, e in zip(got, expected):
            if len(e["boxes"]) == 0:
                raise AssertionError("the reference model detected nothing to compare")
            if not torch.equal(g["labels"], e["labels"]):
                raise AssertionError("detected labels differ")
            err = max(err, close(g["boxes"], e["boxes"], torch.float32, "boxes"),
                      close(g["masks"], e["masks"], torch.bfloat16, "masks"))
        losses = []
        # budgets above every candidate count: both models sample every candidate, whatever
        # their samplers draw (ours draws from masks, torchvision's with randperm)
        with bench_model.covering_budgets(ours, ref):
            for model in (ours, ref):
                losses.append(model.train()(images, targets))
        for k, v in losses[1].items():
            err = max(err, close(losses[0][k], v, torch.float32, k))
        return err

    def resnet50_fpn(self):
        tv, ours = bench_model.build_pair(self.device, **self._model_kwargs())
        # Triton's interpreter spends ~0.15 s per program of the 256-channel poolers
        # (minutes per image): the dry run checks this model on the ops' PyTorch path
        with reference_path() if self.tiny else contextlib.nullcontext():
            return self._compare_models(ours, tv)

    def resnet18_fpn(self):
        import maskrcnn
        kwargs = self._model_kwargs()
        if self.tiny:   # narrow, so the interpreter runs the kernels in seconds
            kwargs.update(fpn_channels=8, representation_size=16, mask_layers=(8, 8, 8, 8),
                          mask_dim_reduced=8)
        torch.manual_seed(0)
        ours = maskrcnn.maskrcnn_resnet18_fpn(num_classes=91, **kwargs)
        ref = maskrcnn.maskrcnn_resnet18_fpn(num_classes=91, ops="torchvision", **kwargs)
        ref.load_state_dict(ours.state_dict())
        return self._compare_models(ours.to(self.device), ref.to(self.device))

    def run(self) -> int:
        for dtype in DTYPES:
            d = str(dtype).replace("torch.", "")
            self.check(f"roi_align forward+backward {d}", lambda: self.roi_align(dtype))
            self.check(f"MultiScaleRoIAlign forward+backward {d}",
                       lambda: self.multiscale_roi_align(dtype))
            self.check(f"nms, batched_nms, batched_nms_mask {d}", lambda: self.nms(dtype))
            self.check(f"mask_loss, maskrcnn_loss forward+backward {d}",
                       lambda: self.mask_loss(dtype))
            self.check(f"mask_predictor_loss, maskrcnn_predictor_loss forward+backward {d}",
                       lambda: self.mask_predictor_loss(dtype))
            self.check(f"paste_masks_in_image float and threshold {d}", lambda: self.paste_masks_in_image(dtype))
        self.check("roi_align channels_last float32",
                   lambda: self.roi_align(torch.float32, channels_last=True))
        self.check("roi_align deterministic backward float32",
                   lambda: self.roi_align(torch.float32, deterministic=True))
        self.check("patch_torchvision", self.patch_torchvision)
        # identical convolutions in both models, so only the ops differ
        torch.backends.cudnn.deterministic = True
        self.check("maskrcnn_resnet50_fpn vs torchvision's (eval, train losses)"
                   + (" [reference path]" if self.tiny else ""), self.resnet50_fpn)
        self.check("maskrcnn_resnet18_fpn ours vs on torchvision's ops (eval, train losses)",
                   self.resnet18_fpn)
        return 1 if self.failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True, help="JSON lines, one per check")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="shapes for Triton's CPU interpreter")
    a = p.parse_args(argv)
    a.json.write_text("")
    torch.manual_seed(0)
    # oracles in IEEE float32: cuDNN's default TF32 is about 1e-3 off (measured on an H200)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return Smoke(a.device, a.tiny, a.json).run()


if __name__ == "__main__":
    raise SystemExit(main())
