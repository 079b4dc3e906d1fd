# The job's image for Kubernetes (KubeRay): Ray 2.60 on Python 3.11, this project's pinned stack, and
# its code at /home/ray/mnist-ray-train, the path jobs/rayjob.yaml and jobs/raycronjob.yaml run from.
#   docker build -t REGISTRY/mnist-ray-train:0.1.0 .                              # CPU nodes
#   docker build --build-arg VARIANT=gpu -t REGISTRY/mnist-ray-train:0.1.0-gpu .  # GPU nodes
# No data, models or tokens go in (.dockerignore): data and the model store live on a volume, and
# KubeRay hands each pod the cluster's token.
ARG VARIANT=cpu
FROM rayproject/ray:2.60.0-py311-${VARIANT}
ARG VARIANT
# The base image's own user (uid 1000, home /home/ray): pip installs into its Python.
USER ray
WORKDIR /home/ray/mnist-ray-train
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users trainer/ trainer/
COPY --chown=ray:users jobs/ jobs/
COPY --chown=ray:users scripts/ scripts/
# Exactly pyproject.toml's pins, with MLflow's client (the tracking extra: set MLFLOW_TRACKING_URI in a
# manifest's env to track); on GPU images TensorFlow's CUDA libraries at the same pin.
RUN pip install --no-cache-dir ".[tracking]" \
 && if [ "$VARIANT" = gpu ]; then pip install --no-cache-dir "tensorflow[and-cuda]==2.21.0"; fi
ENV PYTHONUNBUFFERED=1
