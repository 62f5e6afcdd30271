# sdlora on a GPU box: CUDA runtime, a CUDA build of torch, the project with the pins from pyproject.toml.
#   docker build -t sdlora .
#   docker run --gpus all -v "$PWD:/data" -v hf-cache:/models sdlora train dataset out --base stable-diffusion-v1-5/stable-diffusion-v1-5
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/models

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first: on Linux x86_64 the registry's torch wheel is the CUDA build. The version must satisfy the
# range in pyproject.toml (a test checks it).
RUN pip install torch==2.13.0

WORKDIR /src
COPY pyproject.toml README.md ./
COPY sdlora ./sdlora
# The project with exactly the dependency pins of pyproject.toml, with the web app's extra (`sdlora serve`);
# open-clip-torch only for its CLIP vocabulary file (used by `sdlora demo`), without its dependencies (they
# would pull torchvision).
RUN pip install /src[ui] \
    && pip install --no-deps open-clip-torch==3.3.0

RUN useradd --create-home --uid 1000 sdlora \
    && mkdir -p /models /data \
    && chown sdlora:sdlora /models /data
USER 1000:1000
VOLUME ["/models"]
# sdlora serve /data --host 0.0.0.0 --auth-file /data/.auth
EXPOSE 7860
WORKDIR /data
ENTRYPOINT ["sdlora"]
CMD ["--help"]
