"""`uora_rt.load(base, adapters=[...])`: one base model, any number of UORA adapters, batches in
which every sequence may use a different adapter (or none)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from uora_rt import models
from uora_rt.adapters.manager import AdapterManager, factor_dtype_for
from uora_rt.core import format as fmt
from uora_rt.engine.runner import padded_forward
from uora_rt.kernels.routes import KernelPrefs
from uora_rt.models import checkpoint
from uora_rt.models.bases import resolve_base

__all__ = ["Output", "Runtime", "load", "resolve_base"]


@dataclass
class Output:
    logits: torch.Tensor | None = None         # decoders: [B, L, V] float32
    hidden_states: torch.Tensor | None = None  # encoders: [B, L, H]
    pooled: torch.Tensor | None = None         # encoders: [B, H]


def _architecture(config: dict) -> str:
    return (config.get("architectures") or [config.get("model_type", "?")])[0]


class Runtime:
    """A base model, its adapters (manager: an adapters.manager.AdapterManager) and, for decoders
    with a tokenizer.json, its tokenizer (codec). Build with `load` (a checkpoint folder) or
    `Runtime.random` (random weights, for benchmarks). Under tensor parallelism
    (`load(..., tensor_parallel=N)`) `model` is rank 0's shard and `tp` drives the other ranks;
    call close() (or leave it to atexit). kernel_prefs: which kernels to prefer (kernels.routes;
    benchmarks compare paths through it)."""

    def __init__(self, model, config: dict, device, folder=None, parallel_shrink=None,
                 slots: int = 64, manager: AdapterManager | None = None, tp=None):
        self.folder, self.config = (Path(folder) if folder else None), config
        self.device = torch.device(device)
        self.model = model.eval().requires_grad_(False)
        self.dtype = (model.embed if model.kind == "decoder" else model.word).weight.dtype
        self.manager = manager if manager is not None else AdapterManager(
            model.sites(), self.device, _architecture(config), slots,
            factor_dtype_for(self.device, self.dtype))
        self.kernel_prefs = KernelPrefs(parallel_shrink=parallel_shrink)
        self.tp = tp  # parallel.driver.TensorParallel when tensor_parallel > 1
        self.heads: dict[str, fmt.Head] = {}  # adapter name -> its task head (encoders)
        self._encoder_tok = None
        self.codec = None
        if self.folder is not None and (self.folder / "tokenizer.json").is_file():
            from uora_rt.models.tokenizer import TextCodec

            self.codec = TextCodec(self.folder)

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
            from uora_rt.parallel.driver import launch

            model, config, manager, tp = launch(folder, device, dtype, slots, tensor_parallel)
            return cls(model, config, tp.device, folder, False, slots, manager, tp)
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

    @property
    def eos_token_ids(self) -> list[int]:
        """The config's end-of-sequence ids and the tokenizer's."""
        v = self.config.get("eos_token_id")
        eos = set(v if isinstance(v, list) else [v] if v is not None else [])
        if self.codec and self.codec.eos_id is not None:
            eos.add(self.codec.eos_id)
        return sorted(eos)

    # --- adapters ---------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return self.manager.names()

    def add_adapter(self, path, name: str | None = None, source=None) -> str:
        """Validates a `.uora` file (or an in-memory fmt.Adapter) against the base and registers
        it (host memory; it is uploaded to a device slot when a request needs it). Returns its
        name. Never disturbs requests in flight; a failure registers nothing. source: where the
        adapter came from, as /v1/models reports it (default: its file)."""
        adapter = path if isinstance(path, fmt.Adapter) else fmt.load(path)
        name = name or (Path(adapter.path).stem if adapter.path else None)
        if not name:
            raise ValueError("add_adapter: give a name for an in-memory adapter")
        head = adapter.head
        if head is not None and head.hidden != self.model.spec.hidden:
            raise ValueError(f"{adapter.path or name}: its task head reads {head.hidden} "
                             f"features; this base has {self.model.spec.hidden}")
        self.manager.add(name, adapter, source)
        if head is not None:  # (names are unique: remove_adapter drops the head with the name)
            self.heads[name] = head
        return name

    def remove_adapter(self, name: str) -> None:
        """New requests for `name` fail (KeyError) at once; requests already holding it finish
        with it, and its slot returns when the last of them ends."""
        self.manager.remove(name)
        self.heads.pop(name, None)

    # --- single-adapter serving with zero overhead --------------------------------------------
    @property
    def merged(self) -> str | None:
        return self.manager.merged

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Folds one adapter into the base weights; until unmerge(), every sequence must use it."""
        if self.tp is not None:
            raise ValueError("merge: not supported under tensor parallelism")
        with self.manager.changing_weights("merge"):
            if self.manager.merged is not None:
                raise ValueError(f"{self.manager.merged!r} is already merged: unmerge() first")
            self._fold(name, +1.0)
            self.manager.merged = name

    @torch.no_grad()
    def unmerge(self) -> None:
        with self.manager.changing_weights("unmerge"):
            if self.manager.merged is None:
                raise ValueError("no adapter is merged")
            self._fold(self.manager.merged, -1.0)
            self.manager.merged = None

    def _fold(self, name: str, sign: float) -> None:
        entry = self.manager.entries.get(name)
        if entry is None:
            raise KeyError(f"no adapter named {name!r}; loaded: {self.adapters}")
        fam = entry.family
        a_cat, b_cat = fam.factors_f32
        r = fam.r
        p = fam.host_p[entry.row]
        a = p[:, None] * a_cat[:r] + (1 - p[:, None]) * a_cat[r:] if fam.has_q else a_cat
        b = p * b_cat[:, :r] + (1 - p) * b_cat[:, r:] if fam.has_q else b_cat
        for site_name, (lam_d, lam_b) in self.manager.vectors(name).items():
            site = self.manager.sites[site_name]
            delta = (lam_b[:, None] * b[: site.out]) @ (lam_d[:, None] * a[:, : site.inp])
            w = self.model.group_linear(site.layer, site.group).weight
            rows = w[site.col: site.col + site.out]
            rows.copy_((rows.float() + sign * delta.to(w.device)).to(w.dtype))
        self.model.weights_version += 1  # captured graphs are stale

    # --- batches ----------------------------------------------------------------------------
    def _row_slots(self, names, held, valid):
        """Each token's slot per family id: a row's adapter on its valid tokens, -1 elsewhere."""
        per_fam, with_q = {}, {}
        for i, n in enumerate(names):
            if n is None:
                continue
            e = held[n]
            fid = e.family.fid
            t = per_fam.setdefault(fid, torch.full(valid.shape, -1, dtype=torch.int32))
            t[i] = e.slot
            with_q[fid] = with_q.get(fid, False) or e.has_q
        pad = ~valid.cpu()
        slots = {f: t.masked_fill(pad, -1).reshape(-1).to(self.device) for f, t in per_fam.items()}
        return slots, with_q

    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, adapters=None,
                token_type_ids=None) -> Output:
        """input_ids [B, L]; attention_mask [B, L] (1 = token, 0 = padding, either side);
        adapters: one name or None per sequence; token_type_ids [B, L]: an encoder's segments
        (sentence pairs; None = all 0). One pass, no KV cache."""
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
        types = None
        if token_type_ids is not None:
            if self.model.kind == "decoder":
                raise ValueError("token_type_ids: only encoders have token types")
            types = torch.as_tensor(token_type_ids, dtype=torch.long, device=self.device)
            if types.shape != ids.shape:
                raise ValueError(f"token_type_ids: expected {list(ids.shape)}, got "
                                 f"{list(types.shape)}")
        served = [] if self.manager.admit(names) is not None else names
        try:
            with self.manager.serving(served) as held:
                slots, with_q = self._row_slots(served, held, valid) if held else ({}, {})
                positions = (valid.long().cumsum(1) - 1).clamp(min=0)
                args = (self.model, self.manager, self.kernel_prefs, ids, positions, valid,
                        slots, with_q)
                out = (self.tp.forward_padded(*args) if self.tp is not None
                       else padded_forward(*args, types=types))
                if self.model.kind == "decoder":
                    return Output(logits=out.float())
                return Output(hidden_states=out[0], pooled=out[1])
        finally:
            self.manager.exit()

    @torch.no_grad()
    def classify(self, texts, adapters, text_pairs=None, max_len: int = 512) -> list[dict]:
        """An encoder's predictions with the task heads stored in its adapters (`uora-rt
        train` on text/label rows): one forward for the whole batch, each text through its own
        adapter and that adapter's head. adapters: one name per text (or one name for all);
        text_pairs: the second sentence of each pair, or None. Returns per text
        {"adapter", "label", "probabilities"} (classification) or {"adapter", "value"}
        (regression). Texts longer than max_len tokens are truncated."""
        from uora_rt.models.common import pool
        from uora_rt.models.tokenizer import encoder_tokenizer

        if self.model.kind != "encoder":
            raise ValueError("classify: needs an encoder base (a BERT-family model); "
                             "decoders generate text (Runtime.generate, Engine)")
        if self.folder is None or not (self.folder / "tokenizer.json").is_file():
            raise ValueError("classify: this base has no tokenizer.json to encode texts with")
        texts = [texts] if isinstance(texts, str) else list(texts)
        names = [adapters] * len(texts) if isinstance(adapters, str) else list(adapters)
        pairs = [None] * len(texts) if text_pairs is None else list(text_pairs)
        if len(names) != len(texts) or len(pairs) != len(texts):
            raise ValueError(f"classify: {len(texts)} texts, {len(names)} adapters and "
                             f"{len(pairs)} text pairs (expected one each)")
        for name in dict.fromkeys(names):
            if name not in self.heads:
                known = "not loaded" if name not in self.manager else "has no task head"
                raise ValueError(f"classify: adapter {name!r} {known} (train one on "
                                 "text/label rows with `uora-rt train` to get a head)")
        if self._encoder_tok is None or self._encoder_tok[0] != max_len:
            self._encoder_tok = (max_len, encoder_tokenizer(self.folder, max_len))
        enc = [self._encoder_tok[1].encode(t, p) for t, p in zip(texts, pairs)]
        width = max((len(e.ids) for e in enc), default=0)
        ids = torch.full((len(enc), width), self.model.spec.pad_id, dtype=torch.long)
        types = torch.zeros_like(ids)
        valid = torch.zeros_like(ids, dtype=torch.bool)
        for i, e in enumerate(enc):
            n = len(e.ids)
            ids[i, :n], types[i, :n], valid[i, :n] = (torch.tensor(e.ids),
                                                     torch.tensor(e.type_ids), True)
        hidden = self.forward(ids, valid, names, types).hidden_states
        valid = valid.to(hidden.device)
        out: list[dict] = [{} for _ in texts]
        for name in dict.fromkeys(names):  # one head per distinct adapter, over its rows
            rows = [i for i, n in enumerate(names) if n == name]
            head = self.heads[name]
            sel = torch.tensor(rows, device=hidden.device)
            x = pool(hidden.index_select(0, sel), valid.index_select(0, sel), head.pooling)
            y = (x @ head.weight.to(x).T + head.bias.to(x)).cpu()
            for k, i in enumerate(rows):
                if head.task == "classification":
                    probs = torch.softmax(y[k], -1)
                    out[i] = {"adapter": name, "label": int(probs.argmax()),
                              "probabilities": probs.tolist()}
                else:
                    out[i] = {"adapter": name, "value": float(y[k, 0])}
        return out

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
        """See uora_rt.engine.generate.generate (a loop over an engine)."""
        from uora_rt.engine.generate import generate

        return generate(self, prompts, adapters, max_new_tokens, temperature, top_p, top_k, stop,
                        seed, chat)


def load(base=None, adapters=(), device="cpu", dtype=torch.float32, parallel_shrink=None,
         slots: int = 64, tensor_parallel: int = 1) -> Runtime:
    """Loads a Hugging Face base checkpoint folder (or "smollm2" / "minilm") and adapters given
    as paths or (name, path) pairs. parallel_shrink (default: on for CUDA) computes each
    adapter family's shared shrink as one GEMM beside the base GEMM (kernels.routes); slots:
    device slots per projection family, i.e. how many distinct adapters of one family can run at
    once (any number can be registered: the others wait in host memory). tensor_parallel: ranks
    (processes) the decoder is split across; 1 is the single-process path, N > 1 starts N - 1
    worker processes (see uora_rt.parallel; parallel_shrink does not apply there)."""
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
