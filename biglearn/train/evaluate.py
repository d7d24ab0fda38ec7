"""Scores a finished export: the panel on the validation split and, for the digits, the
completion quality judged by a classifier, plus `completions.png`. A BigLearn-GAN generator
(continuous data) gets the generator panel (error and spread per task), the digits' judge
when it learned the digits, and mode coverage of its joint samples when it learned a
Gaussian mixture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from biglearn.data.digits import NAME as DIGITS
from biglearn.data.digits import DigitsQuality
from biglearn.data.manifest import Manifest, read_split
from biglearn.export import load_export
from biglearn.gan import generate
from biglearn.model import ModelSpec, UniversalTransformer
from biglearn.panel import evaluate_panel, generator_panel
from biglearn.roles import TARGET
from biglearn.simulate.modes import sample_coverage
from biglearn.train.config import EvalConfig
from biglearn.train.engine import autocast

PANEL = "panel.json"
MIXTURES = ("gmm2", "gmm25")
MIXTURE_SAMPLES = 2500


def evaluate_export(
    export: Path, data_uri: str, manifest: Manifest, split: str, cfg: EvalConfig, precision: str
) -> dict:
    """Writes panel.json into the export (and completions.png beside it for image data)."""
    with autocast(torch.device("cpu"), precision):
        return _evaluate(export, data_uri, manifest, split, cfg)


def checkpoint_panel(
    weights: dict[str, torch.Tensor], spec: ModelSpec, values_BL: torch.Tensor, steps: int, precision: str
) -> dict[str, float]:
    """{"panel_<task>": NLL, ..., "panel_mean": their mean} of these weights on `values_BL`."""
    with autocast(torch.device("cpu"), precision):
        scores = evaluate_panel(_model_copy(weights, spec), values_BL, spec.grid, steps=steps)
    return {**{f"panel_{task}": nll for task, nll in scores.items()}, "panel_mean": sum(scores.values()) / len(scores)}


def _model_copy(weights: dict[str, torch.Tensor], spec: ModelSpec) -> UniversalTransformer:
    """A model of its own for scoring a checkpoint, so the training engine's state is not touched."""
    model = UniversalTransformer(spec)
    model.load_state_dict(weights)
    return model


def is_mixture(manifest: Manifest) -> bool:
    """A 2-D Gaussian mixture of the paper's simulations, as two continuous 1-D positions."""
    return (
        manifest.name in MIXTURES and manifest.kind == "continuous" and manifest.length == 2 and manifest.patch_dim == 1
    )


def joint_mode_coverage(model: UniversalTransformer, name: str, seed: int) -> dict[str, float]:
    """`sample_coverage` of MIXTURE_SAMPLES joint samples (S = {}) of a mixture's generator."""
    generator = torch.Generator().manual_seed(seed)
    roles = torch.full((MIXTURE_SAMPLES, 2), TARGET, dtype=torch.int8)
    samples = generate(model.eval(), torch.zeros(MIXTURE_SAMPLES, 2, 1), roles, generator)[..., 0].numpy()
    return sample_coverage(samples, name)


def checkpoint_modes(
    weights: dict[str, torch.Tensor], spec: ModelSpec, name: str, seed: int, precision: str
) -> dict[str, float]:
    """{"modes_missed": K - covered, "modes_covered", "high_quality"} of a mixture generator's
    weights, on a copy of the model (a sweep's intermediate objective for the GAN)."""
    with autocast(torch.device("cpu"), precision):
        coverage = joint_mode_coverage(_model_copy(weights, spec), name, seed)
    return {
        "modes_missed": coverage["modes"] - coverage["modes_covered"],
        "modes_covered": coverage["modes_covered"],
        "high_quality": coverage["high_quality"],
    }


def _evaluate(export: Path, data_uri: str, manifest: Manifest, split: str, cfg: EvalConfig) -> dict:
    torch.manual_seed(cfg.seed)
    model, spec = load_export(export)
    if spec.continuous:
        return _evaluate_generator(export, model, spec, data_uri, manifest, split, cfg)
    quality = DigitsQuality(data_uri) if manifest.name == DIGITS else None
    # DigitsQuality already holds the validation digits: no second read of the split.
    if quality is not None and split == "validation":
        values = quality.images
    else:
        values = read_split(data_uri, manifest, split)["values"]
    values = torch.from_numpy(values).long()[: cfg.panel_examples]
    summary: dict = {"panel_nll": evaluate_panel(model, values, spec.grid, steps=cfg.panel_steps)}
    if quality:
        metrics, completions, joint = quality.score(
            model,
            steps=cfg.decode_steps,
            order=cfg.order,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            guidance=cfg.guidance,
            seed=cfg.seed,
            num_joint=cfg.num_joint,
            draws=cfg.draws,
        )
        summary["quality"] = metrics
        summary["references"] = quality.references()
        _save_completions(export.parent / "completions.png", quality, completions, joint, cfg.num_shown)
    (export / PANEL).write_text(json.dumps(summary, indent=2))
    return summary


def _evaluate_generator(
    export: Path, model, spec, data_uri: str, manifest: Manifest, split: str, cfg: EvalConfig
) -> dict:
    quality = DigitsQuality(data_uri) if manifest.name == DIGITS else None
    if quality is not None and split == "validation":
        values = quality.values
    else:
        values = read_split(data_uri, manifest, split)["values"]
    values = torch.from_numpy(values).float()[: cfg.panel_examples]
    summary: dict = {"generator_panel": generator_panel(model, values, spec.grid)}
    if quality:
        metrics, completions, joint = quality.score_generator(
            model, seed=cfg.seed, num_joint=cfg.num_joint, draws=cfg.draws
        )
        summary["quality"] = metrics
        summary["references"] = quality.references()
        _save_completions(export.parent / "completions.png", quality, completions, joint, cfg.num_shown)
    if is_mixture(manifest):
        summary["modes"] = joint_mode_coverage(model, manifest.name, cfg.seed)
    (export / PANEL).write_text(json.dumps(summary, indent=2))
    return summary


def quality_report(summary: dict, guidance: float) -> list[str]:
    """The digits' quality measures as lines for a person: each figure beside its reference."""
    quality, refs = summary["quality"], summary["references"]
    joint, conditional, marginal = quality["joint"], quality["conditional"], quality["marginal_left_half"]
    lines = [
        "[biglearn] samples judged as distributions: model | reference (real digits, same split)",
        f"  joint, {joint['samples']} samples: class TV to validation {joint['class_tv']:.3f} | {joint['class_tv_reference']:.3f}, "
        f"classes covered {joint['classes_covered']}/{len(joint['class_histogram'])}, MMD {joint['mmd']:.3f} | {joint['mmd_reference']:.3f}, "
        f"median distance to nearest training digit {joint['nearest_train_median']:.3f} | "
        f"{joint['nearest_train_median_reference']:.3f}, near copies {joint['near_copies']:.3f} | {joint['near_copies_reference']:.3f}",
        f"  bottom half given the top, {conditional['draws_per_input']} draws per validation digit: judged correct "
        f"{conditional['accuracy']:.3f} | {conditional['accuracy_reference']:.3f} (reference posterior), two draws of one "
        f"digit in the same class {conditional['class_agreement']:.3f} | {conditional['class_agreement_reference']:.3f}, "
        f"MMD to training digits {conditional['mmd_to_train']:.3f} | {conditional['mmd_to_train_reference']:.3f}",
        f"  left half with the right half absent (a marginal): MMD {marginal['mmd']:.3f} | {marginal['mmd_reference']:.3f}",
        f"[biglearn] bottom-half completions classified correctly: {quality['completion_accuracy']:.3f} over "
        f"{conditional['draws_per_input']} draws, {quality['completion_accuracy_first_draw']:.3f} on the first "
        f"(real digits {refs['real_validation']:.3f}, nearest neighbour {refs['nearest_neighbour']:.3f}, "
        f"random of 5 nearest {refs['random_of_5_nearest']:.3f})",
    ]
    if "completion_accuracy_unguided" in quality:
        lines.append(
            f"[biglearn] that is with guidance {guidance:g}; a first draw without it: {quality['completion_accuracy_unguided']:.3f}"
        )
    if "completion_pairwise_distance" in quality:
        lines.append(
            f"[biglearn] two noise draws of one completion differ by {quality['completion_pairwise_distance']:.3f} "
            "on average (L2, [0, 1] pixels; 0 if deterministic)"
        )
    lines.append(
        f"[biglearn] joint samples' mean top-class probability {quality['joint_top_class_probability']:.3f} "
        "(a confidence, not a measure of the distribution)"
    )
    return lines


def _save_completions(
    path: Path, quality: DigitsQuality, completions_KNF: np.ndarray, joint_MF: np.ndarray, shown: int
):
    """completions.png: originals, their given top halves, up to 4 draws of each completion, then
    4 rows of joint samples (enough that a collapse shows at a glance)."""
    given = np.where(quality.top_half, quality.images, -1)
    rows = [quality.images[:shown], given[:shown], *completions_KNF[:4, :shown]]
    rows += [joint_MF[i * shown : (i + 1) * shown] for i in range(4)]
    _save_grid(path, [row for row in rows if len(row)], (8, 8), 16)


def _save_grid(path: Path, rows_of_images: list[np.ndarray], shape: tuple[int, int], top: int, scale: int = 8):
    """One row per list entry (originals, given part, completions, joint samples); -1 = hidden."""
    h, w = shape[0] * scale, shape[1] * scale
    gap = 6
    n_cols = max(len(r) for r in rows_of_images)
    canvas = np.full(((h + gap) * len(rows_of_images), (w + gap) * n_cols, 3), 255, dtype=np.uint8)
    for r, images in enumerate(rows_of_images):
        for c, image in enumerate(images):
            pixels = image.reshape(shape)
            grey = (255 - 255 * np.clip(pixels, 0, top) / top).astype(np.uint8)
            tile = np.repeat(np.repeat(np.stack([grey] * 3, -1), scale, 0), scale, 1)
            hidden = np.repeat(np.repeat(pixels < 0, scale, 0), scale, 1)
            tile[hidden] = (255, 200, 200)  # the part the model had to generate
            canvas[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = tile
    Image.fromarray(canvas).save(path)
