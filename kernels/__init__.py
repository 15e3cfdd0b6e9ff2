"""Built-in tasks in FlashInfer Trace layout (data only)."""
