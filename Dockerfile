# bids_fcd BIDS App image: CUDA-capable PyTorch, this package with the shipped default model, /run.py entry.
#
#   docker build --build-arg VERSION=$(cat version) -t bids_fcd:$(cat version) .
#   docker run --rm --gpus all -u $(id -u):$(id -g) -v /data/bids:/bids:ro -v /data/out:/out \
#       bids_fcd:$(cat version) /bids /out participant
#
# Without a GPU (or without --gpus) the same command runs on the CPU: --device auto falls back.
# Docs: docs/running.md (Docker, Apptainer, SLURM, OpenNeuro, Brainlife, CBRAIN).
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG VERSION=unknown
LABEL org.opencontainers.image.title="bids_fcd" \
      org.opencontainers.image.description="BIDS App that localises focal cortical dysplasia in T1w + FLAIR MRI (research use only)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/bids-fcd/bids_fcd" \
      org.opencontainers.image.licenses="MIT"

# Caches go to /tmp so that any user id works, in Docker (-u) and in a read-only Apptainer image alike.
ENV BIDS_FCD_CONTAINER=docker \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    NUMBA_CACHE_DIR=/tmp/numba \
    DENO_DIR=/tmp/deno \
    XDG_CACHE_HOME=/tmp/cache \
    HOME=/home/bidsfcd

WORKDIR /src
# Dependencies first, from pyproject.toml alone (a stub package), so that a code change reuses this layer.
# torch is already in the base image and satisfies pyproject's requirement, so pip keeps that CUDA build.
COPY pyproject.toml version README.md ./
# DL3013 (pin versions) mistakes ".[group]", this project, for a package name.
# hadolint ignore=DL3013
RUN mkdir bids_fcd && touch bids_fcd/__init__.py \
    && pip install ".[group]" \
    && rm -rf bids_fcd build ./*.egg-info

# The package itself, with its package data: the default model in bids_fcd/weights/.
COPY bids_fcd ./bids_fcd
RUN pip install --no-deps --force-reinstall . \
    && rm -rf /src

WORKDIR /
COPY --chmod=755 run.py /run.py

# The validator (deno), nilearn's template and deepbet's weights are all inside the installed packages: the
# image runs offline. ldconfig: Singularity/Apptainer cannot refresh the linker cache as a normal user.
RUN python -c "from bids_fcd.participant import DEFAULT_MODEL as m; assert m.is_file(), f'no default model {m}'" \
    && /run.py --version \
    && groupadd --gid 10001 bidsfcd \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/bidsfcd --shell /bin/bash bidsfcd \
    && chmod 1777 /home/bidsfcd \
    && ldconfig

# A fixed numeric id (not root): `docker run -u $(id -u):$(id -g)` maps it to you for bind-mounted output.
USER 10001:10001
WORKDIR /home/bidsfcd
ENTRYPOINT ["/run.py"]
