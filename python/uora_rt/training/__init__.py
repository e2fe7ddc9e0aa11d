"""Training UORA adapters: inject into any PyTorch model (inject, layers), or train on the
runtime's own models (trainer); small template tasks for tests and the demo (tasks)."""
