"""What a person watching `ray job logs` sees (step/total, loss per task family, samples/s,
model TFLOP/s and MFU, ETA), what Prometheus scrapes from rank 0's node (TRAIN_METRICS, via
Ray's metrics agent) and, when asked, the same records as TensorBoard scalars."""

from __future__ import annotations

import logging
import time

import torch
from ray.util.metrics import Gauge

from biglearn.objectives import family_means

log = logging.getLogger("biglearn")

# Exported as ray_<name> on the metrics port of the node running rank 0, tagged with the run name.
TRAIN_METRICS = {
    "biglearn_train_step": "optimizer steps done",
    "biglearn_train_total_steps": "optimizer steps the run is configured for",
    "biglearn_train_loss": "mean loss over the last logging window (all ranks)",
    "biglearn_train_samples_per_second": "training throughput over the last logging window",
    "biglearn_train_tflops_per_second": "model TFLOP/s of all ranks over the last logging window",
    "biglearn_train_mfu": "model FLOPs utilisation: that rate over the ranks' peak (0-1)",
    "biglearn_train_learning_rate": "current learning rate",
}


class Progress:
    """Progress of one run on one rank (`enabled` on rank 0 only); with `tensorboard_dir`, each
    record is also written there as scalars (events of steps after `start_step` are dropped: a
    resumed run logs them again)."""

    def __init__(
        self,
        total_steps: int,
        start_step: int,
        batch_size: int,
        peak_flops: float,
        enabled: bool,
        run: str = "",
        now=time.monotonic,
        tensorboard_dir: str | None = None,
    ):
        self.total, self.batch_size, self.enabled, self.now = total_steps, batch_size, enabled, now
        self.peak_flops = peak_flops
        self.last_step, self.last_time = start_step, now()
        self.gauges = _gauges(run) if enabled and run else None
        self.tensorboard = None
        if enabled and tensorboard_dir:
            from tensorboardX import SummaryWriter

            self.tensorboard = SummaryWriter(tensorboard_dir, purge_step=start_step + 1 if start_step else None)
        if self.gauges:
            self.gauges["biglearn_train_total_steps"].set(total_steps)
            self.gauges["biglearn_train_step"].set(start_step)

    def log(
        self, step: int, stats_F2: torch.Tensor, flops: float, lr: float, extra: dict[str, float] | None = None
    ) -> dict:
        """Prints one progress line for the window since the last call; returns it as a record.

        `flops`: the model FLOPs all ranks trained in the window. `extra`: further named window
        means (the GAN's critic loss and R1), printed after the loss."""
        elapsed = max(self.now() - self.last_time, 1e-9)
        samples_per_s = (step - self.last_step) * self.batch_size / elapsed
        tflops = flops / elapsed / 1e12
        mfu = flops / elapsed / self.peak_flops
        eta_s = (self.total - step) * elapsed / max(step - self.last_step, 1)
        self.last_step, self.last_time = step, self.now()
        total, count = stats_F2.sum(0).tolist()
        record = {
            "step": step,
            "loss": total / max(count, 1),
            "families": family_means(stats_F2.cpu()),
            "samples_per_s": samples_per_s,
            "flops": flops,
            "tflops": tflops,
            "mfu": mfu,
            "lr": lr,
            **(extra or {}),
        }
        if self.enabled:
            families = " ".join(f"{name} {value:.3f}" for name, value in record["families"].items())
            extras = "".join(f" | {name} {value:.4f}" for name, value in (extra or {}).items())
            log.info(
                f"[biglearn] step {step}/{self.total} ({100 * step / self.total:.0f}%) | "
                f"loss {record['loss']:.4f}{extras} | {families} | {samples_per_s:.0f} samples/s | "
                f"{_flop_rate(tflops)}, MFU {100 * mfu:.1f}% | "
                f"lr {lr:.2e} | ETA {_duration(eta_s)}"
            )
        if self.gauges:
            for name, value in [
                ("biglearn_train_step", step),
                ("biglearn_train_loss", record["loss"]),
                ("biglearn_train_samples_per_second", samples_per_s),
                ("biglearn_train_tflops_per_second", tflops),
                ("biglearn_train_mfu", mfu),
                ("biglearn_train_learning_rate", lr),
            ]:
                self.gauges[name].set(value)
        if self.tensorboard:
            scalars = {
                "loss": record["loss"],
                "samples_per_s": samples_per_s,
                "tflops": tflops,
                "mfu": mfu,
                "lr": lr,
                **(extra or {}),
                **{f"loss_by_family/{name}": value for name, value in record["families"].items()},
            }
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, float(value), step)
            self.tensorboard.flush()
        return record

    def close(self) -> None:
        if self.tensorboard:
            try:
                self.tensorboard.close()
            except Exception as exc:  # a failed flush must not hide the error that ended the run
                log.warning(f"[biglearn] could not close the TensorBoard writer: {exc}")


def _gauges(run: str) -> dict:
    gauges = {name: Gauge(name, description=text, tag_keys=("run",)) for name, text in TRAIN_METRICS.items()}
    for gauge in gauges.values():
        gauge.set_default_tags({"run": run})
    return gauges


def _flop_rate(tflops: float) -> str:
    return f"{tflops:.3g} TFLOP/s" if tflops >= 1 else f"{1000 * tflops:.3g} GFLOP/s"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
