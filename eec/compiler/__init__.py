"""The torch side of eec: load a model, plan segments, export ONNX, write the artifact."""

from eec.compiler.branched import save_early_exit
from eec.compiler.pipeline import CompileOptions, compile_model

__all__ = ["CompileOptions", "compile_model", "save_early_exit"]
