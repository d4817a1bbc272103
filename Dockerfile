# One image for both services:  docker run IMAGE siglip2 [flags]  |  docker run IMAGE qwen3 [flags]  (--tiny: on
# tiny random-weight models built at start-up). Every setting is the same environment variable as outside.
#   docker build -t embed .                          GPU image (CUDA torch; run it with --gpus all)
#   docker build -t embed:cpu --build-arg DEVICE=cpu .   CPU-only image: no CUDA libraries
# BASE_IMAGE: any Debian-like image with python3 (3.11+) and its venv module, e.g. Debian bookworm with python3 and
# python3-venv. Both stages use it: the virtualenv links to its python3.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder
# cuda: the pinned torch as the package index has it, which is the CUDA build on x86_64. cpu: the same torch
# version from the CPU-wheel index (a build argument, so that a mirror or a local index can stand in for it).
ARG DEVICE=cuda
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python3 -m venv /opt/venv
COPY requirements.txt /tmp/requirements.txt
# torch first, alone (--no-deps: the CPU index need not hold its dependencies); requirements.txt then finds its
# pin (==2.13.0 matches 2.13.0+cpu) already met and installs torch's dependencies from the package index.
RUN set -eu; \
    torch=$(grep -E '^torch==' /tmp/requirements.txt); \
    case "$DEVICE" in \
      cuda) ;; \
      cpu) /opt/venv/bin/pip install --no-cache-dir --no-deps --index-url "$TORCH_CPU_INDEX_URL" "$torch+cpu" ;; \
      *) echo "DEVICE must be cuda or cpu, not '$DEVICE'" >&2; exit 1 ;; \
    esac; \
    /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt; \
    if [ "$DEVICE" = cpu ] && /opt/venv/bin/pip list 2>/dev/null | grep -qi '^nvidia-'; then \
      echo "DEVICE=cpu installed CUDA libraries" >&2; exit 1; \
    fi
# pip's compiled bytecode stays: the image's user cannot write it, so without it every start compiled torch's and
# transformers' sources again (imports took 11-13 s in a container here, 4 s with it; the CPU image is 0.24 GB larger).

FROM ${BASE_IMAGE}
# A fixed non-root user (no useradd: the base may lack it). Models are mounted read-only under /models; hub ids
# download into HF_HOME, a volume.
RUN echo 'embed:x:10001:10001:embed:/home/embed:/usr/sbin/nologin' >> /etc/passwd \
    && echo 'embed:x:10001:' >> /etc/group \
    && mkdir -p /home/embed /hf-cache /models \
    && chown 10001:10001 /home/embed /hf-cache
# The dependency layer before the code: a code-only change rebuilds only the layers below.
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/embed \
    HF_HOME=/hf-cache \
    EMBED_HOST=0.0.0.0 \
    EMBED_MODELS_MOUNT=/models
WORKDIR /app
COPY common/ common/
# The services import embed_client.formats: the accepted image formats, which the client shares.
COPY embed_client/ embed_client/
COPY scripts/__init__.py scripts/container_entrypoint.py scripts/container_health.py scripts/local_http.py scripts/
COPY siglip2_embed.py qwen3_embed.py ./
RUN python3 -m compileall -q common embed_client scripts siglip2_embed.py qwen3_embed.py
USER 10001:10001
EXPOSE 6010 6011
# Healthy only while GET /health answers 200; the start period covers a first start that downloads a model.
HEALTHCHECK --interval=5s --timeout=5s --start-period=900s --retries=3 \
    CMD ["/opt/venv/bin/python3", "-m", "scripts.container_health"]
# The service drains on SIGTERM (up to 30 s): docker stop needs --time 40 (compose.yaml sets stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/venv/bin/python3", "-m", "scripts.container_entrypoint"]
