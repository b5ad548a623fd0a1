# syntax=docker/dockerfile:1
# CargoLint Webhooks: one image for `migrate`, `api` and `worker` (deploy/README.md).

# Build: the runtime dependencies exactly as uv.lock pins them (never the dev extra), then the
# project's own wheel, into a venv.
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# The same uv release as ./dev; it only turns uv.lock into a hashed requirements list.
RUN pip install --no-cache-dir uv==0.13.8 \
    && python -m venv /opt/venv
WORKDIR /src
# Dependencies first, in their own layer: a code change reuses it.
COPY pyproject.toml uv.lock ./
RUN uv export --locked --no-dev --no-emit-project --format requirements-txt \
        --output-file /tmp/requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir --require-hashes --no-deps \
        -r /tmp/requirements.txt
COPY README.md ./
COPY engine ./engine
RUN /opt/venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /tmp/dist . \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps /tmp/dist/cargolint_webhooks-*.whl \
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
