"""
Scale-out of `cognica-poe serve` on Ray Serve: N replicas of the SAME FastAPI app (server.create_app) behind one HTTP
endpoint. Each replica loads the model folder and runs its own continuous-batching engine; Ray's proxy spreads the
requests over the replicas, which may sit on one machine or on many machines of a Ray cluster (the model folder must
then be readable at the same path on every machine). Ray does the balancing, health checks and restarts: nothing here
re-implements them.

    from ray import serve
    from cognica_poe.ray_serve import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(build_app("path/to/model", replicas=2))    # or: cognica-poe serve path/to/model --ray --replicas 2

Every response carries an `X-Replica-Id` header naming the replica that answered.
"""

import os
import signal
import sys
import time

import ray
from ray import serve

from .config import CognicaPoEConfig
from .server import LOOPBACK, build, check_max_model_len, check_serve_args, create_app

REPLICA_HEADER = "X-Replica-Id"


def build_app(model: str, siblings: list[str] | None = None, api_key: str | None = None, dtype: str | None = None,
              pack: bool | str = "auto", max_batch: int = 16, max_queue: int = 64, prefill_chunk: int = 64,
              request_timeout: float | None = 600.0, max_model_len: int | None = None,
              served_model_name: str | None = None, replicas: int = 1, threads: int = 1,
              quantize: dict | None = None):
    """A Ray Serve application (for serve.run) of `replicas` copies of the server, each on `threads` CPUs.

    The app is built inside each replica (a builder function, not a pickled app), so every replica loads its own
    model and engine; the driver only checks the arguments and the folder, so a bad one fails here, not in Ray.
    """
    if replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {replicas}")
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    check_serve_args("127.0.0.1", 0, max_batch, max_queue, prefill_chunk, request_timeout)
    if not os.path.isdir(model):
        raise FileNotFoundError(f"{model} is not a model folder")
    check_max_model_len(CognicaPoEConfig.from_pretrained(model), max_model_len)

    def replica_app():
        """Runs in the replica: one torch thread per reserved CPU, the model, the engine and the app."""
        from .cpu import set_threads

        set_threads(threads)
        engine, tok, name = build(model, siblings, dtype, pack, max_batch, max_queue, prefill_chunk, quantize)
        app = create_app(engine, tok, served_model_name or name, api_key, max_model_len, request_timeout)
        replica_id = serve.get_replica_context().replica_id.unique_id

        @app.middleware("http")
        async def tag_replica(request, call_next):
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = replica_id
            return response

        return app

    deployment = serve.deployment(serve.ingress(replica_app)(), name="cognica-poe", num_replicas=replicas,
                                  ray_actor_options={"num_cpus": threads})
    return deployment.bind()


def serve_ray(model: str, siblings: list[str] | None = None, host: str = "127.0.0.1", port: int = 8000,
              api_key: str | None = None, replicas: int = 1, threads: int = 1, **kw) -> None:
    """`cognica-poe serve --ray`: join the Ray cluster (or start a local one), deploy, serve until interrupted.

    ray.init joins the cluster named by $RAY_ADDRESS or started on this machine by `ray start`, else starts a local
    instance without Ray's dashboard. The HTTP endpoint binds to `host` (loopback unless told otherwise).
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} is not a TCP port (0..65535)")
    api_key = api_key or os.environ.get("COGNICA_POE_API_KEY") or None
    if host not in LOOPBACK and not api_key:
        print(f"cognica-poe serve: warning: listening on {host} without --api-key: anyone who can reach this "
              "machine can use the model", file=sys.stderr)
    app = build_app(model, siblings, api_key, replicas=replicas, threads=threads, **kw)

    ray.init(include_dashboard=False)

    def stop(signum, frame):  # SIGTERM (systemd, docker stop) ends like Ctrl-C: the deployment is taken down
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # after ray.init, which installs a handler of its own that aborts
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name="cognica-poe", route_prefix="/")
        print(f"cognica-poe serve: {replicas} Ray Serve replica(s) on http://{host}:{port}/v1", file=sys.stderr,
              flush=True)
        while True:  # Ray's proxy serves; this process keeps the deployment until interrupted
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
