# corsproxy: a CORS-enforcing reverse proxy in front of any HTTP API.
#
#   docker build -t corsproxy .
#   docker run --rm -p 8080:8080 \
#     -v "$PWD/config/production.yaml:/etc/corsproxy/config.yaml:ro" corsproxy
#
# The policy is read from /etc/corsproxy/config.yaml (CORSPROXY_CONFIG); mount yours
# there. Arguments after the image name replace CMD and go to the `corsproxy` command,
# e.g. `docker run ... corsproxy check` or `... corsproxy run --host 0.0.0.0 --upstream URL`.
# On SIGTERM in-flight requests get listen.shutdown_grace (default 10 s), then are cut, and
# the process exits 0 within about a second more: stop it with `docker stop --time 15`
# (Docker's default of 10 s would SIGKILL it at the end of the grace), or set the grace lower.
# tests/test_packaging.py lints this file with hadolint and performs its install and
# start-up steps in a fresh virtualenv (no Docker engine runs in CI).
FROM python:3.11-slim-bookworm

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="corsproxy" \
      org.opencontainers.image.description="CORS-enforcing reverse proxy: one YAML policy in front of any HTTP API" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    CORSPROXY_CONFIG=/etc/corsproxy/config.yaml

WORKDIR /build
COPY pyproject.toml README.md ./
COPY corsproxy/ ./corsproxy/
RUN pip install --no-cache-dir . \
    && rm -rf /build \
    && groupadd --system --gid 10001 corsproxy \
    && useradd --system --uid 10001 --gid corsproxy --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin corsproxy \
    && mkdir -p /etc/corsproxy

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
