# nemo_minitron on the NeMo framework container, which carries CUDA PyTorch, megatron-core,
# Transformer Engine and apex; only this package (and its small pure-Python dependencies the
# container may lack) is added. Not built in CI (no Docker engine there).
#   docker build -t nemo-minitron .
ARG NEMO_IMAGE=nvcr.io/nvidia/nemo:25.11
FROM ${NEMO_IMAGE}

WORKDIR /opt/nemo_minitron
COPY pyproject.toml README.md ./
COPY nemo_minitron ./nemo_minitron
COPY recipes ./recipes
COPY launcher ./launcher
COPY scripts ./scripts
# --no-deps: never replace the container's torch / megatron-core / TE builds.
RUN pip install --no-cache-dir --no-deps -e . \
 && pip install --no-cache-dir sentencepiece safetensors psutil tensorboard \
 && python -c "import megatron.core, nemo_minitron.cli; print('megatron-core', megatron.core.__version__)"
ENTRYPOINT ["nemo-minitron"]
CMD ["--help"]
