"""Training UORA adapters: inject into any PyTorch model (inject, layers), train on the runtime's
own models from JSONL files (pipeline, data, heads) through one training loop (loop), a Hugging
Face Trainer callback; small template tasks for tests and the demo (tasks)."""


def __getattr__(name):
    # The callback needs transformers, which uora_rt does not depend on: import it on first use.
    if name == "UORACallback":
        from uora_rt.training.callback import UORACallback

        return UORACallback
    raise AttributeError(f"module 'uora_rt.training' has no attribute {name!r}")
