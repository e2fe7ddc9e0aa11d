"""`uora_rt.load(base, adapters=[...])`: one base model, any number of UORA adapters, batches in
which every sequence may use a different adapter (or none)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from uora_rt.models import checkpoint
from uora_rt import models
from uora_rt.core import format as fmt
from uora_rt.models.common import PaddedAttention
from uora_rt.adapters.pool import AdapterPool


@dataclass
class Output:
    logits: torch.Tensor | None = None         # decoders: [B, L, V] float32
    hidden_states: torch.Tensor | None = None  # encoders: [B, L, H]
    pooled: torch.Tensor | None = None         # encoders: [B, H]


def resolve_base(base) -> Path:
    """A folder, or a name of a packaged model: "smollm2" (default) or "minilm"."""
    if base is None or base in ("smollm2", "SmolLM2-135M-Instruct"):
        from uora_rt.models.gguf_import import default_base

        return default_base()
    if base in ("minilm", "all-MiniLM-L6-v2"):
        from uora_rt.models.assets import minilm_dir

        return minilm_dir()
    return Path(base)


def pool_settings(config: dict, device: torch.device, dtype) -> tuple[str, torch.dtype]:
    """(base architecture, dtype of the shared factors) of a runtime's adapter pool."""
    arch = (config.get("architectures") or [config.get("model_type", "?")])[0]
    return arch, dtype if device.type == "cuda" else torch.float32


class Runtime:
    """A base model, its adapter pool and (for decoders) its tokenizer. Build with `load`
    (a checkpoint folder) or `Runtime.random` (random weights, for benchmarks). Under tensor
    parallelism (`load(..., tensor_parallel=N)`) `model` is rank 0's shard, `pool` the driver's
    pool (parallel/driver.py) and `tp` the group; call close() (or leave it to atexit)."""

    def __init__(self, model, config: dict, device, folder=None, parallel_shrink=None,
                 slots: int = 64, pool=None):
        self.folder, self.config = (Path(folder) if folder else None), config
        self.device, self.dtype = torch.device(device), model.embed.weight.dtype if hasattr(
            model, "embed") else model.word.weight.dtype
        self.model = model.eval().requires_grad_(False)
        arch, factor_dtype = pool_settings(config, self.device, self.dtype)
        # On the GPU the shrink runs beside the base GEMM on a side stream (measured against
        # appending A_cat's rows to a copy of every base weight: as fast, and no copies,
        # bench/results/decode_gpu_routes.json); on the CPU (compute-bound) only adapter rows
        # should pay for it.
        split = self.device.type == "cuda" if parallel_shrink is None else parallel_shrink
        self.pool = pool if pool is not None else AdapterPool(
            model.sites(), self.device, arch, split, slots, factor_dtype)
        self.tp = None  # parallel.driver.TensorParallel when tensor_parallel > 1
        self.codec = None
        if self.folder is not None and (self.folder / "tokenizer.json").is_file():
            from uora_rt.models.tokenizer import TextCodec

            self.codec = TextCodec(self.folder)
        self.merged: str | None = None
        self.weights_version = 0  # bumped by merge/unmerge: engines drop what they derived
        self._in_flight = 0       # requests of engines and synchronous batches being served
        self._flight_lock = threading.Lock()

    @staticmethod
    def _empty_model(config, folder, names, device, dtype):
        with torch.device("meta"):
            model = models.build(config, folder, names)
        model = model.to(dtype).to_empty(device=torch.device(device))
        if hasattr(model, "init_buffers"):
            model.init_buffers()
        return model

    @classmethod
    def from_folder(cls, folder, device="cpu", dtype=torch.float32, parallel_shrink=None, slots=64,
                    tensor_parallel: int = 1):
        folder = Path(folder)
        if tensor_parallel != 1:
            from uora_rt.parallel.driver import load_runtime

            return load_runtime(cls, folder, device, dtype, slots, tensor_parallel)
        config = checkpoint.read_config(folder)
        index = checkpoint.tensor_index(folder)
        model = cls._empty_model(config, folder, index.keys(), device, dtype)
        model.load_checkpoint(checkpoint.load_tensors(folder))
        return cls(model, config, device, folder, parallel_shrink, slots)

    @classmethod
    def random(cls, config: dict, device="cpu", dtype=torch.float32, seed=0,
               parallel_shrink=None, slots=64):
        """Random weights (N(0, 0.02), norms 1) for a transformers-style config: benchmarks only."""
        model = cls._empty_model(config, "<random>", [], device, dtype)
        g = torch.Generator(device=model.embed.weight.device).manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1 and "norm" in name:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=g)
        return cls(model, config, device, None, parallel_shrink, slots)

    # --- adapters ---------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return sorted(self.pool.entries)

    def add_adapter(self, path, name: str | None = None) -> str:
        """Validates a `.uora` file (or an in-memory fmt.Adapter) against the base and registers
        it (host memory; it is uploaded to a device slot when a request needs it). Returns its
        name. Never disturbs requests in flight."""
        adapter = path if isinstance(path, fmt.Adapter) else fmt.load(path)
        name = name or (Path(adapter.path).stem if adapter.path else None)
        if not name:
            raise ValueError("add_adapter: give a name for an in-memory adapter")
        self.pool.add(name, adapter)
        return name

    def remove_adapter(self, name: str) -> None:
        """New requests for `name` fail (KeyError) at once; requests already holding it finish
        with it, and its slot returns when the last of them ends."""
        if name == self.merged:
            raise ValueError(f"{name!r} is merged into the weights: unmerge() first")
        self.pool.remove(name)

    def enter(self) -> None:
        with self._flight_lock:
            self._in_flight += 1

    def exit(self) -> None:
        with self._flight_lock:
            self._in_flight -= 1

    def _check_idle(self, what: str) -> None:
        if self._in_flight:
            raise ValueError(f"{what}: {self._in_flight} request(s) are being served; the weights "
                             f"can only change when none is")

    # --- single-adapter serving with zero overhead --------------------------------------------
    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Folds one adapter into the base weights; until unmerge(), every sequence must use it."""
        if self.tp is not None:
            raise ValueError("merge: not supported under tensor parallelism")
        if self.merged is not None:
            raise ValueError(f"{self.merged!r} is already merged: unmerge() first")
        self._check_idle("merge")
        self._fold(name, +1.0)
        self.merged = name

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged is None:
            raise ValueError("no adapter is merged")
        self._check_idle("unmerge")
        self._fold(self.merged, -1.0)
        self.merged = None

    def _fold(self, name: str, sign: float) -> None:
        entry = self.pool.entries.get(name)
        if entry is None:
            raise KeyError(f"no adapter named {name!r}; loaded: {self.adapters}")
        fam = entry.family
        a_cat, b_cat = fam.factors_f32
        r = fam.r
        p = fam.host_p[entry.row]
        a = p[:, None] * a_cat[:r] + (1 - p[:, None]) * a_cat[r:] if fam.has_q else a_cat
        b = p * b_cat[:, :r] + (1 - p) * b_cat[:, r:] if fam.has_q else b_cat
        for site_name, (lam_d, lam_b) in self.pool.vectors(name).items():
            site = self.pool.sites[site_name]
            delta = (lam_b[:, None] * b[: site.out]) @ (lam_d[:, None] * a[:, : site.inp])
            w = self.model.group_linear(site.layer, site.group).weight
            rows = w[site.col: site.col + site.out]
            rows.copy_((rows.float() + sign * delta.to(w.device)).to(w.dtype))
        self.weights_version += 1  # captured graphs are stale

    # --- batches ----------------------------------------------------------------------------
    def check_merged(self, names) -> None:
        if self.merged is not None and any(n != self.merged for n in names):
            raise ValueError(f"the runtime is merged with {self.merged!r}: every sequence must "
                             f"use it (unmerge() to serve others)")

    def _row_hook(self, names, held, valid):
        """The hook of a padded batch: each row's adapter slot on its valid tokens."""
        slots, with_q = self._row_slots(names, held, valid)
        return self.pool.hook(slots, with_q) if slots else None

    def _row_slots(self, names, held, valid):
        per_fam, with_q = {}, {}
        for i, n in enumerate(names):
            if n is None:
                continue
            e = held[n]
            t = per_fam.setdefault(e.family, torch.full(valid.shape, -1, dtype=torch.int32))
            t[i] = e.slot
            with_q[e.family] = with_q.get(e.family, False) or e.has_q
        pad = ~valid.cpu()
        slots = {f: t.masked_fill(pad, -1).reshape(-1).to(self.device) for f, t in per_fam.items()}
        return slots, with_q

    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, adapters=None) -> Output:
        """input_ids [B, L]; attention_mask [B, L] (1 = token, 0 = padding, either side);
        adapters: one name or None per sequence. One pass, no KV cache."""
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
        self.check_merged(names)
        served = [] if self.merged is not None else names
        self.enter()
        try:
            with self.pool.serving(served) as held:
                if self.tp is not None:
                    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
                    slots, with_q = self._row_slots(served, held, valid) if held else ({}, {})
                    return Output(logits=self.tp.run_padded(ids, positions, valid, slots,
                                                            with_q).float())
                hook = self._row_hook(served, held, valid) if held else None
                if self.model.kind == "decoder":
                    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
                    logits = self.model(ids, positions, PaddedAttention(valid), hook)
                    return Output(logits=logits.float())
                hidden, pooled = self.model(ids, valid, hook)
                return Output(hidden_states=hidden, pooled=pooled)
        finally:
            self.exit()

    def close(self) -> None:
        """Stops the tensor-parallel workers (also run at exit); nothing to do otherwise."""
        if self.tp is not None:
            self.tp.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def generate(self, prompts, adapters=None, max_new_tokens=64, temperature=0.0, top_p=1.0,
                 top_k=0, stop=None, seed=0, chat=None):
        """See uora_rt.generate.generate (a loop over an engine)."""
        from uora_rt.engine.generate import generate

        return generate(self, prompts, adapters, max_new_tokens, temperature, top_p, top_k, stop,
                        seed, chat)


def load(base=None, adapters=(), device="cpu", dtype=torch.float32, parallel_shrink=None,
         slots: int = 64, tensor_parallel: int = 1) -> Runtime:
    """Loads a Hugging Face base checkpoint folder (or "smollm2" / "minilm") and adapters given
    as paths or (name, path) pairs. parallel_shrink (default: on for CUDA) computes each
    adapter family's shared shrink as one GEMM beside the base GEMM (AdapterPool); slots: device slots per projection family, i.e. how many
    distinct adapters of one family can run at once (any number can be registered: the others
    wait in host memory). tensor_parallel: ranks (processes) the decoder is split across; 1 is
    the single-process path, N > 1 starts N - 1 worker processes (see uora_rt.parallel.driver;
    parallel_shrink does not apply there)."""
    rt = Runtime.from_folder(resolve_base(base), device, dtype, parallel_shrink, slots,
                             tensor_parallel)
    try:
        for a in adapters:
            name, path = a if isinstance(a, tuple) else (None, a)
            rt.add_adapter(path, name)
    except BaseException:
        rt.close()  # a tensor-parallel runtime's workers must not outlive a failed load
        raise
    return rt
