"""eec: an early-exit compiler and runtime.

``eec.runtime`` runs compiled artifacts with numpy and onnxruntime only;
``eec.compiler`` (the ``eec[compile]`` extra) turns a trained model into one.
"""

__version__ = "0.2.0"
