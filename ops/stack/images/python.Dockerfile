# Stand-in for python:3.11-slim (no registry here): Debian's own Python 3.11 and its venv module,
# the BASE_IMAGE that make stack-test gives ops/docker/Dockerfile.
ARG DEBIAN_IMAGE=sentiment-stack/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
