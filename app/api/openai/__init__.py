"""OpenAI-compatible fine-tuning API (/v1): a thin layer over the service's own services."""
