"""What one micro-batch does under each training objective; the one loop (loop.py) owns the rest.

A `TrainingStep` holds its DeepSpeed engines, each saved in a checkpoint under its own folder
name, trains on a micro-batch whose tasks the loop has drawn, sums what the progress line shows
over the logging window, names the engine whose weights are exported, and may score those
weights at every checkpoint (a sweep's intermediate objective).

- `LikelihoodStep` (token data): one model, the big-learning cross-entropy of the targets.
- `AdversarialStep` (continuous data, BigLearn-GAN): a generator and a critic, one engine each
  (same ZeRO stage, precision and LR schedule; the critic may have its own learning rate). Some
  tasks are posed in a transformed domain (biglearn/gan.py); then
    1. critic step: G fills the targets (no gradient), D learns real vs fake, R1 on real;
    2. generator step: G fills the targets again with the same noise and learns through D,
       whose parameters are frozen meanwhile (D's module is called, not its engine).
  The export is the generator's, which is what generation needs.

Legend: B = batch, L = positions, P = patch dimension, F = task families.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from biglearn.data.manifest import Manifest, read_split
from biglearn.flops import adversarial_step_flops, training_flops
from biglearn.gan import (
    critic_at_chance,
    critic_loss,
    draw_noise,
    fill_targets,
    frozen,
    generator_loss,
    pose_tasks,
    view,
)
from biglearn.model import ModelSpec, UniversalTransformer
from biglearn.objectives import big_learning_loss, family_stats
from biglearn.roles import FAMILIES, Schedule, task_seed
from biglearn.train.config import PretrainConfig
from biglearn.train.engine import TAG, all_sum, autocast, build_engine
from biglearn.train.evaluate import checkpoint_modes, checkpoint_panel, is_mixture
from biglearn.train.progress import log

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine  # imported at run time only by build_engine

# (loss) -> loss: the loop's guard, which stops the run on a non-finite loss (and plants planned faults).
Guard = Callable[[torch.Tensor], torch.Tensor]
PER_EXAMPLE = Schedule(granularity="example")


def seeded_generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def retrieval_memory(cfg: PretrainConfig, manifest: Manifest) -> torch.Tensor | None:
    """The whole training split ([N, L] tokens or [N, L, P] patches) when the model retrieves
    neighbours from it (read by every rank, so that all hold the same memory), else None."""
    if not cfg.model.retrieval_neighbours:
        return None
    assert cfg.data.path is not None  # pretrain made it absolute (with_absolute_paths)
    examples = torch.from_numpy(read_split(cfg.data.path, manifest, cfg.data.train_split)["values"])
    return examples.float() if manifest.patch_dim else examples.long()


class TrainingStep:
    """The part of training that differs between objectives (see the module docstring)."""

    engines: dict[str, DeepSpeedEngine]
    """DeepSpeed engines by checkpoint subfolder ("" is the checkpoint folder itself)."""
    export_name: str
    export_spec: ModelSpec
    scored: bool
    """Whether `scores` is asked for at every checkpoint."""

    def __init__(self, cfg: PretrainConfig, manifest: Manifest, rank: int, device: torch.device):
        self.cfg, self.manifest, self.rank, self.device = cfg, manifest, rank, device
        self.window_F2 = torch.zeros(len(FAMILIES), 2, device=device)
        self.window_flops = 0.0  # the model FLOPs this rank trained over the window (biglearn/flops.py)

    def micro_step(
        self,
        values: torch.Tensor,
        roles_BL: torch.Tensor,
        family_B: torch.Tensor,
        task_generator: torch.Generator,
        step: int,
        micro: int,
        guard: Guard,
    ) -> None:
        raise NotImplementedError

    def take_window(self) -> tuple[torch.Tensor, float, dict[str, float]]:
        """(per-family loss sums [F, 2], model FLOPs, further named means) over the window,
        summed over all ranks (a collective); the window starts again."""
        stats_F2 = all_sum(self.window_F2)
        flops = all_sum(torch.tensor([self.window_flops], dtype=torch.float64, device=self.device)).item()
        self.window_F2.zero_()
        self.window_flops = 0.0
        return stats_F2, flops, {}

    def annotate(self, record: dict, history: list[dict]) -> None:
        """Adds to a progress record before it joins the history (which holds the earlier ones)."""

    def scores(self, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        """Rank 0's scores of the exported weights at a checkpoint (when `scored`)."""
        return {}

    @property
    def export_engine(self):
        return self.engines[self.export_name]

    def learning_rate(self) -> float:
        return self.export_engine.get_lr()[0]

    def load(self, folder: Path) -> None:
        for name, engine in self.engines.items():
            engine.load_checkpoint(str(folder / name), tag=TAG)

    def save(self, folder: Path) -> None:
        for name, engine in self.engines.items():
            engine.save_checkpoint(str(folder / name), tag=TAG)


class LikelihoodStep(TrainingStep):
    export_name = ""

    def __init__(self, cfg: PretrainConfig, manifest: Manifest, rank: int, device: torch.device, on_gpu: bool):
        super().__init__(cfg, manifest, rank, device)
        memory = retrieval_memory(cfg, manifest)
        self.export_spec = ModelSpec(
            model=cfg.model,
            length=manifest.length,
            vocab_size=manifest.vocab_size,
            grid=manifest.grid,
            memory_rows=0 if memory is None else len(memory),
            position_vocab=manifest.table.position_vocab if manifest.table is not None else None,
        )
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        model = UniversalTransformer(self.export_spec)
        if memory is not None:
            assert model.memory is not None  # the memory is read when the model retrieves
            model.memory.remember(memory)
        model.checkpoint_activations = cfg.train.activation_checkpointing
        self.engines = {"": build_engine(model, cfg, on_gpu)}
        self.scored = cfg.eval.checkpoint_panel_examples is not None
        self.panel_values_BL = None
        if rank == 0 and self.scored:
            assert cfg.data.path is not None  # pretrain made it absolute (with_absolute_paths)
            values = read_split(cfg.data.path, manifest, cfg.data.validation_split)["values"]
            self.panel_values_BL = torch.from_numpy(values[: cfg.eval.checkpoint_panel_examples]).long()

    def micro_step(self, values, roles_BL, family_B, task_generator, step, micro, guard) -> None:
        engine, values_BL = self.export_engine, values.long()
        with autocast(self.device, self.cfg.train.precision):
            logits_BLV = engine(values_BL, roles_BL)
        loss, stats_F2 = big_learning_loss(logits_BLV, values_BL, roles_BL, family_B, self.cfg.optim.weighting)
        engine.backward(guard(loss))
        engine.step()
        self.window_F2 += stats_F2
        self.window_flops += training_flops(self.export_spec, roles_BL)

    def scores(self, weights):
        cfg = self.cfg
        assert self.panel_values_BL is not None  # read on rank 0, which alone scores
        return checkpoint_panel(
            weights, self.export_spec, self.panel_values_BL, cfg.eval.panel_steps, cfg.train.precision
        )


def gan_specs(cfg: PretrainConfig, manifest: Manifest, memory_rows: int) -> tuple[ModelSpec, ModelSpec]:
    """(generator, critic) specs for this dataset; the generator's memory holds `memory_rows`
    examples. The critic never retrieves: for a generated example, the real one it replaces
    would be found at distance 0 on the shared sources and give the fake away."""
    shape: dict[str, Any] = dict(length=manifest.length, patch_dim=manifest.patch_dim, grid=manifest.grid)
    generator = ModelSpec(model=cfg.model, noise_dim=cfg.gan.noise_dim, memory_rows=memory_rows, **shape)
    critic_model = cfg.gan.critic or cfg.model.model_copy(update={"retrieval_neighbours": 0})
    critic = ModelSpec(model=critic_model, critic=True, **shape)
    return generator, critic


class AdversarialStep(TrainingStep):
    export_name = "generator"

    def __init__(self, cfg: PretrainConfig, manifest: Manifest, rank: int, device: torch.device, on_gpu: bool):
        super().__init__(cfg, manifest, rank, device)
        memory = retrieval_memory(cfg, manifest)
        self.export_spec, self.critic_spec = gan_specs(cfg, manifest, 0 if memory is None else len(memory))
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        self.engines = {}
        for name, spec, lr in (
            ("generator", self.export_spec, None),
            ("critic", self.critic_spec, cfg.gan.critic_lr),
        ):
            model = UniversalTransformer(spec)
            if model.memory is not None:
                assert memory is not None  # read when the model retrieves
                model.memory.remember(memory)
            # Not the critic: R1 differentiates its input gradient again, and recomputing
            # checkpointed blocks inside that double backward fails (torch checks the recomputation).
            model.checkpoint_activations = cfg.train.activation_checkpointing and not spec.critic
            self.engines[name] = build_engine(model, cfg, on_gpu, lr)
        self.critic_3 = torch.zeros(3, device=device)  # sums of adversarial loss and R1, and examples
        # Mixtures score their modes at every checkpoint when asked (a sweep's objective).
        self.scored = cfg.eval.checkpoint_panel_examples is not None and is_mixture(manifest)

    def micro_step(self, values, roles_BL, family_B, task_generator, step, micro, guard) -> None:
        cfg, gan = self.cfg, self.cfg.gan
        g_engine, d_engine = self.engines["generator"], self.engines["critic"]
        critic_module = cast(torch.nn.Module, d_engine.module)
        assert self.manifest.patch_dim is not None  # continuous data
        real_BLP = values.float().view(len(values), self.manifest.length, self.manifest.patch_dim)
        task = pose_tasks(
            roles_BL,
            self.manifest.patch_dim,
            gan.transform_probability,
            task_generator,
            cfg.schedule.granularity == "batch",
        )
        # Noise is drawn per rank and micro-step even when ranks share one task (granularity batch).
        noise_seed = task_seed(cfg.train.seed, step, self.rank, PER_EXAMPLE, micro, cfg.optim.grad_accum) + 1
        noise_generator = seeded_generator(self.device, noise_seed)

        with autocast(self.device, cfg.train.precision):
            with torch.no_grad():
                fake_BLP = fill_targets(
                    g_engine, real_BLP, task.generator_roles_BL, draw_noise(real_BLP, gan.noise_dim, noise_generator)
                )
            critic = critic_loss(
                d_engine,
                view(real_BLP, task),
                view(fake_BLP, task),
                task.critic_roles_BL,
                task.transformed_B,
                gan.r1_weight,
                r1_critic=critic_module,
            )
        d_engine.backward(guard(critic.loss))
        d_engine.step()

        with frozen(critic_module), autocast(self.device, cfg.train.precision):
            fake_BLP = fill_targets(
                g_engine, real_BLP, task.generator_roles_BL, draw_noise(real_BLP, gan.noise_dim, noise_generator)
            )
            # D's module, not its engine: an engine forward would make G's backward D's backward too.
            g_loss_B = generator_loss(critic_module, view(fake_BLP, task), task.critic_roles_BL, task.transformed_B)
        g_engine.backward(guard(g_loss_B.mean()))
        g_engine.step()

        self.window_F2 += family_stats(g_loss_B, family_B)
        self.window_flops += adversarial_step_flops(
            self.export_spec, self.critic_spec, task.generator_roles_BL, task.critic_roles_BL, r1=gan.r1_weight > 0
        )
        examples = torch.tensor(float(len(values)), device=self.device)
        self.critic_3 += torch.stack([critic.adversarial_B.sum(), critic.r1_B.sum(), examples])

    def take_window(self):
        stats_F2, flops, _ = super().take_window()
        adversarial, r1, count = all_sum(self.critic_3).tolist()
        self.critic_3.zero_()
        return stats_F2, flops, {"critic": adversarial / count, "r1": r1 / count}

    def annotate(self, record, history) -> None:
        record["critic_at_chance"] = critic_at_chance(record["critic"])
        was_at_chance = bool(history) and history[-1].get("critic_at_chance", False)
        if record["critic_at_chance"] and not was_at_chance and self.rank == 0:
            log.warning(
                f"[biglearn] step {record['step']}: the critic scores real and generated examples alike (loss "
                f"{record['critic']:.4f} ~ log 4, R1 {record['r1']:.1e}), so the generator gets no gradient from it; "
                "if this lasts and samples are poor, see 'A critic at chance' in benchmarks/README.md"
            )

    def scores(self, weights):
        return checkpoint_modes(
            weights, self.export_spec, self.manifest.name, self.cfg.eval.seed, self.cfg.train.precision
        )


def training_step(
    cfg: PretrainConfig, manifest: Manifest, rank: int, device: torch.device, on_gpu: bool
) -> TrainingStep:
    """Maximum likelihood needs tokens; continuous data (patches, numeric columns) trains a BigLearn-GAN."""
    kind = AdversarialStep if manifest.kind == "continuous" else LikelihoodStep
    return kind(cfg, manifest, rank, device, on_gpu)
