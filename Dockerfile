# One image for both services: `python -m checkpoint_svc` and `python -m engine_svc`
# (docker-compose.yml picks the command), and the `wf` client. Two distributions, each
# pinning its own dependencies: the client (clients/python) and the services (pyproject.toml),
# each package copied at its own path.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml ./
COPY checkpoint_svc ./checkpoint_svc
COPY engine_svc ./engine_svc
COPY clients/python/pyproject.toml ./clients/python/pyproject.toml
COPY clients/python/workflow_stubs ./clients/python/workflow_stubs
COPY clients/python/workflow_client ./clients/python/workflow_client
COPY clients/python/workflow_rpc ./clients/python/workflow_rpc
RUN pip install ./clients/python . && rm -rf /src

# Run from an empty directory as an unprivileged user, so the installed packages are the ones
# imported (not a source tree) and an embedded SQLite store (./data/) would land here.
RUN useradd --system --uid 10001 --home-dir /app --create-home app
WORKDIR /app
USER app

# gRPC ports: checkpoint_svc 50051, engine_svc 50052 (both configurable). By default the image
# runs the checkpoint service on its embedded SQLite store; docker-compose.yml names the
# service to run and its listen address (CHECKPOINT_LISTEN, ENGINE_LISTEN).
EXPOSE 50051 50052
ENV CHECKPOINT_LISTEN=0.0.0.0:50051
CMD ["python", "-m", "checkpoint_svc"]
# grpc.health.v1 SERVING of the container's own service: the port of ENGINE_LISTEN, else that
# of CHECKPOINT_LISTEN or the engine's default 50052 (clients/python/workflow_rpc/probe.py).
HEALTHCHECK --interval=5s --timeout=5s --start-period=10s --retries=12 \
    CMD ["python", "-m", "workflow_rpc.probe"]
