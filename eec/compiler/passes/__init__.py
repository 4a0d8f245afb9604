"""Graph passes applied after export, one per file (the onnx-ir ``call(model) -> PassResult`` contract).

`DropUnusedNormOutputs` runs on every exported graph; `FuseExitHead` puts an
exit head's graph inside its segment's; `DropPaddingMask` writes an encoder
segment's twin for calls without padding. The precision
passes wrap onnxruntime's own quantization tools; `precision_passes` maps each
``--precision`` to the passes that produce it.
"""

from __future__ import annotations

from eec.compiler.passes.drop_padding_mask import DropPaddingMask
from eec.compiler.passes.float16 import Float16
from eec.compiler.passes.fuse_exit_head import FuseExitHead
from eec.compiler.passes.int8_dynamic import Int8Dynamic
from eec.compiler.passes.int8_qdq import Int8StaticQDQ
from eec.compiler.passes.q4_carry_over import Q4CarryOver
from eec.compiler.passes.unused_norm_outputs import DropUnusedNormOutputs
from eec.compiler.passes.weight_only import WeightOnly

__all__ = ["DropPaddingMask", "DropUnusedNormOutputs", "Float16", "FuseExitHead", "Int8Dynamic", "Int8StaticQDQ",
           "Q4CarryOver", "WeightOnly"]
