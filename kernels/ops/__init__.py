"""One module per op family: kernels, launchers, torch.library ops, public functions.

The public functions are re-exported from :mod:`kernels` (``kernels.roi_align`` is the
function, ``kernels.ops.roi_align`` its module), so no public name shadows a module.
"""
