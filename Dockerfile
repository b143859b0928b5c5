# One image for every Visionyard service; the command picks the service
# (visionyard-api, visionyard-runner, visionyard-tracker, visionyard-storage).
# The runner image carries the built-in trainer and therefore torch (CPU build).
FROM python:3.11-slim
WORKDIR /app
COPY shared shared
COPY services services
COPY trainers trainers
COPY cli cli
ARG WITH_TRAINERS=1
# Point this at a CPU wheel index (or a local wheel directory) to avoid PyPI's CUDA build of torch.
ARG TORCH_INDEX_URL=""
RUN pip install --no-cache-dir -e shared -e services/api -e services/tracker -e services/storage \
        -e services/trainer-runner -e cli \
 && if [ "$WITH_TRAINERS" = "1" ]; then \
        pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url $TORCH_INDEX_URL} torch==2.13.0 \
        && pip install --no-cache-dir -e trainers/classifier; fi
USER 65534
ENV VISIONYARD_API_HOST=0.0.0.0
