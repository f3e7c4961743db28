# syntax=docker/dockerfile:1
# One image for the API, the workers and the reconciler.
#   CPU image (default):  docker build -t distill .
#   CUDA image for GPU workers:
#     docker build -t distill:gpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# The CUDA wheels of torch carry their own CUDA libraries; the host needs the NVIDIA driver and
# the NVIDIA container toolkit (docker-compose.yml reserves the GPU for worker-gpu).

FROM python:3.11-slim AS base
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 distill
# bubblewrap builds the cage every uploaded model is opened in (docs/SECURITY.md); prlimit and
# setpriv come with util-linux.
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap util-linux \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app

# torch first, from the index that matches the image (CPU or CUDA), so the project's
# torch requirement is already satisfied and never pulls a different build.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

COPY pyproject.toml README.md alembic.ini ./
COPY core ./core
COPY api ./api
COPY worker ./worker
COPY client ./client
COPY cli ./cli
COPY migrations ./migrations
RUN pip install .

USER distill
ENV DISTILL_ENVIRONMENT=production DISTILL_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)" || exit 1
CMD ["distill", "api", "--host", "0.0.0.0", "--port", "8000"]
