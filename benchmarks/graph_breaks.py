"""Graph breaks of the whole model under torch.compile: ours against torchvision's.

``torch._dynamo.explain`` on a ResNet-18-FPN (16 channels) Mask R-CNN, 2 images of 64x80 and
72x64, default dynamo config; torchvision's ``MaskRCNN`` on the same backbone and settings.
Our ops run their PyTorch path (graph structure does not depend on where an op runs).
tests/test_compile_model.py checks our counts; this prints both sides, with the reason of
each of our breaks.

    python -m benchmarks.graph_breaks
"""
from __future__ import annotations

import logging

import torch
import torchvision
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN

import maskrcnn
from kernels._utils import reference_path

SETTINGS = dict(num_classes=4, min_size=64, max_size=96, rpn_pre_nms_top_n_test=50,
                rpn_post_nms_top_n_test=20, rpn_pre_nms_top_n_train=50,
                rpn_post_nms_top_n_train=20, box_batch_size_per_image=16,
                box_detections_per_img=5, box_score_thresh=0.0)


def inputs(generator: torch.Generator | None = None):
    """Two images of different sizes and one box-and-mask target each (also the model
    tests' batch, drawn there from the test's seed)."""
    g = generator
    images = [torch.rand(3, 64, 80, generator=g), torch.rand(3, 72, 64, generator=g)]
    targets = []
    for im in images:
        masks = torch.zeros(1, *im.shape[1:], dtype=torch.uint8)
        masks[0, 10:40, 12:50] = 1
        targets.append({"boxes": torch.tensor([[12.0, 10.0, 50.0, 40.0]]),
                        "labels": torch.tensor([2]), "masks": masks})
    return images, targets


def count(model, *args) -> tuple[int, list[str]]:
    torch._dynamo.reset()
    with torch.no_grad() if not model.training else torch.enable_grad():
        ex = torch._dynamo.explain(model)(*args)
    reasons = []
    for b in ex.break_reasons:
        # the innermost frame of our model code (deeper ones are library internals)
        f = next((f for f in reversed(b.user_stack) if "/maskrcnn/" in f.filename),
                 b.user_stack[-1])
        reasons.append(f"maskrcnn/{f.filename.split('/')[-1]}:{f.lineno} ({f.name}): "
                       f"{' '.join(b.reason.split())[:100]}")
    return ex.graph_break_count, reasons


def main() -> None:
    torch._logging.set_logs(dynamo=logging.ERROR)
    # torchvision's count depends on the detections (its Python loops over them): fixed
    # weights make the table repeatable
    torch.manual_seed(0)
    fpn = BackboneWithFPN(torchvision.models.resnet18(weights=None),
                          {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                          [64, 128, 256, 512], 16)
    models = {"ours": maskrcnn.maskrcnn_resnet18_fpn(fpn_channels=16, **SETTINGS),
              "ours, static_shapes=True": maskrcnn.maskrcnn_resnet18_fpn(
                  fpn_channels=16, static_shapes=True, **SETTINGS),
              "torchvision": MaskRCNN(fpn, **SETTINGS)}
    images, targets = inputs(torch.Generator().manual_seed(0))
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}")
    print("| model | inference | training |\n|---|---|---|")
    details = []
    with reference_path():
        for name, model in models.items():
            cells = []
            for mode, args in (("eval", (images,)), ("train", (images, targets))):
                if name.endswith("static_shapes=True") and mode == "train":
                    cells.append("-")       # the static mode is an inference mode
                    continue
                n, reasons = count(getattr(model, mode)(), *args)
                cells.append(str(n))
                if name.startswith("ours"):
                    details += [f"  {name} {mode}: {r}" for r in reasons]
            print(f"| {name} | {' | '.join(cells)} |")
    print("\n".join(["our breaks (dynamo lists one reason per break site):", *details]))


if __name__ == "__main__":
    main()
