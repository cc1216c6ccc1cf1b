# Ray node image for srum: the head and workers of docker-compose.yml and of deploy/kuberay/.
# GPU variant by default (CUDA); build with --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311 for CPU nodes.
# Keep the Ray version equal to the `ray` the project resolves to, or jobs fail with a version mismatch.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

# Optional: vLLM for judge replicas the job starts itself (judge.launch, one Ray actor per replica running
# `vllm serve`), e.g. the KubeRay judge group's image:
#   docker build -f deploy/ray.Dockerfile --build-arg VLLM_VERSION=0.32.0 -t srum-ray-vllm .
# Empty (the default) installs no vLLM. When set, vLLM goes into its own venv /opt/vllm, so its torch and CUDA
# pins never meet the project's; only its `vllm` command is linked onto PATH (/usr/local/bin), which is what
# judge.launch's default command runs. Use the release docker-compose.yml's judge image pins.
ARG VLLM_VERSION=
RUN if [ -n "${VLLM_VERSION}" ]; then \
        sudo mkdir -p /opt/vllm && sudo chown ray:users /opt/vllm \
        && python -m venv /opt/vllm && /opt/vllm/bin/pip install --no-cache-dir "vllm==${VLLM_VERSION}" \
        && sudo ln -sf /opt/vllm/bin/vllm /usr/local/bin/vllm; \
    fi

# The project and its dependencies (torch, diffusers, transformers, segment-anything, ...). The source stays
# at /srum in the image (configs/ included: what a KubeRay job runs, deploy/kuberay/); docker-compose
# bind-mounts the working tree over it and puts it first on PYTHONPATH, so edits apply to the next job.
COPY --chown=ray:users . /srum
RUN cp -r /srum /tmp/srum-src && pip install --no-cache-dir /tmp/srum-src && rm -rf /tmp/srum-src

# Mount points owned by the ray user, so the named volumes mounted there are writable.
RUN mkdir -p /tmp/ray /home/ray/.cache/huggingface && sudo mkdir -p /models /srum-runs \
    && sudo chown ray:users /models /srum-runs
WORKDIR /srum
