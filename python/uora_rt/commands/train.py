"""`uora-rt train BASE --data TRAIN.jsonl --output OUT.uora`: a UORA adapter from a data file."""

from __future__ import annotations

import sys
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("base", nargs="?", default="smollm2",
                   help="a Hugging Face model folder, or the packaged 'smollm2' (default) or "
                        "'minilm'")
    p.add_argument("--data", required=True, help="training rows, one JSON object per line")
    p.add_argument("--output", required=True, help="the adapter file to write (.uora)")
    p.add_argument("--eval-data", help="evaluation rows (same format); evaluated after each "
                                       "epoch, and the state with the lowest loss is kept")
    p.add_argument("--r", type=int, default=256, help="the shared rank (default 256)")
    p.add_argument("--target-modules", help="comma-separated module names (default: the "
                                            "attention query and value projections)")
    p.add_argument("--epochs", type=int, help="passes over the data (default 3; for decoders "
                                              "more on small files, to reach 40 steps)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, help="learning rate of the adapter vectors (default 1e-1 "
                                            "for decoders, 3e-2 for encoders)")
    p.add_argument("--head-lr", type=float, default=1e-3,
                   help="learning rate of an encoder's task head (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=256,
                   help="tokens per row; longer rows are truncated (with a warning)")
    p.add_argument("--seed", type=int, default=0, help="projection seed and data order")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda")
    p.add_argument("--dtype", default="auto",
                   help="auto (bf16 autocast on a GPU, float32 on the CPU), float32, bfloat16")
    p.add_argument("--no-plot", action="store_true", help="skip the loss-curve PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _positive(args, name):
    v = getattr(args, name)
    if v is not None and v < 1:
        raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def run(args) -> int:
    from uora_rt.errors import AdapterFormatError
    from uora_rt.training.data import DataError

    try:
        for name in ("r", "epochs", "max_steps", "batch_size", "max_len"):
            _positive(args, name)
        if args.lr is not None and not args.lr > 0:
            raise ValueError(f"--lr must be > 0, got {args.lr}")
        from uora_rt.training.pipeline import TrainOptions, train

        targets = ([t.strip() for t in args.target_modules.split(",") if t.strip()]
                   if args.target_modules else None)
        opts = TrainOptions(base=args.base, data=args.data, output=args.output,
                            eval_data=args.eval_data, r=args.r, target_modules=targets,
                            epochs=args.epochs, max_steps=args.max_steps, lr=args.lr,
                            head_lr=args.head_lr, batch_size=args.batch_size,
                            max_len=args.max_len, seed=args.seed, device=args.device,
                            dtype=args.dtype, progress=not args.quiet)
        trained = train(opts, log=lambda m: print(m, file=sys.stderr))
    except (DataError, AdapterFormatError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        print("nothing was written", file=sys.stderr)
        return 2
    import uora_rt

    out = Path(args.output)
    uora_rt.save_adapter(trained, out)
    s = trained.summary()
    line = (f"trained {s['steps']} steps ({s['epochs']:g} epochs) in {s['seconds']:.1f} s "
            f"({s['seconds_per_step']:.3f} s/step) on {s['device']}: final train loss "
            f"{s['final_train_loss']:.4f}")
    if "eval" in s:
        ev = s["eval"]
        extra = ", ".join(f"{k} {v:.4g}" for k, v in ev.items() if k != "loss" and
                          isinstance(v, float))
        line += f"; best eval loss {ev['loss']:.4f}{', ' + extra if extra else ''} " \
                f"(step {s['best_step']})"
    line += (f"; {s['reinit_events']} reinit events; {s['adapter_parameters']:,} trainable adapter "
             f"parameters" + (f" + {s['head_parameters']:,} head" if s["head_parameters"] else ""))
    print(line)
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")
    if not args.no_plot:
        png = out.with_name(out.name + ".loss.png")
        try:
            from uora_rt.training.plot import save_loss_curve

            save_loss_curve(trained.fit, png, f"{out.name}: {s['steps']} steps, "
                            f"{s['reinit_events']} reinit events")
            print(f"wrote {png}")
        except Exception as e:  # the adapter is saved; a missing picture must not hide that
            print(f"warning: the loss curve was not written: {e}", file=sys.stderr)
    return 0
