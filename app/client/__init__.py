"""The service's client side: an HTTP client and the `finetune` commands built on it."""
