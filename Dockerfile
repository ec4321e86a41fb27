# dspy-trio service image (not built by this repository's tests or CI; the tests lint this file).
#   docker build -t dspy-trio .
#   docker run --rm -p 8000:8000 -e LM_API_BASE=https://api.openai.com/v1 -e LM_MODEL=gpt-4o-mini -e LM_API_KEY dspy-trio
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DSPY_TRIO_HOST=0.0.0.0 \
    DSPY_TRIO_PORT=8000

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --shell /usr/sbin/nologin app

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY engine ./engine
COPY web ./web
# The runtime only: no test tools, no browser.
RUN pip install --no-cache-dir .

USER 10001:10001
EXPOSE 8000

# /ready is 200 when serving and 503 while starting or draining; python's stdlib, no curl in the image.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('DSPY_TRIO_PORT', '8000'), timeout=2)"]

# Exec form: dspy-trio itself is PID 1 (no shell in between) and receives SIGTERM, so it drains in-flight
# requests (DSPY_TRIO_DRAIN_TIMEOUT, default 10 s) before exiting; keep `docker stop -t` above that.
STOPSIGNAL SIGTERM
CMD ["dspy-trio", "serve"]
