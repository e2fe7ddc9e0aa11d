"""Shared pieces of the server tests: a tiny Llama with a character tokenizer and a chat
template, adapters for it, and the real server as a process on 127.0.0.1 (or in this process,
for fault injection), always with bounded waits."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from models_tiny import tiny_llama
from peft_ref import make_adapter

CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
VOCAB = 3 + len(CHARS)  # <unk> <s> </s>, then one token per character
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unsupported role: ' + m['role']) }}{% endif %}"
    "<s>{{ m['role'] }}: {{ m['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def tiny_fn():
    return tiny_llama(vocab_size=VOCAB, max_position_embeddings=512)


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in CHARS:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
         "chat_template": CHAT_TEMPLATE}))


def tiny_base(folder: Path) -> Path:
    """A saved tiny Llama (vocab = the character tokenizer's, 512 positions) with tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny_fn().save_pretrained(folder)
    write_tokenizer(folder)
    return folder


def tiny_adapters(folder: Path, n: int, prefix="a") -> dict[str, Path]:
    """n adapters that differ in lambdas, targets and projection families."""
    folder.mkdir(parents=True, exist_ok=True)
    targets = [("q_proj", "v_proj"), ("k_proj", "o_proj", "down_proj"), ("gate_proj", "up_proj")]
    out = {}
    for i in range(n):
        out[f"{prefix}{i}"] = make_adapter(
            tiny_fn, folder / f"{prefix}{i}.uora", r=16, targets=targets[i % 3], seed=i % 2,
            lam_seed=100 + i, scale=1.0, reinit=i % 4 == 1)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc=None, timeout=90.0, log=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{_tail(log)}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"no /health from {url} in {timeout} s:\n{_tail(log)}")


def _tail(log) -> str:
    return Path(log).read_text()[-4000:] if log and Path(log).exists() else ""


class Server:
    """`python -m uora_rt serve ARGS --port P` on 127.0.0.1; .url, .log; stop() kills it.
    wait=False returns at once (start several, then .wait() on each: imports overlap)."""

    def __init__(self, args, log: Path, threads=1, env=None, wait=True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        full_env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})}
        cmd = [sys.executable, "-m", "uora_rt", "serve", *map(str, args), "--host", "127.0.0.1",
               "--port", str(self.port), "--disable-access-log"]
        self._out = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT,
                                     env=full_env)
        if wait:
            self.wait()

    def wait(self, timeout=120.0) -> "Server":
        try:
            wait_healthy(self.url, self.proc, timeout, log=self.log)
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=10).text)


def parse_metrics(text: str) -> dict[str, float]:
    """'name{labels}' -> value for every sample line."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


@contextlib.contextmanager
def in_process_server(app, timeout=60.0):
    """The app under uvicorn in a thread of this process (so a test can patch the engine)."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout=timeout)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout)


@contextlib.contextmanager
def local_server(world):
    """The tiny world's base with adapter a0, served in this process (loading off), so a test
    can patch the engine or the runtime: yields (url, ServerState)."""
    import uora_rt
    from uora_rt.server import ServerConfig, ServerState, build_app
    from uora_rt.server.local import LocalEngine

    rt = uora_rt.load(world.base, adapters=[("a0", world.adapters["a0"])])
    engine = uora_rt.Engine(rt, kv_cache_tokens=4096)
    state = ServerState(LocalEngine(rt, engine), ServerConfig(served_names=["base"]))
    with in_process_server(build_app(state)) as url:
        yield url, state


def openai_client(world):
    """The real openai client on the world's main server."""
    import openai

    return openai.OpenAI(base_url=world.main.url + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


def poll(fn, timeout=20.0, every=0.05):
    """fn() until it returns a truthy value (returned), or fails after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


class TinyWorld:
    """One tiny base, its adapters, an adapter folder and the servers the tiny-model test files
    share, built once per test session (server start-up is mostly importing torch: the
    servers start together so that it overlaps)."""

    N_SERVED = 8

    def __init__(self, root: Path):
        self.root = root
        self.base = tiny_base(root / "base")
        self.adapters = tiny_adapters(root / "adapters", self.N_SERVED)
        self.dir = root / "loadable"                      # --adapter-dir of the main server
        self.loadable = tiny_adapters(self.dir, 2, prefix="x")
        from uora_rt.convert import to_peft_vera

        to_peft_vera(self.loadable["x0"], self.dir / "x0-peft", base=self.base)
        # the API tests compare with float32 references computed on the CPU (world.rt,
        # transformers): the servers run there too, also on a machine with a GPU
        cpu = ["--device", "cpu"]
        served = [f"--adapter={n}={p}" for n, p in self.adapters.items()]
        logs = root / "logs"
        logs.mkdir()
        self.main = Server([self.base, *cpu, *served, "--allow-adapter-loading", "--adapter-dir",
                            self.dir], logs / "main.log", wait=False)
        self.queue = Server([self.base, *cpu, served[0], "--max-num-seqs", "2",
                             "--max-queued-requests", "3"], logs / "queue.log", wait=False)
        (root / "empty").mkdir()
        self.guarded = Server([self.base, *cpu, served[0], "--api-key", "sesame",
                               "--allow-adapter-loading", "--adapter-dir", root / "empty"],
                              logs / "guarded.log", wait=False)
        self.servers = [self.main, self.queue, self.guarded]
        try:
            for s in self.servers:
                s.wait()
        except Exception:
            self.stop()
            raise
        self._rt = None

    @property
    def rt(self):
        """The same base and adapters in this process (for rt.generate references)."""
        if self._rt is None:
            import uora_rt

            self._rt = uora_rt.load(self.base, adapters=list(self.adapters.items()))
        return self._rt

    def stop(self) -> None:
        for s in self.servers:
            s.stop()


def tiny_world(config, tmp_path_factory) -> TinyWorld:
    """The session's TinyWorld (made on first use; stopped when the session ends)."""
    world = getattr(config, "_uora_tiny_world", None)
    if world is None:
        world = TinyWorld(tmp_path_factory.mktemp("server-world"))
        config._uora_tiny_world = world
        config.add_cleanup(world.stop)
    return world
