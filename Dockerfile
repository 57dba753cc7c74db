# embserve server image. CPU by default; CUDA with `--build-arg VARIANT=cuda` (run with the NVIDIA container runtime).
#
#   docker build -t embserve:0.1.0 .
#   docker build -t embserve:0.1.0-cuda --build-arg VARIANT=cuda .
#   docker run --rm -p 50051:50051 -p 9464:9464 embserve:0.1.0
#
# The install steps and versions are the Makefile's (tests/test_deploy.py keeps them in step): torch, fbgemm-gpu
# (the CPU wheel unless VARIANT=cuda), torchrec with --no-deps (it declares the CUDA fbgemm-gpu wheel; its real
# dependencies come from the `server` extra), then the package with the `server` extra.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG FBGEMM_VERSION=1.8.0
ARG TORCHREC_VERSION=1.8.0
# CPU images take torch's CPU-only wheel (no CUDA libraries); empty uses the default index (CUDA wheels).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/embserve
RUN set -eux; \
    if [ "$VARIANT" = "cuda" ]; then FBGEMM=fbgemm-gpu; INDEX=""; \
    elif [ "$VARIANT" = "cpu" ]; then FBGEMM=fbgemm-gpu-cpu; INDEX="${TORCH_INDEX_URL:+--index-url $TORCH_INDEX_URL}"; \
    else echo "VARIANT must be cpu or cuda, got $VARIANT" >&2; exit 1; fi; \
    pip install $INDEX "torch==${TORCH_VERSION}"; \
    pip install "torch==${TORCH_VERSION}" "${FBGEMM}==${FBGEMM_VERSION}"; \
    pip install --no-deps "torchrec==${TORCHREC_VERSION}"

COPY pyproject.toml README.md LICENSE ./
COPY protos ./protos
COPY embeddings ./embeddings
COPY server ./server
COPY client ./client
COPY benchmarks ./benchmarks
# pip's resolver notes that torchrec wants fbgemm-gpu; the CPU wheel provides the same modules, so that line is expected.
RUN pip install ".[server]" && embserve --help >/dev/null

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin embserve
USER 10001:10001

# gRPC (embserve.v1, health, reflection) and Prometheus metrics.
EXPOSE 50051 9464
# Weights and model YAML are mounted here (e.g. --model /models/model.yaml --checkpoint /models/model.safetensors).
VOLUME ["/models"]
ENTRYPOINT ["embserve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9464"]
