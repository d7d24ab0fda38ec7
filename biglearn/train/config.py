"""`PretrainConfig`: the one typed config of jobs/pretrain.py (YAML in biglearn/recipes/ + --set)."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from biglearn.config import Config
from biglearn.generation import Order
from biglearn.model import ModelConfig
from biglearn.objectives import Weighting
from biglearn.roles import Schedule


class DataConfig(Config):
    path: str | None = None
    """Dataset folder (or object-store URI) to read; null: the embedded dataset. It holds Parquet
    shards + manifest.json, as jobs/prepare_data.py writes them, and is never written to."""
    embedded: Literal["digits", "digits-patches"] = "digits"
    """The embedded dataset trained on when `path` is null, written once to
    <embedded_root>/<embedded>. digits: 0..16 pixel tokens; digits-patches: continuous 2x2
    patches scaled to [0, 1] (the GAN's)."""
    embedded_root: str = "data"
    """Folder the embedded datasets are written to, one subfolder each."""
    train_split: str = "train"
    """Manifest split trained on."""
    validation_split: str = "validation"
    """Manifest split evaluated after training (and by the checkpoint panel)."""
    shuffle_buffer: PositiveInt = 2048
    """Rows in each worker's local shuffle buffer, reseeded every epoch (train.seed + epoch)."""
    block_bytes: PositiveInt = 8 * 2**20
    """Largest Ray Data block read from the shards: a training worker holds about one at a time."""
    fetch_bytes: PositiveInt = 4 * 2**20
    """About this many bytes (4 a value) are taken from Ray Data at a time, in whole micro-batches.
    At least one micro-batch is taken, and the loop cuts them apart: Ray Data's cost per batch
    dominates at micro-batch sizes (16,384 rows of 64 tokens; 85 rows of 64 RGB 8x8 patches)."""
    materialize_max_bytes: NonNegativeInt = 256 * 2**20
    """Training splits up to this size are read once and kept in Ray's object store."""
    verify_max_bytes: NonNegativeInt | None = 2**30
    """Bytes of shard data hashed before training; null hashes all. Smaller datasets are hashed
    whole, larger ones in a seeded sample; every shard's presence and size is always checked."""


class OptimConfig(Config):
    lr: PositiveFloat = 1e-3
    """Peak AdamW learning rate, reached after warmup, then decayed by a cosine."""
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """Learning rate at the end of the cosine decay, as a fraction of lr."""
    warmup_steps: NonNegativeInt = 100
    """Optimizer steps of linear warmup from 0 to lr (at most train.steps)."""
    weight_decay: float = Field(default=0.01, ge=0)
    """AdamW's decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW's (beta1, beta2): decay rates of its moment estimates."""
    grad_clip: PositiveFloat = 1.0
    """Largest global gradient norm per optimizer step; larger gradients are scaled down to it."""
    batch_size: PositiveInt = 128
    """Global batch per optimizer step (all workers, all accumulation micro-steps)."""
    grad_accum: PositiveInt = 1
    """Micro-batches each worker accumulates per optimizer step."""
    weighting: Weighting = "inverse_ratio"
    """How target NLLs are averaged into the loss (biglearn/objectives.py). inverse_ratio: each
    example's mean over its own targets, then the batch mean; uniform: the mean over all targets
    of the batch."""


class Fault(Config):
    """A fault to inject, once per run (tests and chaos drills): at `step` on `rank`."""

    kind: Literal["kill", "nan_loss"]
    step: PositiveInt
    rank: NonNegativeInt = 0


class TrainConfig(Config):
    steps: PositiveInt = 600
    """Optimizer steps to train (each of optim.batch_size examples)."""
    seed: int = 0
    """Seed of the initial weights, the tasks (and GAN noise) drawn and the data order."""
    log_every: PositiveInt = 25
    """Optimizer steps between progress records; the last step always gets one."""
    checkpoint_every: PositiveInt = 200
    """Optimizer steps between checkpoints; the last step always gets one."""
    keep_checkpoints: PositiveInt = 2
    """Newest checkpoints kept per run; older ones are deleted."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: less memory, more compute."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on GPUs (DeepSpeed bf16) and on CPUs with native bf16 (autocast), else fp32."""
    faults: list[Fault] = []
    """Faults to inject (tests and chaos drills), each `{kind: kill | nan_loss, step, rank}`."""
    tracker: Literal["none", "tensorboard"] = "none"
    """Where progress records also go: none, or tensorboard.
    tensorboard: rank 0 also writes each progress record as TensorBoard scalars into
    <storage>/<name>/tensorboard/ (`tensorboard --logdir` that folder); a resumed run drops the
    events after its checkpoint, as metrics.jsonl does."""


class ClusterConfig(Config):
    address: str | None = None
    """Ray address to join; null joins RAY_ADDRESS if set, else starts a local Ray."""
    num_workers: PositiveInt = 1
    """Data-parallel training workers (Ray Train ranks)."""
    use_gpu: bool | Literal["auto"] = "auto"
    """Give each worker one GPU; auto: if the Ray cluster has any GPU."""
    cpus_per_worker: PositiveFloat = 1
    """CPUs Ray reserves for each training worker."""
    torch_threads: PositiveInt | None = None
    """CPU threads per worker; null: this machine's cores divided among its workers."""
    zero_stage: Literal[1, 2, 3] = 2
    """DeepSpeed ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also weights."""
    zero_bucket_elements: PositiveInt = 10_000_000
    """Gradient elements a rank collects before it reduces them (DeepSpeed's reduce_bucket_size).
    Stages 2 and 3 free the gradients of other ranks' shards only as a bucket is reduced, so a
    bucket as large as the model (DeepSpeed's default, 5e8) holds every gradient whole until
    the backward pass ends."""
    max_failures: int = Field(default=0, ge=-1)
    """Restarts from the last checkpoint allowed after a worker fails; -1: unlimited."""


class RunConfig(Config):
    name: str = Field(default="digits-quick", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Stable run name: running again with the same name resumes the run."""
    storage: str = "runs"
    """Folder (or shared URI) holding runs: <storage>/<name>/ gets checkpoints and the export."""
    resume_with_changes: bool = False
    """Resume a run although its training keys differ from those it was started with. The earlier
    config is kept beside the new one; off: such a re-run is refused."""


class EvalConfig(Config):
    panel_steps: PositiveInt = 4
    """Decoding steps under which the panel scores each task's NLL (1: the exact likelihood)."""
    panel_examples: PositiveInt | None = None
    """Validation examples the panel scores (null: all)."""
    checkpoint_panel_examples: PositiveInt | None = None
    """Validation examples the panel scores at every checkpoint (on rank 0); null: off. The first
    this many are scored and reported with the checkpoint (sweeps' intermediate objective). A
    2-D mixture's BigLearn-GAN reports its joint samples' mode coverage instead."""
    decode_steps: PositiveInt = 16
    """Decoding steps of the digits' completions and joint samples judged after training."""
    order: Order = "random"
    """Order the completions commit targets in: random, or the most confident first.
    Random order samples the model's own conditionals; confidence order (most confident first)
    commits the same background pixels in every row first and collapses joint samples to a few
    classes (docs/results.md)."""
    temperature: float = Field(default=1.0, ge=0)
    """Sampling temperature of those completions and samples; 0 takes the most likely value."""
    top_k: PositiveInt | None = None
    """Sample only among the k most likely values; null: among all."""
    guidance: float = Field(default=0.0, ge=0)
    """Guidance weight of the completions (biglearn/generation.py); 0: none. Above 0 the unguided
    completion accuracy is reported beside the guided one."""
    seed: int = 0
    """Seed of the evaluation's sampling."""
    num_joint: PositiveInt = 500
    """Joint samples (and as many left-half marginal samples) judged as a distribution."""
    num_shown: PositiveInt = 16
    """Examples shown per row of completions.png."""
    draws: int = Field(default=8, ge=2)
    """Completions drawn per validation input, to judge their spread against a reference posterior."""


class GanConfig(Config):
    """BigLearn-GAN (continuous datasets): the generator is `model`, trained with `optim`."""

    noise_dim: PositiveInt = 16
    """Gaussian noise dimensions per target position."""
    r1_weight: float = Field(default=1.0, ge=0)
    """gamma of the R1 penalty gamma/2 |grad_x D(x)|^2 on real examples."""
    transform_probability: float = Field(default=0.0, ge=0, le=1)
    """Share of tasks posed on y = A x for a fresh Haar-orthogonal A (rule: biglearn/gan.py)."""
    critic: ModelConfig | None = None
    """The discriminator's architecture; null: the same as `model`."""
    critic_lr: PositiveFloat | None = None
    """The discriminator's learning rate; null: optim.lr (same schedule)."""


class PretrainConfig(Config):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    schedule: Schedule = Schedule()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    cluster: ClusterConfig = ClusterConfig()
    run: RunConfig = RunConfig()
    eval: EvalConfig = EvalConfig()
    gan: GanConfig = GanConfig()
    """Used when the dataset is continuous: maximum likelihood needs tokens, so it trains a GAN."""

    @model_validator(mode="after")
    def _check(self) -> PretrainConfig:
        per_step = self.optim.grad_accum * self.cluster.num_workers
        if self.optim.batch_size % per_step:
            raise ValueError(
                f"optim.batch_size ({self.optim.batch_size}) must be divisible by "
                f"optim.grad_accum x cluster.num_workers ({per_step})"
            )
        if self.gan.critic is not None and self.gan.critic.retrieval_neighbours:
            raise ValueError("gan.critic.retrieval_neighbours: a critic retrieves nothing; set it to 0")
        return self

    @property
    def micro_batch_size(self) -> int:
        return self.optim.batch_size // (self.optim.grad_accum * self.cluster.num_workers)

    def to_json(self) -> dict:
        return self.model_dump(mode="json")

    @property
    def data_uri(self) -> str:
        """The dataset this run reads: `data.path`, else the embedded dataset's folder."""
        data = self.data
        return data.path if data.path is not None else f"{data.embedded_root.rstrip('/')}/{data.embedded}"

    def torch_threads(self) -> int:
        return self.cluster.torch_threads or max(1, (os.cpu_count() or 1) // self.cluster.num_workers)
