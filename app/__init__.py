"""Fine-tuning job service: the API, the database and the job lifecycle (no torch here)."""
