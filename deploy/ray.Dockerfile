# Ray node image for srum (head and workers of docker-compose.yml).
# GPU variant by default (CUDA); build with --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311 for CPU nodes.
# Keep the Ray version equal to the `ray` the project resolves to, or jobs fail with a version mismatch.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

# The project and its dependencies (torch, diffusers, transformers, segment-anything, ...). The source is
# also bind-mounted at /srum and put first on PYTHONPATH by the compose file, so the installed copy only
# provides dependencies and the `srum` command.
COPY --chown=ray:users . /tmp/srum-src
RUN pip install --no-cache-dir /tmp/srum-src && rm -rf /tmp/srum-src

# Mount points owned by the ray user, so the named volumes mounted there are writable.
RUN mkdir -p /tmp/ray /home/ray/.cache/huggingface && sudo mkdir -p /models && sudo chown ray:users /models
WORKDIR /srum
