# The VAE service image: the FastAPI app and the MNIST model that ships with the repository. It
# serves at once and never trains; `python -m training` runs outside it and exports the artifact.

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

# Only what the distribution needs, so unrelated changes (tests, docs) keep the cache. The
# trainer comes along (a few small files) for an explicit `python -m training` in the image.
COPY pyproject.toml README.md ./
COPY app/ app/
COPY scoring/ scoring/
COPY training/ training/

# torch is already satisfied, so this pulls only the small runtime deps; no extras.
RUN pip install --no-cache-dir .

# The MNIST model that ships with the repository, so the image serves at once, offline. To serve
# another artifact, mount it and point VAE_MODEL_PATH at it (docker-compose.yml shows how).
COPY models/default/vae.pt models/default/vae.pt

# Listen on all interfaces inside the container.
ENV VAE_HOST=0.0.0.0 \
    VAE_PORT=8000 \
    VAE_MODEL_PATH=/srv/models/default/vae.pt

USER vae

EXPOSE 8000

# /ready, not /health: it turns 200 only once the model is loaded and warmed (seconds). Slim
# images have no curl, so python's urllib it is.
HEALTHCHECK --interval=15s --timeout=5s --start-period=1m --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('VAE_PORT', '8000'), timeout=4)"]

# The server is PID 1, so it gets `docker stop`'s SIGTERM itself (a graceful shutdown).
CMD ["python", "-m", "app"]
