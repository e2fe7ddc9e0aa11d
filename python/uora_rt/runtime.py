"""`uora_rt.load(base, adapters=[...])`: one base model, any number of UORA adapters, batches in
which every sequence may use a different adapter (or none)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from uora_rt import checkpoint, models
from uora_rt import format as fmt
from uora_rt.pool import AdapterPool, family_factors


@dataclass
class Output:
    logits: torch.Tensor | None = None         # decoders: [B, L, V] float32
    hidden_states: torch.Tensor | None = None  # encoders: [B, L, H]
    pooled: torch.Tensor | None = None         # encoders: [B, H]


def resolve_base(base) -> Path:
    """A folder, or a name of a packaged model: "smollm2" (default) or "minilm"."""
    if base is None or base in ("smollm2", "SmolLM2-135M-Instruct"):
        from uora_rt.gguf_import import default_base

        return default_base()
    if base in ("minilm", "all-MiniLM-L6-v2"):
        from uora_rt.assets import minilm_dir

        return minilm_dir()
    return Path(base)


class Runtime:
    """A base model, its adapter pool and (for decoders) its tokenizer. Build with `load`
    (a checkpoint folder) or `Runtime.random` (random weights, for benchmarks)."""

    def __init__(self, model, config: dict, device, folder=None, fuse_shrink=None,
                 slots: int = 4):
        self.folder, self.config = (Path(folder) if folder else None), config
        self.device, self.dtype = torch.device(device), model.embed.weight.dtype if hasattr(
            model, "embed") else model.word.weight.dtype
        self.model = model.eval().requires_grad_(False)
        arch = (config.get("architectures") or [config.get("model_type", "?")])[0]
        # On the GPU the shrink rides in the base GEMM (decode is weight-read-bound, the extra rows
        # cost ~nothing); on the CPU (compute-bound) only adapter rows should pay for it.
        fuse = self.device.type == "cuda" if fuse_shrink is None else fuse_shrink
        factor_dtype = self.dtype if self.device.type == "cuda" else torch.float32
        self.pool = AdapterPool(model.sites(), self.device, arch, model.group_linear, fuse, slots,
                                factor_dtype)
        self.codec = None
        if self.folder is not None and (self.folder / "tokenizer.json").is_file():
            from uora_rt.tokenizer import TextCodec

            self.codec = TextCodec(self.folder)
        self.merged: str | None = None
        from uora_rt.decode_graphs import DecoderCache

        self.decoders = DecoderCache()

    @staticmethod
    def _empty_model(config, folder, names, device, dtype):
        with torch.device("meta"):
            model = models.build(config, folder, names)
        model = model.to(dtype).to_empty(device=torch.device(device))
        if hasattr(model, "init_buffers"):
            model.init_buffers()
        return model

    @classmethod
    def from_folder(cls, folder, device="cpu", dtype=torch.float32, fuse_shrink=None, slots=4):
        folder = Path(folder)
        config = checkpoint.read_config(folder)
        index = checkpoint.tensor_index(folder)
        model = cls._empty_model(config, folder, index.keys(), device, dtype)
        model.load_checkpoint(checkpoint.load_tensors(folder))
        return cls(model, config, device, folder, fuse_shrink, slots)

    @classmethod
    def random(cls, config: dict, device="cpu", dtype=torch.float32, seed=0, fuse_shrink=None,
               slots=4):
        """Random weights (N(0, 0.02), norms 1) for a transformers-style config: benchmarks only."""
        model = cls._empty_model(config, "<random>", [], device, dtype)
        g = torch.Generator(device=model.embed.weight.device).manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1 and "norm" in name:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=g)
        return cls(model, config, device, None, fuse_shrink, slots)

    # --- adapters ---------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return sorted(self.pool.entries)

    def add_adapter(self, path, name: str | None = None) -> str:
        """Validates a `.uora` file against the base and makes it servable. Returns its name."""
        adapter = path if isinstance(path, fmt.Adapter) else fmt.load(path)
        name = name or (Path(adapter.path).stem if adapter.path else None)
        if not name:
            raise ValueError("add_adapter: give a name for an in-memory adapter")
        self.pool.add(name, adapter)
        return name

    def remove_adapter(self, name: str) -> None:
        if name == self.merged:
            raise ValueError(f"{name!r} is merged into the weights: unmerge() first")
        self.pool.remove(name)

    # --- single-adapter serving with zero overhead --------------------------------------------
    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Folds one adapter into the base weights; until unmerge(), every sequence must use it."""
        if self.merged is not None:
            raise ValueError(f"{self.merged!r} is already merged: unmerge() first")
        self._fold(name, +1.0)
        self.merged = name

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged is None:
            raise ValueError("no adapter is merged")
        self._fold(self.merged, -1.0)
        self.merged = None

    def _fold(self, name: str, sign: float) -> None:
        entry = self.pool.entries.get(name)
        if entry is None:
            raise KeyError(f"no adapter named {name!r}; loaded: {self.adapters}")
        ad = entry.adapter
        a_cat, b_cat, has_q = family_factors(ad)
        r = ad.r
        p = ad.p.float()
        a = p[:, None] * a_cat[:r] + (1 - p[:, None]) * a_cat[r:] if has_q else a_cat
        b = p * b_cat[:, :r] + (1 - p) * b_cat[:, r:] if has_q else b_cat
        for t, site_name in zip(ad.targets, entry.targets):
            site = self.pool.sites[site_name]
            delta = (ad.lambda_b[t][:, None] * b[: site.out]) @ (ad.lambda_d[t][:, None] * a[:, : site.inp])
            w = self.model.group_linear(site.layer, site.group).weight
            rows = w[site.col: site.col + site.out]
            rows.copy_((rows.float() + sign * delta.to(w.device)).to(w.dtype))
        self.pool.clear_fused()

    # --- batches ----------------------------------------------------------------------------
    def _hook(self, names, token_valid):
        if self.merged is not None:
            if any(n != self.merged for n in names):
                raise ValueError(f"the runtime is merged with {self.merged!r}: every sequence must "
                                 f"use it (unmerge() to serve others)")
            return None
        return self.pool.batch(names, token_valid)

    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, adapters=None) -> Output:
        """input_ids [B, L]; attention_mask [B, L] (1 = token, 0 = padding, either side);
        adapters: one name or None per sequence."""
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        if ids.dim() != 2:
            raise ValueError(f"input_ids: expected [batch, length], got {list(ids.shape)}")
        valid = (torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else
                 torch.as_tensor(attention_mask, device=self.device).bool())
        if valid.shape != ids.shape:
            raise ValueError(f"attention_mask: expected {list(ids.shape)}, got {list(valid.shape)}")
        names = list(adapters) if adapters is not None else [None] * ids.shape[0]
        if len(names) != ids.shape[0]:
            raise ValueError(f"adapters: expected {ids.shape[0]} entries (one per sequence), "
                             f"got {len(names)}")
        hook = self._hook(names, valid)
        try:
            if self.model.kind == "decoder":
                positions = (valid.long().cumsum(1) - 1).clamp(min=0)
                cache = self.model.new_cache(ids.shape[0], ids.shape[1])
                logits = self.model(ids, positions, valid, cache, hook)
                return Output(logits=logits.float())
            hidden, pooled = self.model(ids, valid, hook)
            return Output(hidden_states=hidden, pooled=pooled)
        finally:
            if hook is not None:
                hook.close()

    def generate(self, prompts, adapters=None, max_new_tokens=64, temperature=0.0, top_p=1.0,
                 top_k=0, stop=None, seed=0, chat=None, static=None):
        """See uora_rt.generate.generate."""
        from uora_rt.generate import generate

        return generate(self, prompts, adapters, max_new_tokens, temperature, top_p, top_k, stop,
                        seed, chat, static)


def load(base=None, adapters=(), device="cpu", dtype=torch.float32, fuse_shrink=None,
         slots: int = 4) -> Runtime:
    """Loads a Hugging Face base checkpoint folder (or "smollm2" / "minilm") and adapters given
    as paths or (name, path) pairs. fuse_shrink (default: on for CUDA) computes the adapters'
    shared shrink inside the base GEMM; slots: initial adapter slots per projection family (the
    tables double when full; on the GPU a full table means new CUDA graphs, so size it)."""
    rt = Runtime.from_folder(resolve_base(base), device, dtype, fuse_shrink, slots)
    for a in adapters:
        name, path = a if isinstance(a, tuple) else (None, a)
        rt.add_adapter(path, name)
    return rt
