"""The embedded default dataset: scikit-learn's bundled handwritten digits (no download).

1,797 real 8x8 images with values 0..16: discrete, L = 64, V = 17, a fixed seeded split of
1,437 training and 360 validation digits; or, for the BigLearn-GAN, the same digits and split
as continuous 2x2 patches scaled to [0, 1] (L = 16, P = 4). Also the judge used to score
completions: a logistic-regression classifier trained on the real training digits (0..16
pixels; continuous samples are clipped to [0, 1] and multiplied by 16, not rounded: the
classifier takes real-valued pixels, and rounding would only add quantisation noise).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from biglearn.data.manifest import DatasetError, Manifest, read_manifest, read_split
from biglearn.data.prepare import write_source
from biglearn.data.sources import digits_source, from_patches

NAME = "digits"
SPLIT_SEED = 0
VALIDATION_FRACTION = 0.2  # 360 of the 1,797 digits


def ensure_digits(uri: str | Path, continuous: bool = False) -> Manifest:
    """Returns the digits dataset at `uri`, writing it first if it is not there (as continuous
    2x2 patches when `continuous`)."""
    try:
        return read_manifest(str(uri))
    except DatasetError:
        pass
    return write_source(
        digits_source("patches" if continuous else "tokens"), str(uri), name=NAME,
        validation_fraction=VALIDATION_FRACTION, seed=SPLIT_SEED, rows_per_shard=500,
    )


def judge_pixels(values: np.ndarray, manifest: Manifest) -> np.ndarray:
    """Dataset values -> the judge's [N, 64] pixels on the 0..16 scale."""
    if manifest.kind == "discrete":
        return values
    images = from_patches(np.clip(values, 0.0, 1.0), manifest.geometry)
    return images.reshape(len(values), -1) * 16


class DigitJudge:
    """Scores digit images with a classifier trained on the real training digits."""

    def __init__(self, train_images: np.ndarray, train_labels: np.ndarray):
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        self.classifier.fit(train_images, train_labels)

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float((self.classifier.predict(images) == labels).mean())

    def mean_top_probability(self, images: np.ndarray) -> float:
        return float(self.classifier.predict_proba(images).max(1).mean())


def nearest_neighbour_completions(
    train_images: np.ndarray, queries: np.ndarray, given: np.ndarray, pick_from: int, seed: int = 0
) -> np.ndarray:
    """Copies the hidden part of a training digit whose given part is among the nearest.

    pick_from=1 copies the nearest one; pick_from=5 a random one of the 5 nearest, which is
    what a sampler (rather than a retriever) should beat.
    """
    rng = np.random.default_rng(seed)
    dist = ((queries[:, None, given] - train_images[None, :, given]) ** 2).sum(-1)
    nearest = np.argsort(dist, axis=1, kind="stable")[:, :pick_from]
    chosen = nearest[np.arange(len(queries)), rng.integers(0, pick_from, len(queries))]
    out = queries.copy()
    out[:, ~given] = train_images[chosen][:, ~given]
    return out


class DigitsQuality:
    """The issue's quality measure on the digits: complete the bottom half of each validation
    digit from its top half, and let the judge classify the result.

    References on the same split: the judge on the real validation digits, and nearest-
    neighbour retrieval of the bottom half (nearest, or a random one of the 5 nearest).
    """

    def __init__(self, uri: str | Path):
        self.manifest = manifest = read_manifest(str(uri))
        train = read_split(str(uri), manifest, "train", ["values", "label"])
        validation = read_split(str(uri), manifest, "validation", ["values", "label"])
        self.train_images, self.train_labels = judge_pixels(train["values"], manifest), train["label"]
        self.values, self.labels = validation["values"], validation["label"]
        self.images = judge_pixels(self.values, manifest)
        self.judge = DigitJudge(self.train_images, self.train_labels)
        self.top_half = (np.arange(64) // 8) < 4  # of the pixels
        rows, cols = manifest.grid
        self.top_half_positions = (np.arange(rows * cols) // cols) < rows // 2  # of the model's positions

    def references(self) -> dict[str, float]:
        judge, given = self.judge, self.top_half
        return {
            "real_validation": judge.accuracy(self.images, self.labels),
            "nearest_neighbour": judge.accuracy(
                nearest_neighbour_completions(self.train_images, self.images, given, 1), self.labels
            ),
            "random_of_5_nearest": judge.accuracy(
                nearest_neighbour_completions(self.train_images, self.images, given, 5), self.labels
            ),
        }

    def _bottom_half_task(self, model, seed: int, values: np.ndarray, dtype):
        """(device, seeded generator, validation values, roles: top half given) on the model's device."""
        import torch

        from biglearn.roles import SOURCE, TARGET

        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        values = torch.from_numpy(values).to(device, dtype)
        roles = torch.where(torch.from_numpy(self.top_half_positions), SOURCE, TARGET).to(torch.int8).to(device)
        return device, generator, values, roles.expand(values.shape[:2]).contiguous()

    def score(self, model, *, steps: int, order: str, temperature: float, top_k: int | None, guidance: float = 0.0,
              seed: int = 0, num_joint: int = 200) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
        """Returns ({metric: value}, completions [N, L], joint samples [num_joint, L]).

        With guidance, `completion_accuracy_unguided` scores the same decoding without it (joint
        samples have no sources, so guidance leaves them alone)."""
        import torch

        from biglearn.generation import complete
        from biglearn.roles import TARGET

        device, generator, values, roles = self._bottom_half_task(model, seed, self.images, torch.long)
        was_training = model.training
        model.eval()
        decode = dict(steps=steps, order=order, temperature=temperature, top_k=top_k)
        completions = complete(model, values, roles, generator, guidance=guidance, **decode).cpu().numpy()
        joint_roles = torch.full((num_joint, values.shape[1]), TARGET, dtype=torch.int8, device=device)
        joint = complete(model, torch.zeros_like(joint_roles, dtype=torch.long), joint_roles, generator, **decode)
        joint = joint.cpu().numpy()
        metrics = {
            "completion_accuracy": self.judge.accuracy(completions, self.labels),
            "joint_top_class_probability": self.judge.mean_top_probability(joint),
        }
        if guidance > 0:
            unguided = complete(model, values, roles, generator, **decode).cpu().numpy()
            metrics["completion_accuracy_unguided"] = self.judge.accuracy(unguided, self.labels)
        model.train(was_training)
        return metrics, completions, joint

    def score_generator(self, model, *, seed: int = 0, num_joint: int = 200, noise_draws: int = 4
                        ) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
        """The same measures for a BigLearn-GAN generator (continuous digits), one generator pass
        per sample, plus how much completions of one input differ across `noise_draws` draws.

        Returns ({metric: value}, first completions [N, 64] and joint samples [num_joint, 64],
        both as 0..16 pixels).
        """
        import torch

        from biglearn.gan import generate
        from biglearn.roles import TARGET

        device, generator, values, roles = self._bottom_half_task(model, seed, self.values, torch.float32)
        was_training = model.training
        model.eval()
        draws = [generate(model, values, roles, generator).cpu().numpy() for _ in range(noise_draws)]
        joint_roles = torch.full((num_joint, values.shape[1]), TARGET, dtype=torch.int8, device=device)
        joint = generate(model, torch.zeros(num_joint, *values.shape[1:], device=device), joint_roles, generator)
        model.train(was_training)
        pixels = [judge_pixels(draw, self.manifest) / 16 for draw in draws]  # [0, 1] per pixel
        pairs = [(i, j) for i in range(noise_draws) for j in range(i + 1, noise_draws)]
        distances = [np.linalg.norm(pixels[i] - pixels[j], axis=1).mean() for i, j in pairs]
        completions = judge_pixels(draws[0], self.manifest)
        joint_pixels = judge_pixels(joint.cpu().numpy(), self.manifest)
        metrics = {
            "completion_accuracy": self.judge.accuracy(completions, self.labels),
            "completion_accuracy_over_draws": float(np.mean([self.judge.accuracy(p * 16, self.labels) for p in pixels])),
            # L2 distance in [0, 1] pixel units over the 64 pixels (only the 32 generated ones can differ)
            "completion_pairwise_distance": float(np.mean(distances)) if distances else 0.0,
            "joint_top_class_probability": self.judge.mean_top_probability(joint_pixels),
        }
        return metrics, completions, joint_pixels
