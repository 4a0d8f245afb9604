"""`eec serve` scaled out on Ray Serve: replicas of the same application behind Ray's router and autoscaler.

Why Ray Serve (and not Triton through PyTriton): eec's server is an ASGI
application with streaming responses, and Ray Serve runs an ASGI application
as its deployment's ingress unchanged, in every replica, with its own HTTP
proxy, request router, autoscaling and cluster membership; it pip-installs and
runs on CPU, so the same deployment is tested on a laptop and spread over a
cluster. Triton serves tensors in and out through its own protocol: the
OpenAI routes, streaming text and per-request options would have to be
rebuilt on top of it as a second front-end.

Each replica is a Ray actor that loads the artifact itself (the path must be
readable on every node: a shared filesystem or the same copy everywhere) and
runs its own engine; Ray's proxy spreads requests over them and streams each
answer back. ``/metrics`` through the proxy is one replica's; scrape replicas
directly, or use Ray's own metrics, for the fleet.

    ray start --head                      # on one machine; others: ray start --address HEAD:6379
    eec serve model.eec --replicas 4 --ray-address auto

or with Ray's own tooling, a config file (see `build`)::

    applications:
      - name: eec
        import_path: eec.serve.ray_app:build
        args: {artifact: /models/model.eec, max_batch: 8, threads: 2}
        deployments:
          - name: eec
            autoscaling_config: {min_replicas: 1, max_replicas: 8, target_ongoing_requests: 16}
            ray_actor_options: {num_cpus: 2}

    serve deploy config.yaml
"""

from __future__ import annotations

import os
from typing import Any

from eec.errors import InputError


class Replica:
    """One replica: the artifact loaded and served by `create_app` in this actor."""

    def __init__(self, artifact: str, options: dict[str, Any]):
        self.artifact, self.options = artifact, options

    def __serve_build_asgi_app__(self):
        from eec.serve.app import create_app

        return create_app(self.artifact, **self.options)


def deployment(artifact: str | os.PathLike, *, replicas: int | str = 1, cpus: float = 1.0,
               max_ongoing: int | None = None, name: str | None = None, **options):
    """A bound Ray Serve application serving ``artifact``: ``replicas`` copies (or "auto": Ray's autoscaler
    between 1 and 8), each holding ``cpus`` of Ray's CPUs; ``options`` go to `create_app` (``max_batch``,
    ``max_queue``, ``threads``, ``epsilon``, ``monitor``). ``max_ongoing``: requests Ray routes to one
    replica at once (default: its batch plus its queue, so that Ray's router, not the replica, queues the rest)."""
    from ray import serve

    from eec.runtime.manifest import artifact_schema

    path = os.path.abspath(artifact)
    artifact_schema(path)  # a one-line error here rather than in every replica's log
    options = dict(options, name=name or os.path.basename(path.rstrip("/")))
    scale: dict[str, Any]
    if replicas == "auto":
        scale = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 16}}
    elif isinstance(replicas, int) and not isinstance(replicas, bool) and replicas >= 1:
        scale = {"num_replicas": replicas}
    else:
        raise InputError(f"replicas must be a whole number of at least 1, or auto; got {replicas!r}")
    ongoing = max_ongoing or options.get("max_batch", 8) + options.get("max_queue", 256)
    cls = serve.deployment(serve.ingress()(Replica), name="eec", max_ongoing_requests=ongoing,
                           ray_actor_options={"num_cpus": cpus}, **scale)
    return cls.bind(path, options)


def build(args: dict[str, Any]):
    """Ray Serve's application builder (``import_path: eec.serve.ray_app:build``): ``args`` hold
    ``artifact`` and `deployment`'s other arguments."""
    args = dict(args)
    if "artifact" not in args:
        raise InputError("the Ray Serve config's args must name the artifact")
    return deployment(args.pop("artifact"), **args)
