"""Shared services: the one implementation under every interface (REST, CLI, worker)."""
