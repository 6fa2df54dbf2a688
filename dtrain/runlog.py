"""What a run tells its user: progress lines, ``metrics.jsonl``, TensorBoard event files and the
loss plot (rank 0 only).

metrics.jsonl has one JSON record per line, with a ``kind``:

* ``start``: written at every start or resume: run id, world size, the step it
  starts at, and the checkpoint it resumed from (null for a fresh run). A
  resumed run repeats steps after the checkpoint it resumed from: the records
  after a ``start`` replace those of earlier runs from that step on.
* ``train``: one per log interval: step, epoch, mean loss, lr, tokens/s, ms/step,
  communication share and bytes, embedding reduce mode, ranks.
* ``eval``: validation loss, BLEU-1..4, ROUGE-L and CIDEr-D (``final`` at the end of training).
* ``warning``: the divergence warning (see ``DivergenceWatch``).

The same numbers go to TensorBoard event files in ``<dir>/tensorboard/`` (tbevents.py: tags
``train/loss``, ``train/tokens_per_s``, ``train/step_ms``, ``train/comm_share``, ``train/lr``,
``val/loss``, ``val/loss_per_token``, ``val/bleu1``..``val/bleu4``, ``val/rouge_l``,
``val/cider_d``, and the text ``val/samples``: sampled captions beside their references).
They are written once per progress line or evaluation, never per step. ``plot()`` draws
``loss.svg`` from metrics.jsonl with the standard library (plots.py), and ``loss.png`` too
when matplotlib is installed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .plots import read_history, write_loss_svg
from .tbevents import EventWriter


def fmt_time(seconds):
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Interval:
    """Sums over the steps since the last progress line."""

    def __init__(self):
        self.loss, self.tokens, self.steps = 0.0, 0.0, 0
        self.seconds, self.comm_s, self.bytes = 0.0, 0.0, 0
        self.modes = {}

    def add(self, result):
        self.loss += result.loss  # may stay a device scalar until the line is written
        self.tokens += result.tokens
        self.steps += 1
        self.seconds += result.seconds
        self.comm_s += result.comm_s
        self.bytes += result.bytes
        self.modes[result.mode] = self.modes.get(result.mode, 0) + 1


class DivergenceWatch:
    """Warns once when the loss stays far above where it started.

    Rule: L0 is the loss of the run's first step (at initialisation, about
    ln(V) per token); if RUNS consecutive progress lines have a mean loss above
    FACTOR * L0, print one warning (the loss has more than doubled and stayed
    there: usually a learning rate too high). A non-finite loss stops the run
    instead (see step.NonFiniteError).
    """

    FACTOR, RUNS = 2.0, 3

    def __init__(self):
        self.first, self.above, self.warned = None, 0, False

    def start(self, first_step_loss):
        if self.first is None:
            self.first = float(first_step_loss)

    def observe(self, step, loss, log):
        if loss is None or self.warned or self.first is None:
            return
        self.above = self.above + 1 if loss > self.FACTOR * self.first else 0
        if self.above >= self.RUNS:
            self.warned = True
            log.say(f"warning: loss {loss:.4g} at step {step} has stayed above "
                    f"{self.FACTOR:g}x its starting value {self.first:.4g} for {self.RUNS} "
                    "progress lines: training is diverging (is --lr too high?)")
            log.record({"kind": "warning", "step": step, "what": "divergence", "loss": loss,
                        "first_loss": self.first})


class RunLog:
    """Progress lines on rank 0's stdout, records in ``<dir>/metrics.jsonl``, ``loss.png``."""

    def __init__(self, directory, enabled=True, quiet=False):
        self.dir = Path(directory)
        self.enabled = enabled
        self.quiet = quiet
        self.metrics_path = self.dir / "metrics.jsonl"
        self.run_start = time.perf_counter()
        self.tensorboard = EventWriter(self.dir / "tensorboard") if enabled else None

    def say(self, *lines, flush=True):
        if self.enabled and not self.quiet:
            print(*lines, flush=flush)

    def record(self, rec):
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def start(self, run_id, world_size, step, resumed_from, config):
        self.record({"kind": "start", "run_id": run_id, "world_size": world_size, "step": step,
                     "resumed_from": resumed_from, "time": time.time(), "config": config})

    def interval(self, iv: Interval, step, total_steps, start_step, steps_per_epoch, lr, ranks):
        if iv.steps == 0:
            return None
        loss = float(iv.loss) / iv.steps  # on one GPU: the one copy of the loss out
        comm_share = iv.comm_s / iv.seconds if iv.seconds else 0.0
        step_ms = 1e3 * iv.seconds / iv.steps
        tok_s = iv.tokens / iv.seconds if iv.seconds else 0.0
        elapsed = time.perf_counter() - self.run_start
        eta = elapsed / max(step - start_step, 1) * (total_steps - step)
        epoch = step / steps_per_epoch
        mode = max(iv.modes, key=iv.modes.get) if iv.modes else "local"
        self.say(f"step {step:>6}/{total_steps} | epoch {epoch:6.2f} | loss {loss:7.4f} | "
                 f"{tok_s:8.0f} tok/s | {step_ms:6.1f} ms/step (comm {100 * comm_share:4.1f}%) | "
                 f"eta {fmt_time(eta)}")
        self.record({"kind": "train", "step": step, "epoch": epoch, "loss": loss, "lr": lr,
                     "tokens_per_s": tok_s, "step_ms": step_ms,
                     "comm_ms": 1e3 * iv.comm_s / iv.steps,
                     "comm_share": comm_share, "embed_reduce": mode,
                     "bytes_per_step": iv.bytes / iv.steps, "ranks": ranks})
        if self.tensorboard is not None:
            self.tensorboard.scalars(step, {"train/loss": loss, "train/tokens_per_s": tok_s,
                                            "train/step_ms": step_ms,
                                            "train/comm_share": comm_share, "train/lr": lr})
        return loss

    def evaluation(self, res, step, final):
        b = res["bleu"]
        more = {k: res.get("metrics", {}).get(k) for k in ("rouge_l", "cider_d")}
        shown = "".join(f" {name} {more[k]:.3f}" for k, name in (("rouge_l", "ROUGE-L"),
                                                                 ("cider_d", "CIDEr-D"))
                        if more[k] is not None)
        loss = ("n/a" if res["val_loss"] is None
                else f"{res['val_loss']:.4f} ({res['val_loss_per_token']:.4f}/token)")
        self.say(f"eval @ step {step}: val loss {loss} | BLEU-1 {b[0]:.3f} BLEU-2 {b[1]:.3f} "
                 f"BLEU-3 {b[2]:.3f} BLEU-4 {b[3]:.3f}{shown} ({res['images']} images)"
                 + (" [stopped early by a signal]" if res.get("stopped") else ""))
        losses = {k: res[k] for k in ("val_loss", "val_loss_per_token") if res[k] is not None}
        self.record({"kind": "eval", "step": step, **losses, "bleu1": b[0], "bleu2": b[1],
                     "bleu3": b[2], "bleu4": b[3],
                     **{k: v for k, v in more.items() if v is not None}, "final": final,
                     "stopped": bool(res.get("stopped"))})
        if self.tensorboard is not None and not res.get("stopped"):
            self._tensorboard_eval(res, step, more)
        if final:
            for hyp, refs in res["examples"][:5]:
                second = refs[1] if len(refs) > 1 else ""
                self.say(f"  sample : {hyp}\n  refs   : {refs[0]} | {second}")

    def _tensorboard_eval(self, res, step, more):
        b = res["bleu"]
        losses = {"val/loss": res["val_loss"], "val/loss_per_token": res["val_loss_per_token"]}
        self.tensorboard.scalars(step, {**{k: v for k, v in losses.items() if v is not None},
                                        **{f"val/bleu{k + 1}": b[k] for k in range(4)},
                                        **{f"val/{k}": v for k, v in more.items()}})
        rows = [f"| {hyp} | {' / '.join(refs[:3])} |" for hyp, refs in res["examples"][:5]]
        if rows:
            self.tensorboard.text(step, "val/samples",
                                  "| sampled | references |\n|---|---|\n" + "\n".join(rows))

    def plot(self):
        """``loss.svg`` (standard library, from metrics.jsonl: the whole run, resumes marked)
        and ``loss.png`` when matplotlib is installed, beside the metrics."""
        if not self.enabled or not self.metrics_path.is_file():
            return None
        svg = write_loss_svg(self.metrics_path, self.dir / "loss.svg")
        if svg is not None:
            self.say(f"loss curves: {svg}")
        return self._plot_png() or svg

    def _plot_png(self):
        """loss.png with matplotlib, when installed: the curves of loss.svg (the whole run from
        metrics.jsonl, resumes marked)."""
        history = read_history(self.metrics_path)
        if not history["train"]:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except Exception:
            return None
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(*zip(*history["train"]), lw=0.8, label="train loss")
        val = [(e["step"], e["val_loss"]) for e in history["eval"] if "val_loss" in e]
        if val:  # an evaluation over no tokens has no val loss
            ax.plot(*zip(*val), "o-", label="val loss")
        for k, step in enumerate(history["resumes"]):
            ax.axvline(step, color="grey", ls="--", lw=0.8, label="resumed" if k == 0 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (sum over tokens / captions)")
        ax.legend()
        fig.tight_layout()
        out = self.dir / "loss.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        self.say(f"loss curves: {out}")
        return out
