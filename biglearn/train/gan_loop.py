"""The per-worker BigLearn-GAN loop (continuous datasets), run by Ray Train's TorchTrainer.

Two networks, one DeepSpeed engine each (same ZeRO stage, precision and LR schedule as the
maximum-likelihood path; the critic may have its own learning rate). Each micro-batch: the
schedule draws tasks (families, Beta sizes, per example or per batch with inner steps), some
are posed in a transformed domain (biglearn/gan.py), then
  1. critic step: G fills the targets (no gradient), D learns real vs fake, R1 on real;
  2. generator step: G fills the targets again with fresh noise and learns through D, whose
     parameters are frozen meanwhile (D's module is called, not its engine: see critic_loss).
Data position, resume, fault injection, checkpoint reporting and progress are loop.py's. A
checkpoint holds `generator/` and `critic/` (each engine's weights, optimizer and LR
scheduler); the export is the generator's (safetensors + model.json), which is what
generation needs.

Legend: B = batch, L = positions, P = patch dimension, F = task families.
"""

from __future__ import annotations

from pathlib import Path

import torch

from biglearn.data.manifest import Manifest
from biglearn.export import write_export
from biglearn.gan import critic_at_chance, critic_loss, draw_noise, fill_targets, frozen, generator_loss, pose_tasks, view
from biglearn.model import ModelSpec, UniversalTransformer
from biglearn.objectives import family_stats
from biglearn.roles import FAMILIES, Schedule, sample_roles, task_seed
from biglearn.train.config import PretrainConfig
from biglearn.train.engine import TAG, autocast, build_engine, full_state_dict
from biglearn.train.evaluate import checkpoint_modes, is_mixture
from biglearn.train.loop import (
    EXPORT,
    _all_sum,
    _fault_due,
    _generator,
    _inject_faults,
    check_finite,
    report_checkpoint,
    restored_state,
    resumable_batches,
    retrieval_memory,
    worker_setup,
)
from biglearn.train.progress import Progress, log

PER_EXAMPLE = Schedule(granularity="example")


def gan_specs(cfg: PretrainConfig, manifest: Manifest, memory_rows: int) -> tuple[ModelSpec, ModelSpec]:
    """(generator, critic) specs for this dataset; the generator's memory holds `memory_rows`
    examples. The critic never retrieves: for a generated example, the real one it replaces
    would be found at distance 0 on the shared sources and give the fake away."""
    shape = dict(length=manifest.length, patch_dim=manifest.patch_dim, grid=manifest.grid)
    generator = ModelSpec(model=cfg.model, noise_dim=cfg.gan.noise_dim, memory_rows=memory_rows, **shape)
    critic_model = cfg.gan.critic or cfg.model.model_copy(update={"retrieval_neighbours": 0})
    critic = ModelSpec(model=critic_model, critic=True, **shape)
    return generator, critic


def gan_loop_per_worker(payload: dict) -> None:
    cfg, manifest, rank, device, on_gpu = worker_setup(payload)
    gan = cfg.gan
    memory = retrieval_memory(cfg, manifest)
    generator_spec, critic_spec = gan_specs(cfg, manifest, 0 if memory is None else len(memory))
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    engines = {}
    for name, spec, lr in (("generator", generator_spec, None), ("critic", critic_spec, gan.critic_lr)):
        model = UniversalTransformer(spec)
        if model.memory is not None:
            model.memory.remember(memory)
        # Not the critic: R1 differentiates its input gradient again, and recomputing
        # checkpointed blocks inside that double backward fails (torch checks the recomputation).
        model.checkpoint_activations = cfg.train.activation_checkpointing and not spec.critic
        engines[name] = build_engine(model, cfg, on_gpu, lr)
    g_engine, d_engine = engines["generator"], engines["critic"]

    def load(folder: Path) -> None:
        for name, engine in engines.items():
            engine.load_checkpoint(str(folder / name), tag=TAG)

    state = restored_state(cfg, rank, load)
    micro, accum = cfg.micro_batch_size, cfg.optim.grad_accum
    L, P = manifest.length, manifest.patch_dim
    progress = Progress(cfg.train.steps, state["step"], cfg.optim.batch_size, enabled=rank == 0, run=cfg.run.name)
    window_F2 = torch.zeros(len(FAMILIES), 2, device=device)
    critic_3 = torch.zeros(3, device=device)  # sums of adversarial loss and R1, and examples
    micro_index = 0
    for values in resumable_batches(cfg, manifest, state, device):
        step = state["step"] + 1
        _inject_faults(cfg, rank, step, micro_index % accum == 0)
        real_BLP = values.float().view(micro, L, P)
        micro_step = step * accum + micro_index % accum
        task_generator = _generator(device, task_seed(cfg.train.seed, micro_step, rank, cfg.schedule))
        roles_BL, family_B = sample_roles(cfg.schedule, micro, L, task_generator, manifest.grid)
        task = pose_tasks(roles_BL, P, gan.transform_probability, task_generator, cfg.schedule.granularity == "batch")
        # Noise is drawn per rank and micro-step even when ranks share one task (granularity batch).
        noise_generator = _generator(device, task_seed(cfg.train.seed, micro_step, rank, PER_EXAMPLE) + 1)

        with autocast(device, cfg.train.precision):
            with torch.no_grad():
                fake_BLP = fill_targets(g_engine, real_BLP, task.generator_roles_BL, draw_noise(real_BLP, gan.noise_dim, noise_generator))
            critic = critic_loss(
                d_engine, view(real_BLP, task), view(fake_BLP, task), task.critic_roles_BL, task.transformed_B,
                gan.r1_weight, r1_critic=d_engine.module,
            )
        check_finite(critic.loss, state, step, rank)
        d_engine.backward(critic.loss)
        d_engine.step()

        with frozen(d_engine.module), autocast(device, cfg.train.precision):
            fake_BLP = fill_targets(g_engine, real_BLP, task.generator_roles_BL, draw_noise(real_BLP, gan.noise_dim, noise_generator))
            # D's module, not its engine: an engine forward would make G's backward D's backward too.
            g_loss_B = generator_loss(d_engine.module, view(fake_BLP, task), task.critic_roles_BL, task.transformed_B)
        g_loss = g_loss_B.mean()
        if _fault_due(cfg, rank, step, "nan_loss"):
            g_loss = g_loss * float("nan")
        check_finite(g_loss, state, step, rank)
        g_engine.backward(g_loss)
        g_engine.step()

        window_F2 += family_stats(g_loss_B, family_B)
        critic_3 += torch.stack([critic.adversarial_B.sum(), critic.r1_B.sum(), torch.tensor(float(micro), device=device)])
        micro_index += 1
        if micro_index % accum:
            continue
        state["step"] = step
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            adversarial, r1, count = _all_sum(critic_3).tolist()
            extra = {"critic": adversarial / count, "r1": r1 / count}
            record = progress.log(step, _all_sum(window_F2), g_engine.get_lr()[0], extra)
            record["critic_at_chance"] = critic_at_chance(extra["critic"])
            was_at_chance = bool(state["history"]) and state["history"][-1].get("critic_at_chance", False)
            if record["critic_at_chance"] and not was_at_chance and rank == 0:
                log.warning(
                    f"[biglearn] step {step}: the critic scores real and generated examples alike (loss "
                    f"{extra['critic']:.4f} ~ log 4, R1 {extra['r1']:.1e}), so the generator gets no gradient from it; "
                    "if this lasts and samples are poor, see 'A critic at chance' in benchmarks/README.md"
                )
            state["history"].append(record)
            window_F2.zero_()
            critic_3.zero_()
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
            _save(engines, state, cfg, generator_spec, manifest, rank, final=step == cfg.train.steps)


def _save(engines: dict, state: dict, cfg: PretrainConfig, spec: ModelSpec, manifest: Manifest, rank: int, final: bool):
    # Mixtures score their modes at every checkpoint when asked (a sweep's objective).
    scored = cfg.eval.checkpoint_panel_examples is not None and is_mixture(manifest)
    weights = full_state_dict(engines["generator"]) if final or scored else None  # a collective under ZeRO-3

    def save(folder: Path) -> None:
        for name, engine in engines.items():
            engine.save_checkpoint(str(folder / name), tag=TAG)
        if rank == 0 and final:
            write_export(folder / EXPORT, weights, spec, manifest.model_dump(mode="json"), cfg.to_json())

    scores = checkpoint_modes(weights, spec, manifest.name, cfg.eval.seed, cfg.train.precision) if scored and rank == 0 else {}
    report_checkpoint(state, rank, save, scores)
