"""The REST interface: thin routes over app.services."""
