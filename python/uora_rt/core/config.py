"""UORAConfig: the hyper-parameters of a UORA adapter (docs/design.md §1)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Default targets per transformers model_type: the attention query/value projections, as PEFT does.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "gpt2": ["c_attn"],
}


@dataclass
class UORAConfig:
    """r: shared rank; target_modules: names matched exactly or as a dotted suffix (a list), or a
    regex full match (a str), None = the model type's default; seed: projection seed;
    d_initial: initial lambda_d; alpha: interpolation factor; tau: reinit threshold on |lambda_d|;
    k: fire on every k-th observation below tau; dropout: on the adapter's input."""

    r: int = 256
    target_modules: list[str] | str | None = None
    seed: int = 0
    d_initial: float = 0.1
    alpha: float = 0.5
    tau: float = 1e-5
    k: int = 1
    dropout: float = 0.0

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"UORAConfig.r must be a positive int, got {self.r!r}")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"UORAConfig.alpha must be in (0, 1], got {self.alpha}")
        if self.tau < 0:
            raise ValueError(f"UORAConfig.tau must be >= 0, got {self.tau}")
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"UORAConfig.k must be an int >= 1, got {self.k!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UORAConfig.dropout must be in [0, 1), got {self.dropout}")

    def training_record(self) -> dict:
        """The hyper-parameters stored (informationally) in every adapter file."""
        d = asdict(self)
        d.pop("target_modules")
        d.pop("r")
        d.pop("seed")
        return d
