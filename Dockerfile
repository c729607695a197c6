# The identity-service image: `identity-service serve` as a non-root user (UID 10001) on a
# read-only root file system. docs/operations.md runs it through the Helm chart in helm/.
#
# The base is pinned by version and by digest, so a rebuild never picks up a moved tag. The
# digest is the multi-platform index of python:3.11.16-slim-bookworm as published on Docker
# Hub (the project's tests run on Python 3.11). No Docker engine or registry is reachable
# where this file was written: the digest was taken from public Dockerfiles pinning that
# image and must be checked before the first release. To move to a newer base, update both
# FROM lines together with what
#   docker buildx imagetools inspect python:3.11-slim-bookworm
# prints as the index digest. tests/test_dockerfile.py holds this file to its rules.

# -- builder: wheels for the service and every dependency ----------------------------------
FROM python:3.11.16-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# A compiler only for a dependency without a wheel for the build platform (the usual ones,
# hiredis, uvloop, httptools, orjson, cryptography, ada-url, all have manylinux wheels).
# It stays in this stage.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

# The dependencies come from requirements/image.txt: every version pinned and every file
# checked against its hash, so a rebuild installs what was tested, not what PyPI has today.
# Refresh it when pyproject.toml's dependencies change (tests/test_dockerfile.py checks it
# still covers them):
#   pip-compile --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links \
#     --output-file requirements/image.txt pyproject.toml
#
# The service's own wheel is built with requirements/build.txt's setuptools (pyproject.toml's
# [build-system] requires, pinned, checked by hash) rather than whatever setuptools PyPI
# has today, which pip would fetch into an isolated build environment.
WORKDIR /src
COPY requirements/image.txt requirements/build.txt ./requirements/
RUN pip wheel --wheel-dir /wheels --require-hashes -r requirements/image.txt \
    && pip install --require-hashes --only-binary :all: -r requirements/build.txt
COPY pyproject.toml README.md ./
COPY identity_service ./identity_service
RUN pip wheel --wheel-dir /wheels --no-build-isolation --no-deps . \
    && python -m venv /opt/identity-service \
    && /opt/identity-service/bin/pip install --no-index --find-links /wheels identity-service \
    && /opt/identity-service/bin/python -m pip uninstall --yes --quiet pip setuptools

# -- runtime: the virtual environment built above, nothing else added ----------------------
FROM python:3.11.16-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b AS runtime

ARG VERSION=0.4.0
LABEL org.opencontainers.image.title="identity-service" \
      org.opencontainers.image.description="Keeps one visitor one person across domains" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# Nothing is written outside /tmp: no bytecode caches (the virtual environment was compiled
# at install), and prometheus_client's multiprocess files go to a directory the service
# makes under TMPDIR, an emptyDir in the chart.
ENV PATH=/opt/identity-service/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp

# The installers go: Python 3.11's venv added pip and setuptools 65.5 (CVE-2024-6345 and
# others, which image scanners report) to the environment above, and the base has its
# own; the service needs none of them to run, nor should anyone who gets a shell in it.
RUN /usr/local/bin/python -m pip uninstall --yes --quiet pip setuptools wheel \
    && groupadd --system --gid 10001 identity \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin identity

COPY --from=builder /opt/identity-service /opt/identity-service

USER 10001:10001
WORKDIR /tmp
EXPOSE 8080

# GET /healthz where the running command listens: `serve` on its --port (8080 here),
# `forward` on IDENTITY_FORWARDER_METRICS_PORT (9464); identity_service/healthcheck.py reads
# the command from the container's first process. No curl or wget in the image.
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-m", "identity_service.healthcheck"]

ENTRYPOINT ["identity-service"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
