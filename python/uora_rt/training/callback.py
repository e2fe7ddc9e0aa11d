"""`UORACallback`: UORA's reinitialization for a Hugging Face `Trainer` (needs transformers).

    uora_rt.inject(model, uora_rt.UORAConfig(r=256, target_modules=["query", "value"]))
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[UORACallback(save_path="adapter.uora")])

The Trainer's optimizer already takes only the trainable lambda vectors (inject froze the rest).
After every optimizer step the callback runs `reinit_step` on the device without waiting for the
host; the event count joins the Trainer's log history (`trainer.state.log_history`,
`trainer_state.json`) as `uora_reinit_events`, and the adapter is written
at each checkpoint (`adapter.uora` in the checkpoint folder) and, with save_path, at the end.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from uora_rt.training.inject import find_shared, reinit_step, save_adapter


class UORACallback(TrainerCallback):
    def __init__(self, save_path=None):
        self.save_path = save_path
        self.events = None  # a device tensor: no host sync per step

    @staticmethod
    def _model(kwargs):
        model = kwargs.get("model")
        if model is None or find_shared(model) is None:
            raise ValueError("UORACallback: the Trainer's model has no UORA adapter; call "
                             "uora_rt.inject(model, config) before building the Trainer")
        return model

    def on_train_begin(self, args, state, control, **kwargs):
        self._model(kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        # Called once per optimizer step (after gradient accumulation), after opt.step().
        fired = reinit_step(self._model(kwargs), sync=False)
        self.events = fired if self.events is None else self.events + fired

    @property
    def total_events(self) -> int:
        return 0 if self.events is None else int(self.events)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The Trainer has already copied `logs` into its history and handed them to the
        # callbacks before this one (user callbacks come last), so the count goes into both.
        n = self.total_events
        if logs is not None:
            logs["uora_reinit_events"] = n
        if state.log_history:
            state.log_history[-1]["uora_reinit_events"] = n

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                save_adapter(self._model(kwargs), folder / "adapter.uora")

    def on_train_end(self, args, state, control, **kwargs):
        if self.save_path and state.is_world_process_zero:
            save_adapter(self._model(kwargs), self.save_path)
