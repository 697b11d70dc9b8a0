# corsproxy: a CORS-enforcing reverse proxy in front of any HTTP API.
#
#   docker build -t corsproxy .
#   docker run --rm -p 8080:8080 --read-only \
#     -v "$PWD/config/production.yaml:/etc/corsproxy/config.yaml:ro" corsproxy
#
# The policy is read from /etc/corsproxy/config.yaml (CORSPROXY_CONFIG); mount yours
# there. Arguments after the image name replace CMD and go to the `corsproxy` command,
# e.g. `docker run ... corsproxy check` or `... corsproxy run --host 0.0.0.0 --upstream URL`.
#
# BASE is any Debian-like image with python3 (3.11+) and its venv module: the official
# slim image by default; CI builds on a Debian bookworm stand-in made with debootstrap
# (`--build-arg BASE=...`). Both stages must use the same BASE: the virtualenv's python
# is a link to the base's own.
#
# corsproxy runs as PID 1 and handles SIGTERM itself: in-flight requests get
# listen.shutdown_grace (default 10 s), then are cut, and it exits 0 within about a
# second more. Docker's own default (`docker stop`) is 10 s before SIGKILL, so stop it
# with `docker stop --time 15` / `docker run --stop-timeout 15` (compose:
# stop_grace_period: 15s), or set listen.shutdown_grace below 9 s.
# tests/test_docker.py builds and runs this image on a real engine; tests/test_packaging.py
# lints it with hadolint.
ARG BASE=python:3.11-slim-bookworm

# --- builder: a virtualenv with corsproxy and its dependencies (wheels from PyPI) ---
FROM ${BASE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /build
COPY pyproject.toml README.md ./
COPY corsproxy/ ./corsproxy/
# The package itself, not an editable checkout; pip (and setuptools) leave the venv after.
RUN python3 -m venv /opt/corsproxy \
    && /opt/corsproxy/bin/python -m pip install --no-cache-dir . \
    && /opt/corsproxy/bin/python -m pip uninstall --yes pip setuptools

# --- the image: the base plus the virtualenv; no compiler, no pip cache, no build tree ---
FROM ${BASE}

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="corsproxy" \
      org.opencontainers.image.description="CORS-enforcing reverse proxy: one YAML policy in front of any HTTP API" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT"

# PATH is spelled out so the virtualenv comes first on any base (one imported with no ENV).
# TMPDIR: the only files corsproxy writes are the metrics of listen.workers (a temporary
# directory shared by the worker processes); /dev/shm is a writable tmpfs in Docker and
# Kubernetes containers even with a read-only root file system.
ENV PATH=/opt/corsproxy/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/dev/shm \
    CORSPROXY_CONFIG=/etc/corsproxy/config.yaml

RUN groupadd --system --gid 10001 corsproxy \
    && useradd --system --uid 10001 --gid corsproxy --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin corsproxy \
    && mkdir -p /etc/corsproxy

# Owned by root and read-only for the proxy's user: it runs with a read-only root file
# system (`docker run --read-only`): it logs to stdout and stderr and writes no files
# but the metrics of listen.workers, under TMPDIR.
COPY --from=builder /opt/corsproxy /opt/corsproxy

WORKDIR /
USER 10001:10001
EXPOSE 8080
STOPSIGNAL SIGTERM

# GET /healthz on the admin listener (admin.host/admin.port from CORSPROXY_CONFIG; default
# 127.0.0.1:9901, inside the container): exit 0 on 200. With admin.port: null it sends a
# preflight to the listener instead. The upstream is never touched.
HEALTHCHECK --interval=15s --timeout=5s --start-period=5s --retries=3 \
    CMD ["corsproxy", "healthcheck"]

ENTRYPOINT ["corsproxy"]
CMD ["run", "--host", "0.0.0.0"]
