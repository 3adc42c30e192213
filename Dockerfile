# The toolkit in a CUDA container: train, evaluate and serve TensorBoard on port 6006.
#   docker build -t classification .
#   docker run --gpus all -p 6006:6006 -it -v $PWD:/app/classification classification
# CUDA 13.0 + cuDNN to match the torch 2.14.1 (cu130) wheels pinned in requirements.txt.
FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# VENV is where scripts/*.sh and the Makefile find Python: the image's venv, not a mounted checkout's .venv.
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg \
    VENV=/opt/venv \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu 24.04's python3 (3.12) for the venv; make for `make tensorboard`.
# Distro package versions are not pinned: the base image fixes the release, and old versions leave the archive.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates make \
    && rm -rf /var/lib/apt/lists/*

# A non-root user with the usual first host UID, so files written into a mounted checkout stay yours
# (--build-arg UID=$(id -u) if yours differs; Ubuntu's image has user `ubuntu` at 1000, replaced here).
# The user owns the venv, so scripts/test.sh can add the test tools inside the container.
ARG UID=1000
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --create-home --uid "$UID" --shell /bin/bash app \
    && install -d -o app -g app "$VENV" /app/classification
USER $UID
RUN python3 -m venv "$VENV"
WORKDIR /app/classification

# Requirements first: a code change reuses this layer instead of reinstalling torch.
# The pinned requirements.txt is the one list (onnxruntime-gpu comes through its x86_64 marker).
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

COPY --chown=app:app . .
EXPOSE 6006
CMD ["bash", "-c", "echo 'classification: python train.py --help | python eval.py --help | make tensorboard (port 6006)'; exec bash"]
