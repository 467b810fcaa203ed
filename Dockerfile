# One image for every role: web, coordinator, beat and node agents.
FROM python:3.11-slim-bookworm
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends openssl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml requirements.lock README.md ./
COPY themis_dashboard ./themis_dashboard
COPY updates ./updates
COPY tenants ./tenants
COPY workers ./workers
COPY templates ./templates
COPY manage.py ./
RUN pip install --no-cache-dir -c requirements.lock '.[production]' \
    && DJANGO_SETTINGS_MODULE=themis_dashboard.settings.base python manage.py collectstatic --noinput
RUN useradd --create-home themis && mkdir -p /var/lib/themis && chown themis /var/lib/themis
USER themis
ENV THEMIS_VAR_DIR=/var/lib/themis
EXPOSE 8000
CMD ["gunicorn", "themis_dashboard.wsgi:application", "--bind", "0.0.0.0:8000", "--workers", "3"]
