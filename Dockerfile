# One image for the API and the GPU worker. PyPI's Linux torch wheels are CUDA builds; the
# worker needs the NVIDIA container runtime. (Another issue pins and checks the T4 build.)
FROM python:3.11-slim

ARG TORCH_SPEC=torch==2.13.0
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    FINETUNE_DATA_DIR=/data \
    HF_HOME=/cache/huggingface

WORKDIR /srv/finetune
RUN pip install "${TORCH_SPEC}"
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
COPY examples ./examples
RUN pip install -e ".[train]" \
    && useradd --create-home --uid 1000 finetune \
    && mkdir -p /data /cache/huggingface \
    && chown -R finetune:finetune /data /cache /srv/finetune/examples

USER finetune
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s \
    CMD ["python", "-c", "import urllib.request,os; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"FINETUNE_PORT\", \"8000\")}/healthz')"]
CMD ["finetune", "serve"]
