# syntax=docker/dockerfile:1
# CargoLint Webhooks: one image for `migrate`, `api` and `worker` (deploy/README.md).

# Build: install the package and its runtime dependencies (never the dev extra) into a venv.
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine ./engine
RUN /opt/venv/bin/pip install --no-cache-dir . \
    && /opt/venv/bin/python -m compileall -q /opt/venv

# Run: the slim base, the venv, an unprivileged user; no compiler, no pip cache, no sources.
FROM python:3.11-slim-bookworm
RUN groupadd --system --gid 10001 cargolint \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin cargolint
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CARGOLINT_API_HOST=0.0.0.0
# Numeric, so Kubernetes can check runAsNonRoot without reading /etc/passwd.
USER 10001:10001
# 8080: the API (and its /metrics); 9100: the worker's /metrics, /healthz, /readyz.
EXPOSE 8080 9100
ENTRYPOINT ["cargolint-webhooks"]
CMD ["--help"]
