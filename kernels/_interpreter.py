"""Work-arounds for bugs of Triton's CPU interpreter (``TRITON_INTERPRET=1``) that compiled
kernels do not have, applied by :mod:`kernels._utils` on import, only to the Triton
versions that need them."""
from __future__ import annotations


def patch_interpreter() -> None:
    """Work around two bugs of Triton's interpreter that compiled kernels do not have.

    * Triton 3.6 turns a scalar into an int with ``int()`` of a shape-(1,) array, which
      NumPy >= 2.4 refuses: ``range(n)`` over a runtime scalar raises TypeError
      (triton-lang/triton#9171, fixed in 3.7). Squeeze first, as Triton >= 3.7 does.
    * Triton 3.9's load/store/atomics take only bool masks, but a scalar comparison
      broadcast into a block (``ok_x & (y < H)``) holds int data there: "mask has
      unsupported dtype". Cast the mask to bool, as earlier interpreters read it.
    """
    import copy

    import numpy as np
    import triton
    from triton.runtime import interpreter

    version = tuple(int(v) for v in triton.__version__.split(".")[:2])
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if (version < (3, 7) and patch_tensor is not None
            and not getattr(patch_tensor, "squeezes_index", False)):
        def patched(tensor, scope):
            patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__",
                           lambda self: int(self.handle.data.squeeze()))

        patched.squeezes_index = True
        interpreter._patch_lang_tensor = patched

    def bool_mask(method, position):  # position of the mask among the method's arguments
        def wrapper(self, *args, **kwargs):
            mask = args[position]
            if mask.data.dtype != np.bool_:
                mask = copy.copy(mask)
                mask.data = mask.data.astype(np.bool_)
                args = args[:position] + (mask,) + args[position + 1:]
            return method(self, *args, **kwargs)

        wrapper.bool_mask = True
        return wrapper

    if version < (3, 9):
        return
    builder = interpreter.InterpreterBuilder
    for name, position in (("create_masked_load", 1), ("create_masked_store", 2),
                           ("create_atomic_rmw", 3)):
        method = getattr(builder, name, None)
        if method is not None and not getattr(method, "bool_mask", False):
            setattr(builder, name, bool_mask(method, position))
