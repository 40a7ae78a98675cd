"""The Alembic migrations (env.py, versions/): inside the package, so an installed wheel or image
carries them. Alembic finds them as ``app:migrations`` (see app/migrate.py and alembic.ini)."""
