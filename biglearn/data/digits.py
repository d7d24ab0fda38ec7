"""The embedded default dataset: scikit-learn's bundled handwritten digits (no download).

1,797 real 8x8 images with values 0..16: discrete, L = 64, V = 17, a fixed seeded split of
1,437 training and 360 validation digits; or, for the BigLearn-GAN, the same digits and split
as continuous 2x2 patches scaled to [0, 1] (L = 16, P = 4). Also the judge used to score
completions: a logistic-regression classifier trained on the real training digits (0..16
pixels; continuous samples are clipped to [0, 1] and multiplied by 16, not rounded: the
classifier takes real-valued pixels, and rounding would only add quantisation noise).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from biglearn import distribution as dist
from biglearn.data.manifest import DatasetError, Manifest, read_manifest, read_split
from biglearn.data.prepare import write_source
from biglearn.data.sources import digits_source, from_patches

NAME = "digits"
SPLIT_SEED = 0
VALIDATION_FRACTION = 0.2  # 360 of the 1,797 digits


def ensure_digits(uri: str | Path, continuous: bool = False) -> Manifest:
    """Returns the digits dataset at `uri`, writing it first if it is not there (as continuous
    2x2 patches when `continuous`). A folder holding anything else is refused (DatasetError)."""
    with contextlib.suppress(DatasetError):
        manifest = read_manifest(str(uri))
        if manifest.name == NAME and manifest.kind == ("continuous" if continuous else "discrete"):
            return manifest  # without loading the source to fingerprint it (half a second)
    return write_source(
        digits_source("patches" if continuous else "tokens"), str(uri), name=NAME,
        validation_fraction=VALIDATION_FRACTION, seed=SPLIT_SEED, rows_per_shard=500,
    )


def judge_pixels(values: np.ndarray, manifest: Manifest) -> np.ndarray:
    """Dataset values -> the judge's [N, 64] pixels on the 0..16 scale."""
    if manifest.kind == "discrete":
        return values
    assert manifest.geometry is not None  # the continuous digits are 2x2 patches of 8x8 images
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
    """Quality measures on the digits, each beside a reference measured on the same split.

    Conditional (the bottom half given the top half of each validation digit, `draws` samples
    per input): the judge's accuracy; how often two draws of one input are judged the same
    class, beside the same figure for draws from a reference posterior p(class | top half) (a
    calibrated classifier trained on real training top halves), so that both under- and over-dispersion
    show; the kernel distance of completed digits to training digits, beside the validation
    digits' own.
    Joint (S = {}): the judge's class histogram against the validation labels (total
    variation, classes covered); the kernel distance to validation digits, beside that of as
    many training digits; memorisation: each sample's distance to its nearest training digit,
    beside the validation digits' own.
    Marginal (the left half, the right half absent): the kernel distance on the left half's
    pixels, beside that of training digits.
    Also references for the judge's accuracy alone: the judge on the real validation digits,
    and nearest-neighbour copies of the bottom half (nearest, or a random one of the 5 nearest).
    """

    def __init__(self, uri: str | Path):
        from sklearn.neural_network import MLPClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.manifest = manifest = read_manifest(str(uri))
        train = read_split(str(uri), manifest, "train", ["values", "label"])
        validation = read_split(str(uri), manifest, "validation", ["values", "label"])
        self.train_images, self.train_labels = judge_pixels(train["values"], manifest), train["label"]
        self.values, self.labels = validation["values"], validation["label"]
        self.images = judge_pixels(self.values, manifest)
        self.judge = DigitJudge(self.train_images, self.train_labels)
        self.top_half = (np.arange(64) // 8) < 4  # of the pixels
        self.left_half = (np.arange(64) % 8) < 4
        assert manifest.grid is not None  # the digits are 8x8 images
        rows, cols = manifest.grid
        positions = np.arange(rows * cols)
        self.top_half_positions = positions // cols < rows // 2  # of the model's positions
        self.left_half_positions = positions % cols < cols // 2
        # The reference posterior p(class | top half): a small MLP on standardised top halves, of the
        # classifiers tried the best in log loss on the validation top halves (0.30 against 0.32 for
        # an RBF SVM with Platt scaling and 0.44 for logistic regression), so the best estimate of it.
        top_half_classifier = make_pipeline(
            StandardScaler(), MLPClassifier((128,), alpha=0.3, max_iter=2000, random_state=0))
        top_half_classifier.fit(self.train_images[:, self.top_half], self.train_labels)
        self.top_half_posterior = top_half_classifier.predict_proba(self.images[:, self.top_half])
        # What judge_samples compares against, fixed by the data: kernel widths and the validation
        # digits' distances to their nearest training digit (pixels in [0, 1]).
        real = self.images / 16
        self.width, self.left_width = dist.median_bandwidth(real), dist.median_bandwidth(real[:, self.left_half])
        self.nearest_real = dist.nearest_distances(real, self.train_images / 16)

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

    def _tasks(self, model, seed: int, values: np.ndarray, dtype, draws: int, num_joint: int):
        """(seeded generator, completion inputs [draws * N, L(, P)] and roles, joint roles, left-half
        marginal roles) on the model's device."""
        import torch

        from biglearn.roles import ABSENT, SOURCE, TARGET

        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        inputs = torch.from_numpy(values).to(device, dtype).repeat(draws, *([1] * (values.ndim - 1)))
        length = inputs.shape[1]

        def roles(pattern_L: torch.Tensor, rows: int) -> torch.Tensor:
            return pattern_L.to(torch.int8).to(device).expand(rows, length).contiguous()

        top, left = torch.from_numpy(self.top_half_positions), torch.from_numpy(self.left_half_positions)
        completion = roles(torch.where(top, SOURCE, TARGET), len(inputs))
        joint = roles(torch.full((length,), TARGET), num_joint)
        marginal = roles(torch.where(left, TARGET, ABSENT), num_joint)
        return generator, inputs, completion, joint, marginal

    def score(self, model, *, steps: int, order: str, temperature: float, top_k: int | None, guidance: float = 0.0,
              seed: int = 0, num_joint: int = 500, draws: int = 8) -> tuple[dict, np.ndarray, np.ndarray]:
        """Returns (`judge_samples`' measures, completions [draws, N, 64], joint samples
        [num_joint, 64]) of a token model decoding with these settings.

        With guidance, `completion_accuracy_unguided` scores a first draw without it (joint
        and marginal samples have no sources, so guidance leaves them alone)."""
        import torch

        from biglearn.generation import complete

        generator, values, roles, joint_roles, marginal_roles = self._tasks(
            model, seed, self.images, torch.long, draws, num_joint)
        was_training = model.training
        model.eval()
        decode: dict[str, Any] = dict(steps=steps, order=order, temperature=temperature, top_k=top_k)
        completions = complete(model, values, roles, generator, guidance=guidance, **decode).cpu().numpy()
        blank = torch.zeros_like(joint_roles, dtype=torch.long)
        joint = complete(model, blank, joint_roles, generator, **decode).cpu().numpy()
        marginal = complete(model, blank, marginal_roles, generator, **decode).cpu().numpy()
        n = len(self.images)
        if guidance > 0:
            unguided = complete(model, values[:n], roles[:n], generator, **decode).cpu().numpy()
        model.train(was_training)
        completions = completions.reshape(draws, n, -1)
        metrics = self.judge_samples(completions, joint, marginal, seed)
        if guidance > 0:
            metrics["completion_accuracy_unguided"] = self.judge.accuracy(unguided, self.labels)
        return metrics, completions, joint

    def score_generator(self, model, *, seed: int = 0, num_joint: int = 500, draws: int = 8
                        ) -> tuple[dict, np.ndarray, np.ndarray]:
        """The same measures for a BigLearn-GAN generator (continuous digits), one generator pass
        per sample, plus `completion_pairwise_distance`: how far apart two draws of one input
        are (mean L2 over the 64 pixels in [0, 1]; 0 for a deterministic model).

        Returns (measures, completions [draws, N, 64] and joint samples [num_joint, 64], both
        as 0..16 pixels)."""
        import torch

        from biglearn.gan import generate

        generator, values, roles, joint_roles, marginal_roles = self._tasks(
            model, seed, self.values, torch.float32, draws, num_joint)
        was_training = model.training
        model.eval()
        completions = generate(model, values, roles, generator).cpu().numpy()
        blank = torch.zeros(num_joint, *values.shape[1:], device=values.device)
        joint = generate(model, blank, joint_roles, generator).cpu().numpy()
        marginal = generate(model, blank, marginal_roles, generator).cpu().numpy()
        model.train(was_training)
        completions = judge_pixels(completions, self.manifest).reshape(draws, len(self.images), -1)
        joint, marginal = judge_pixels(joint, self.manifest), judge_pixels(marginal, self.manifest)
        metrics = self.judge_samples(completions, joint, marginal, seed)
        first, second = completions[0] / 16, completions[1] / 16
        metrics["completion_pairwise_distance"] = float(np.linalg.norm(first - second, axis=1).mean())
        return metrics, completions, joint

    def judge_samples(self, completions_KNF: np.ndarray, joint_MF: np.ndarray, marginal_MF: np.ndarray,
                      seed: int = 0) -> dict:
        """The measures of samples given as 0..16 pixels: K draws of each validation input's
        completion, M joint samples and M left-half marginal samples (right half ignored).

        Returns {"completion_accuracy" (over all draws), "completion_accuracy_first_draw",
        "joint_top_class_probability", "conditional": {...}, "joint": {...}, "marginal_left_half":
        {...}}; every `x` in a group stands beside its `x_reference`."""
        judge, num_classes = self.judge.classifier, len(self.top_half_posterior[0])
        scale = 16.0  # pixels to [0, 1] for distances
        real = self.images / scale
        # Real training digits as many as the joint samples (up to all of them): the reference set.
        size = min(len(joint_MF), len(self.train_images))
        subset = np.random.default_rng(seed).choice(len(self.train_images), size, replace=False)
        train = self.train_images[subset] / scale
        width, nearest_real = self.width, self.nearest_real

        draw_classes_NK = np.stack([judge.predict(c) for c in completions_KNF], 1)
        conditional = {
            "draws_per_input": int(completions_KNF.shape[0]),
            "class_agreement": dist.pairwise_agreement(draw_classes_NK),
            "class_agreement_reference": dist.expected_agreement(self.top_half_posterior),
            "accuracy": float((draw_classes_NK == self.labels[:, None]).mean()),
            "accuracy_reference": float(self.top_half_posterior[np.arange(len(self.labels)), self.labels].mean()),
            "mmd_to_train": dist.mmd(completions_KNF[0] / scale, train, width),
            "mmd_to_train_reference": dist.mmd(real, train, width),
        }

        joint_classes = judge.predict(joint_MF)
        joint_histogram = dist.class_histogram(joint_classes, num_classes)
        validation_histogram = dist.class_histogram(self.labels, num_classes)
        samples = joint_MF / scale
        nearest = dist.nearest_distances(samples, self.train_images / scale)
        copy_radius = float(np.quantile(nearest_real, 0.05))
        joint = {
            "samples": len(joint_MF),
            "class_histogram": [round(float(share), 4) for share in joint_histogram],
            "class_tv": dist.total_variation(joint_histogram, validation_histogram),
            "class_tv_reference": dist.total_variation(
                dist.class_histogram(judge.predict(self.train_images[subset]), num_classes), validation_histogram),
            # A class counts as covered with at least 2% of the samples (each holds 8-12% of the digits).
            "classes_covered": int((joint_histogram >= 0.02).sum()),
            "mmd": dist.mmd(samples, real, width),
            "mmd_reference": dist.mmd(train, real, width),
            "nearest_train_median": float(np.median(nearest)),
            "nearest_train_median_reference": float(np.median(nearest_real)),
            # Samples nearer a training digit than all but 5% of the validation digits are.
            "near_copies": float((nearest < copy_radius).mean()),
            "near_copies_reference": float((nearest_real < copy_radius).mean()),
        }

        left = self.left_half
        marginal = {
            "mmd": dist.mmd(marginal_MF[:, left] / scale, real[:, left], self.left_width),
            "mmd_reference": dist.mmd(train[:, left], real[:, left], self.left_width),
        }
        return {
            "completion_accuracy": conditional["accuracy"],
            "completion_accuracy_first_draw": self.judge.accuracy(completions_KNF[0], self.labels),
            "joint_top_class_probability": self.judge.mean_top_probability(joint_MF),
            "conditional": conditional,
            "joint": joint,
            "marginal_left_half": marginal,
        }
