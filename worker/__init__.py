"""The GPU worker: a Celery app whose task runs one QLoRA training job by id."""
