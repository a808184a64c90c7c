# fenghuo relay image (README, "Operations"):
#   docker build -t fenghuo .
#   docker run -d -p 7700:7700 -p 7701:7701 -v fenghuo-data:/var/lib/fenghuo \
#     -e FENGHUO_SECRET=... fenghuo

# Build stage: the Cython core needs a C compiler, SQLite's headers (the
# store's writer calls its C API) and OpenSSL's (the tokens' HMAC calls
# libcrypto); the run stage has the libraries themselves.
FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libsqlite3-dev libssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY core core
COPY server server
COPY fenghuo fenghuo
RUN python -m venv /opt/fenghuo
# pip's cache stays in this stage; the image gets the virtualenv only.
RUN /opt/fenghuo/bin/pip install -q .

FROM python:3.11-slim
COPY --from=build /opt/fenghuo /opt/fenghuo
RUN useradd --system --home-dir /var/lib/fenghuo --create-home --shell /usr/sbin/nologin fenghuo
ENV PATH=/opt/fenghuo/bin:$PATH \
    FENGHUO_HOST=0.0.0.0 \
    FENGHUO_DATA_DIR=/var/lib/fenghuo
USER fenghuo
WORKDIR /var/lib/fenghuo
VOLUME /var/lib/fenghuo
# The client protocol (--port) and /metrics, /healthz (--metrics-port).
EXPOSE 7700 7701
# Healthy while /healthz answers 200 (a supervisor: every worker up).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FENGHUO_METRICS_PORT', '7701'), timeout=4)"]
ENTRYPOINT ["fenghuo", "serve"]
