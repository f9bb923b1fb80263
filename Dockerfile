# The ingest service image: `docker compose up` builds it (see README.md, "Run the whole stack").
# Two stages so that the runtime image carries the installed package and nothing used to build it.

# IMAGE_PREFIX: where the base image is found under another name (docker-compose.yml passes
# STACK_IMAGE_PREFIX; empty, the default, is Docker Hub's python:3.11-slim or its stand-in).
ARG IMAGE_PREFIX=
FROM ${IMAGE_PREFIX}python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
# pyproject finds the package under service/; the top-level migrations/ ships as ingest.migrations.
COPY pyproject.toml README.md ./
COPY service/ service/
COPY migrations/ migrations/
RUN /opt/venv/bin/pip install .

FROM ${IMAGE_PREFIX}python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# A fixed, unprivileged uid and gid (10001 both): nothing in the container runs as root.
# /var/lib/ingest/spool and /var/lib/ingest/tokens are where the compose stack mounts its volumes;
# made here so that a new volume starts owned by ingest.
RUN groupadd --system --gid 10001 ingest \
 && useradd --system --uid 10001 --gid ingest --home-dir /var/lib/ingest --create-home \
        --shell /usr/sbin/nologin ingest \
 && install -d -o ingest -g ingest /var/lib/ingest/spool /var/lib/ingest/tokens
COPY --from=build /opt/venv /opt/venv
USER ingest
# The default SQLite file (./ingest.db) lands here when no INGEST_DB_URL is given.
WORKDIR /var/lib/ingest
EXPOSE 8080
# slim has no curl: ask /readyz with the interpreter we already ship. urlopen raises on a 503,
# so the check fails while the pipeline is starting, shutting down or has lost its database.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('INGEST_PORT', '8080'), timeout=2)"]
CMD ["ingest", "serve", "--host", "0.0.0.0"]
