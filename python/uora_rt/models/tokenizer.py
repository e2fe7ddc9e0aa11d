"""Text in and out: a `tokenizers` tokenizer plus the checkpoint's chat template (jinja2)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer


class TextCodec:
    def __init__(self, folder):
        folder = Path(folder)
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.chat_template = cfg.get("chat_template")
        self._template = None
        self.special = {k: self._token_str(cfg.get(k)) for k in
                        ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.eos_id = self.tok.token_to_id(self.special["eos_token"] or "")
        pad = self.tok.token_to_id(self.special["pad_token"] or "")
        self.pad_id = pad if pad is not None else (self.eos_id or 0)

    @staticmethod
    def _token_str(v):
        return v.get("content") if isinstance(v, dict) else v

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._template is None:  # compiled once: a server renders one per request
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg):
                raise ValueError(f"chat template: {msg}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            **{k: v or "" for k, v in self.special.items()})

    def encode_prompt(self, prompt: str, chat: bool | None = None) -> list[int]:
        """A user prompt: through the chat template when the tokenizer has one (unless chat is
        False); the template writes its own special tokens."""
        use_chat = self.chat_template is not None if chat is None else chat
        if use_chat:
            if self.chat_template is None:
                raise ValueError("chat=True but the tokenizer has no chat template")
            text = self.render_chat([{"role": "user", "content": prompt}])
            return self.tok.encode(text, add_special_tokens=False).ids
        return self.tok.encode(prompt).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def encoder_tokenizer(folder, max_len: int):
    """An encoder base's tokenizer with our own truncation (longest first, to max_len tokens)
    and no padding: what training, evaluation and Runtime.classify all encode with."""
    tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_len)
    return tok
