"""eec behind HTTP: `eec serve ARTIFACT`, an OpenAI-compatible server over the batched engine.

Needs the ``serve`` extra (``pip install 'eec[serve]'``: FastAPI, uvicorn,
prometheus-client); `eec.runtime` itself never imports this package.

- `app.create_app`: the ASGI application for one artifact (decoders:
  ``/v1/completions``, ``/v1/chat/completions``; classifiers: ``/v1/classify``;
  both: ``/v1/models``, ``/health``, ``/metrics``).
- `ray_app`: the same application as a Ray Serve deployment, for replicas
  across machines behind Ray's router and autoscaler.
"""

from __future__ import annotations


def missing_extra() -> str | None:
    """The one-line message to print when the serve extra is not installed, else None."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        return f"eec serve needs the serve extra ({e.name} is missing): pip install 'eec[serve]'"
    return None
