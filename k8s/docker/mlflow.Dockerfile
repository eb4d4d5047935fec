# syntax=docker/dockerfile:1
# MLflow tracking server image (k8s/platform/mlflow.yaml): MLflow + the PostgreSQL driver + boto3 (for an
# s3:// artifact destination). Needs no build context:
#   docker build -f k8s/docker/mlflow.Dockerfile -t horse-dist-mlflow:3.17.2 k8s/docker
FROM python:3.11-slim-bookworm

ARG MLFLOW_VERSION=3.17.2
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install "mlflow==${MLFLOW_VERSION}" "psycopg2-binary==2.9.13" "boto3==1.44.5" \
 && useradd --uid 1000 --create-home mlflow \
 && mkdir -p /mlartifacts && chown mlflow /mlartifacts

USER 1000
WORKDIR /home/mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host=0.0.0.0", "--port=5000"]

LABEL org.opencontainers.image.title="horse-dist-mlflow" \
      org.opencontainers.image.version="3.17.2"
