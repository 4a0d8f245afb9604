"""Run an eec artifact with numpy and onnxruntime; no torch, no transformers.

    from eec.runtime import load
    model = load("smollm2.eec")
    for piece in model.generate("Hello", stream=True):
        print(piece, end="", flush=True)
    print(model.stats)
"""

from eec.runtime.manifest import Manifest, read_manifest
from eec.runtime.engine import Engine, Event
from eec.runtime.model import EarlyExitModel, GenerationResult, Stats, load
from eec.runtime.options import GenerationOptions

__all__ = ["EarlyExitModel", "Engine", "Event", "GenerationOptions", "GenerationResult", "Manifest", "Stats", "load",
           "read_manifest"]
