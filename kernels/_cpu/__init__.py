"""The CPU path: the CPU kernel each custom op registers beside its Triton launcher (the op's
body picks it for CPU tensors outside the interpreter: ``_utils.pick_path``), where a
faster CPU kernel computes the op's result; the references stay the oracle.

* RoI Align, single level and FPN (:mod:`.roi_align`): torchvision's C++ kernels (float32
  and float64; half types upcast to float32, the result rounded once), on parts of the work
  from a thread pool (:mod:`.pool`; torchvision's run on one thread).
* NMS and batched NMS (:mod:`.suppression`): torchvision's kernel on chunks of its score order, and
  batched_nms's calls made as torchvision makes them: its result, ties included.
* The mask losses (:mod:`.losses`): PyTorch's operations, with vectorized BCE terms and
  torchvision's targets by chunks of masks from the pool; the fused predictor losses on
  chunks of instances in one reused buffer.

The one-pass paste has no faster CPU form with the same result: it stays on the reference.
Nothing here reaches outside PyTorch: the pool's threads set their own intra-op thread
count with ``torch.set_num_threads`` (:func:`.pool._one_thread`).
"""
from .losses import (mask_loss, mask_loss_forward, mask_predictor_loss_backward,
                     mask_predictor_loss_forward, mask_targets, maskrcnn_loss,
                     maskrcnn_loss_forward, maskrcnn_predictor_loss_forward)
from .suppression import nms, nms_wins
from .roi_align import (multiscale_roi_align_backward, multiscale_roi_align_forward,
                        roi_align_backward, roi_align_forward)

__all__ = ["mask_loss", "maskrcnn_loss", "mask_loss_forward", "mask_predictor_loss_backward", "mask_predictor_loss_forward",
           "mask_targets", "maskrcnn_loss_forward", "maskrcnn_predictor_loss_forward", "nms",
           "nms_wins", "multiscale_roi_align_backward", "multiscale_roi_align_forward",
           "roi_align_backward", "roi_align_forward"]
