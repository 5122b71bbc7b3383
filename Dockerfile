# The taskfarm server's image, for docker-compose.yml (`docker-compose build`).
# It serves on port 5000 as an unprivileged user. Nothing secret is in it:
# DATABASE_URL and TASKFARM_SECRET come from the environment at run time.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md schema.sql openapi.json taskfarm.py store.py metrics.py admin.py dashboard.py taskfarm_client.py ./
# schema.sql and openapi.json are installed with the modules (into
# /usr/local/share/taskfarm); the code stays root's, read-only.
# test_deploy.py installs these same files.
RUN pip install . \
    && groupadd --system --gid 10001 taskfarm \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
               --home-dir /nonexistent --shell /usr/sbin/nologin taskfarm

USER 10001:10001
EXPOSE 5000
HEALTHCHECK --interval=10s --timeout=3s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/', timeout=3)"]
# Processes and threads from the environment. `docker-compose run web
# adminTF ...` replaces this command with the admin's.
CMD ["sh", "-c", "exec taskfarm-server --host 0.0.0.0 --port 5000 --workers \"${TASKFARM_WORKERS:-2}\" --threads \"${TASKFARM_THREADS:-8}\""]
