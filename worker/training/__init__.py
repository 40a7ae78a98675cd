"""Training: data, model, callbacks and the recipe that ties them together (imports torch)."""
