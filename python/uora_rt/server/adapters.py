"""Adapters from disk: what a name may be, where a runtime-loaded path may point, how it is read.

- A path given to /v1/load_lora_adapter is relative to --adapter-dir (or absolute inside it);
  a `..` component is refused outright, and the path is resolved (symlinks followed) before the
  containment check, so a symlink cannot lead out of the folder.
- A `.uora` file is read with format.load; a PEFT VeRA folder (adapter_config.json) is
  converted on load (convert.from_peft, with the base folder giving the layers' shapes).
- Start-up adapters (--adapter NAME=PATH) are read the same way but may live anywhere: the
  operator chose them.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePath

from uora_rt.core import format as fmt
from uora_rt.server.errors import APIError

_NAME = re.compile(r"^[^\s\x00-\x1f\x7f\ud800-\udfff]{1,256}$")  # no lone surrogates either


def check_name(name: str, reserved: list[str]) -> None:
    if not _NAME.match(name):
        raise APIError(400, f"lora_name {name!r}: expected 1-256 characters without spaces or "
                            "control characters", "lora_name")
    if name in reserved:
        raise APIError(400, f"lora_name {name!r} is the served base model's name", "lora_name")


def read_adapter(path: Path, base_folder) -> fmt.Adapter:
    """A `.uora` file or a PEFT VeRA folder; AdapterFormatError (a ValueError) when malformed."""
    if path.is_dir():
        from uora_rt.convert import from_peft
        from uora_rt.convert.peft_dir import is_peft_folder

        if not is_peft_folder(path):
            raise ValueError(f"{path}: a folder must be a PEFT VeRA adapter (adapter_config.json "
                             "+ adapter_model.safetensors)")
        return from_peft(path, None, base=base_folder)
    return fmt.load(path)


class AdapterDir:
    """The one folder runtime loading may read from."""

    def __init__(self, root):
        self.given = Path(root).absolute()
        self.root = Path(root).resolve(strict=True)
        if not self.root.is_dir():
            raise NotADirectoryError(f"--adapter-dir {root}: not a directory")

    def resolve(self, lora_path: str) -> Path:
        if not lora_path or "\x00" in lora_path:
            raise APIError(400, "lora_path: expected a path inside the adapter folder", "lora_path")
        if ".." in PurePath(lora_path).parts:
            raise APIError(400, f"lora_path {lora_path!r}: '..' is not allowed", "lora_path")
        candidate = Path(lora_path)
        if not candidate.is_absolute():
            candidate = self.root / candidate
        elif not (candidate.is_relative_to(self.root) or candidate.is_relative_to(self.given)):
            # Refused before touching the file system: says nothing about what exists outside.
            raise APIError(400, f"lora_path {lora_path!r} is outside the adapter folder "
                                "(--adapter-dir)", "lora_path")
        try:
            resolved = candidate.resolve(strict=True)
        except FileNotFoundError:
            raise APIError(404, f"No adapter found at {lora_path!r} in the adapter folder",
                           "lora_path") from None
        except (OSError, RuntimeError) as e:  # a symlink loop, a name too long
            raise APIError(400, f"lora_path {lora_path!r}: {e}", "lora_path") from None
        if not resolved.is_relative_to(self.root):
            raise APIError(400, f"lora_path {lora_path!r} resolves outside the adapter folder "
                                "(--adapter-dir)", "lora_path")
        return resolved


class AdapterAdmin:
    """Loading and unloading on a runtime, as /v1/load_lora_adapter and its twin ask it, wherever
    the engine runs (its core process, or the server's own): AdapterError(409) for a name that
    is taken, KeyError for one that is not loaded, ValueError/OSError for a bad file. A failed
    load registers nothing."""

    def __init__(self, rt):
        self.rt = rt

    def load(self, name: str, path: str) -> None:
        from uora_rt.engine.messages import AdapterError

        rt = self.rt
        if name in rt.manager:
            raise AdapterError(409, f"The lora adapter '{name}' has already been loaded.")
        adapter = read_adapter(Path(path), rt.folder)
        try:
            rt.add_adapter(adapter, name, source=path)
        except BaseException:
            if name in rt.manager:  # half-loaded: take it out again
                rt.remove_adapter(name)
            raise

    def unload(self, name: str) -> None:
        if name not in self.rt.manager:
            raise KeyError(f"The lora adapter '{name}' cannot be found.")
        self.rt.remove_adapter(name)  # requests holding it finish with it

    def cards(self) -> list:
        from uora_rt.engine.messages import AdapterCard

        return [AdapterCard(n, e.source, int(e.created))
                for n, e in sorted(self.rt.manager.entries.items())]
