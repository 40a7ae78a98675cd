# One image for the API, the GPU worker and the sampler.
#
# torch comes from PyTorch's CUDA 12.8 index (drivers >= 570, as on current T4 images); with a
# driver >= 580 the CUDA 13 build works too (TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130):
# torch 2.11.0+cu130 reported torch.cuda.get_arch_list() = sm_75, sm_80, sm_86, sm_90, sm_100,
# sm_120 (read on an H100, 2026-11-28), so the T4 (sm_75) is covered; Volta (sm_70) is not.
# `docker compose run --rm worker finetune doctor` prints what the image has and whether each
# GPU it sees is covered; a job refuses to start on a GPU its torch build has no kernels for.
FROM python:3.11-slim-bookworm

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FINETUNE_DATA_DIR=/data \
    HF_HOME=/cache/huggingface

WORKDIR /srv/finetune

# torch first: the largest layer, and it changes least often. (Pinned through TORCH_SPEC.)
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

COPY pyproject.toml README.md alembic.ini constraints.txt ./
COPY app ./app
COPY worker ./worker
COPY examples ./examples
RUN pip install --no-cache-dir --constraint constraints.txt --editable ".[train,tracking]" \
    && useradd --create-home --uid 1000 finetune \
    && mkdir -p /data /cache/huggingface \
    && chown -R finetune:finetune /data /cache /srv/finetune/examples

USER 1000:1000
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s CMD ["finetune", "health", "api"]
CMD ["finetune", "serve"]
