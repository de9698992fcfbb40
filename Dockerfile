# The VAE service image: the FastAPI app, the offline trainer, and scripts/serve.sh, which trains
# a model into /srv/models on first start when none is there and then serves it.

# A build arg, so a pinned digest or a bookworm tag can be swapped in without editing this file.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# PyTorch's CPU index keeps the image ~1 GB instead of pulling several GB of CUDA libraries;
# an empty value (--build-arg TORCH_INDEX_URL=) means "use pip's configured sources" instead,
# and docker-compose.gpu.yml points it at a CUDA index.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

# Unbuffered logs reach `docker logs` at once; no .pyc writes or pip cache bloat the layers, and
# pip installing as root is intended here (the app itself runs as `vae`).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

# A fixed, unprivileged uid, so files written to volumes have a predictable owner and a
# compromised process cannot write to the code or the system.
RUN groupadd --gid 10001 vae \
 && useradd --uid 10001 --gid vae --home-dir /srv --no-create-home --shell /usr/sbin/nologin vae

WORKDIR /srv

# Torch alone in its own layer: it is the largest dependency and changes least, so edits to the
# app never re-download it.
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"

# Only what the distribution needs to build, so unrelated changes (tests, docs) keep the cache.
COPY pyproject.toml README.md ./
COPY app/ app/
COPY training/ training/
COPY scripts/serve.sh scripts/serve.sh

# torch is already satisfied, so this pulls only the small runtime deps. No extras: training on
# first start needs only torch and numpy (it runs without a progress bar), so the image stays lean.
RUN pip install --no-cache-dir . \
 && chmod 0755 scripts/serve.sh

# Named volumes mounted on these paths copy the image's ownership, so the non-root user can
# write the trained artifact (and, for a fresh user, the MNIST download) into them.
RUN mkdir -p /srv/models /srv/data/mnist \
 && chown -R vae:vae /srv/models /srv/data

# Listen on all interfaces inside the container; paths point at the volume mounts.
ENV VAE_HOST=0.0.0.0 \
    VAE_PORT=8000 \
    VAE_MODEL_PATH=/srv/models/vae.pt \
    VAE_DATA_DIR=/srv/data/mnist

USER vae

EXPOSE 8000

# /ready, not /health: it turns 200 only once the model is loaded and warmed. The long start
# period covers training on first start; slim images have no curl, so python's urllib it is.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10m --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('VAE_PORT', '8000'), timeout=4)"]

# serve.sh trains when the artifact is missing and ends in `exec python -m app`, so the server
# replaces the shell as PID 1 and gets `docker stop`'s SIGTERM itself (a graceful shutdown).
CMD ["/srv/scripts/serve.sh"]
