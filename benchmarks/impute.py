"""Imputation and synthesis on tables, biglearn's Imputer beside the tools table users have.

Per table (scikit-learn's bundled iris, wine, diabetes, breast_cancer, and any CSV named with
--csv): rows split 70/30; every method fits on the same complete training rows and fills the
held-out rows under each mask (MCAR 20%, MCAR 50%, MAR, MNAR), each drawn --repeats times.
One biglearn model per table, fitted once on the training rows, serves every mask. Baselines:
scikit-learn's mean/most-frequent, KNN (on standardised columns), IterativeImputer
(BayesianRidge) and a MissForest-style IterativeImputer with random forests, each given every
chance: it runs fit_transform on the training rows together with the masked held-out rows,
once per mask (IterativeImputer fitted on complete rows alone runs a single round of chained
equations when it transforms, and imputes worse). Categorical cells enter them as ordinal codes
and come back rounded to the nearest code. Measures, averaged over the draws of each mask:
NRMSE over the masked numeric cells in units of the training standard deviation, accuracy over
masked categorical cells; seconds to fit (baselines: mean over the masks).

Synthesis (--synthesis): as many synthetic rows as training rows, from biglearn (the joint,
no column given), SDV's CTGAN and TVAE when `sdv` imports, and an independent-columns sampler
(each column drawn alone from the training rows: the floor any model must clear); the real
training rows stand beside them as the reference. Every set is scored against the held-out rows,
which no synthesizer saw (against the training rows, a copy of them would be rewarded). Measures:
detection AUC of a random forest told to separate the held-out rows from the rows scored
(5-fold; 0.5 is indistinguishable), mean per-column distance (Kolmogorov-Smirnov for numbers, total variation for categories) and
the mean absolute difference of the correlation matrices (numbers standardised, categories
one-hot).

    python benchmarks/impute.py --tables iris wine diabetes breast_cancer --synthesis
    python benchmarks/impute.py --tables --csv my.csv --categorical grade   # a CSV of your own

HyperImpute is not run: its package requires TensorFlow, Jupyter and a CUDA NCCL wheel.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import yaml
from sklearn import datasets
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
from sklearn.experimental import enable_iterative_imputer  # noqa: F401  (registers IterativeImputer)
from sklearn.impute import IterativeImputer, KNNImputer, SimpleImputer
from sklearn.model_selection import cross_val_score
from sklearn.preprocessing import StandardScaler

from biglearn.tables import Imputer

MASKS = ("MCAR 20%", "MCAR 50%", "MAR 30%", "MNAR 30%")


def bundled(name: str) -> tuple[pd.DataFrame, list[str]]:
    """A scikit-learn table as a DataFrame and its categorical columns (class labels as text)."""
    bunch = getattr(datasets, f"load_{name}")(as_frame=True)
    frame = bunch.frame.copy()
    if name == "diabetes":  # the target is numeric; sex is two values
        frame["sex"] = np.where(frame["sex"] > 0, "a", "b").astype(object)
        return frame, ["sex"]
    frame["target"] = np.asarray(bunch.target_names)[bunch.target].astype(object)
    return frame, ["target"]


def make_mask(frame: pd.DataFrame, numeric: list[str], kind: str, rng: np.random.Generator) -> np.ndarray:
    """Missing cells [N, L]. MAR: a third of the columns (numeric) always observed drive the
    others' missingness through a logistic model; MNAR: numeric cells go missing more often the
    larger they are (self-masking), categorical ones at random; both near 30%."""
    n, width = frame.shape
    if kind.startswith("MCAR"):
        return rng.random((n, width)) < float(kind.split()[1].rstrip("%")) / 100
    z = {name: ((frame[name] - frame[name].mean()) / (frame[name].std() + 1e-12)).to_numpy() for name in numeric}
    mask = np.zeros((n, width), bool)
    if kind.startswith("MAR"):
        drivers = numeric[: max(1, len(numeric) // 3)]
        signal = sum(rng.normal() * z[name] for name in drivers) / np.sqrt(len(drivers))
        for index, name in enumerate(frame.columns):
            if name not in drivers:
                mask[:, index] = rng.random(n) < _calibrated(
                    signal * rng.choice([-2, 2]), 0.3 * width / (width - len(drivers))
                )
        return mask
    for index, name in enumerate(frame.columns):
        mask[:, index] = rng.random(n) < (_calibrated(2 * z[name], 0.3) if name in z else 0.3)
    return mask


def _calibrated(logit: np.ndarray, rate: float) -> np.ndarray:
    """sigmoid(logit + b) with b chosen so the probabilities average `rate`."""
    rate = min(rate, 0.95)
    lo, hi = -20.0, 20.0
    for _ in range(60):
        b = (lo + hi) / 2
        lo, hi = (b, hi) if (1 / (1 + np.exp(-(logit + b)))).mean() < rate else (lo, b)
    return 1 / (1 + np.exp(-(logit + b)))


class Coded:
    """A DataFrame as floats for scikit-learn: categories as ordinal codes, back again rounded."""

    def __init__(self, train: pd.DataFrame, categorical: list[str]):
        self.categorical = categorical
        self.levels = {name: sorted(train[name].dropna().unique()) for name in categorical}

    def to_array(self, frame: pd.DataFrame) -> np.ndarray:
        out = frame.copy()
        for name in self.categorical:
            out[name] = frame[name].map({v: i for i, v in enumerate(self.levels[name])}).astype(float)
        return out.to_numpy(dtype=float)

    def to_frame(self, array: np.ndarray, like: pd.DataFrame) -> pd.DataFrame:
        out = pd.DataFrame(array, columns=like.columns, index=like.index).astype(object)
        for name in self.categorical:
            codes = np.clip(np.rint(array[:, like.columns.get_loc(name)]), 0, len(self.levels[name]) - 1).astype(int)
            out[name] = np.asarray(self.levels[name], dtype=object)[codes]
        return out


def baselines(categorical_positions: list[int], seed: int) -> dict:
    return {
        "mean": lambda: _MeanMode(categorical_positions),
        "KNN": _ScaledKNN,
        "IterativeImputer": lambda: IterativeImputer(max_iter=10, random_state=seed),
        "MissForest-style": lambda: IterativeImputer(
            estimator=RandomForestRegressor(n_estimators=50, random_state=seed, n_jobs=2), max_iter=5, random_state=seed
        ),
    }


class _ScaledKNN:
    """KNNImputer (5 neighbours) on standardised columns, so that no column's units dominate the
    distances."""

    def fit_transform(self, X):
        scaler = StandardScaler().fit(X)  # ignores missing cells
        return scaler.inverse_transform(KNNImputer(n_neighbors=5).fit_transform(scaler.transform(X)))


class _MeanMode:
    """Column means, most frequent code for categorical columns."""

    def __init__(self, categorical_positions: list[int]):
        self.categorical_positions = categorical_positions

    def fit(self, X):
        self.mean, self.mode = SimpleImputer().fit(X), SimpleImputer(strategy="most_frequent").fit(X)
        return self

    def fit_transform(self, X):
        return self.fit(X).transform(X)

    def transform(self, X):
        out = self.mean.transform(X)
        out[:, self.categorical_positions] = self.mode.transform(X)[:, self.categorical_positions]
        return out


def scores(filled: pd.DataFrame, truth: pd.DataFrame, mask: np.ndarray, numeric: list[str], std: pd.Series) -> tuple:
    """(NRMSE over masked numeric cells, accuracy over masked categorical cells or NaN)."""
    errors, hits = [], []
    for index, name in enumerate(truth.columns):
        rows = mask[:, index]
        if name in numeric:
            errors.append((filled[name].to_numpy(float)[rows] - truth[name].to_numpy(float)[rows]) / std[name])
        else:
            hits.append(filled[name].to_numpy()[rows] == truth[name].to_numpy()[rows])
    errors = np.concatenate(errors) if errors else np.array([np.nan])
    hits = np.concatenate(hits) if hits else np.array([np.nan])
    return float(np.sqrt(np.mean(errors**2))), float(np.mean(hits)) if hits.size else float("nan")


def synthesis_scores(
    real: pd.DataFrame, rows: pd.DataFrame, numeric: list[str], seed: int
) -> tuple[float, float, float]:
    """(detection AUC, mean per-column distance, correlation difference) of `rows` against `real`."""
    from scipy.stats import ks_2samp

    def encoded(frame):
        parts = [((frame[numeric].astype(float) - real[numeric].mean()) / (real[numeric].std() + 1e-12))]
        for name in real.columns.difference(numeric):
            parts.append(
                pd.get_dummies(pd.Categorical(frame[name], categories=sorted(real[name].unique())), prefix=name)
                .set_index(frame.index)
                .astype(float)
            )
        return pd.concat(parts, axis=1).fillna(0.0)

    a, b = encoded(real), encoded(rows)
    X, y = pd.concat([a, b]).to_numpy(), np.r_[np.zeros(len(a)), np.ones(len(b))]
    auc = cross_val_score(
        RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=2), X, y, cv=5, scoring="roc_auc"
    ).mean()
    distances = []
    for name in real.columns:
        if name in numeric:
            distances.append(ks_2samp(real[name].astype(float), rows[name].astype(float)).statistic)
        else:
            p = real[name].value_counts(normalize=True)
            q = rows[name].value_counts(normalize=True)
            distances.append(0.5 * p.subtract(q, fill_value=0).abs().sum())
    corr_a, corr_b = np.nan_to_num(np.corrcoef(a.to_numpy().T)), np.nan_to_num(np.corrcoef(b.to_numpy().T))
    upper = np.triu_indices_from(corr_a, 1)
    return float(auc), float(np.mean(distances)), float(np.abs(corr_a - corr_b)[upper].mean())


def run_table(name: str, frame: pd.DataFrame, categorical: list[str], args) -> None:
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(frame))
    cut = int(0.7 * len(frame))
    train, test = frame.iloc[order[:cut]].reset_index(drop=True), frame.iloc[order[cut:]].reset_index(drop=True)
    numeric = [c for c in frame.columns if c not in categorical]
    std = train[numeric].astype(float).std()
    print(
        f"\n## {name}: {len(train)} training rows, {len(test)} held out; {len(numeric)} numeric, "
        f"{len(categorical)} categorical columns",
        flush=True,
    )

    start = time.perf_counter()
    settings = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.imputer)}
    model = Imputer(**{"steps": args.steps, **settings}, categorical=tuple(categorical), seed=args.seed).fit(train)
    fit_seconds = {"biglearn": [time.perf_counter() - start]}
    coded = Coded(train, categorical)
    makers = baselines([frame.columns.get_loc(c) for c in categorical], args.seed)

    draws = {}  # (mask kind, method) -> [(NRMSE, accuracy) per draw of the mask]
    for kind in MASKS:
        missing = []
        for repeat in range(args.repeats):
            mask = make_mask(test, numeric, kind, np.random.default_rng(args.seed + 1 + repeat))
            missing.append(mask.mean())
            observed = test.astype(object).mask(mask)
            for c in numeric:
                observed[c] = observed[c].astype(float)
            draws.setdefault((kind, "biglearn"), []).append(scores(model.transform(observed), test, mask, numeric, std))
            rows = np.vstack([coded.to_array(train), coded.to_array(observed)])
            for method, make in makers.items():
                start = time.perf_counter()
                filled = coded.to_frame(make().fit_transform(rows)[len(train) :], test)
                fit_seconds.setdefault(method, []).append(time.perf_counter() - start)
                draws.setdefault((kind, method), []).append(scores(filled, test, mask, numeric, std))
        print(f"  {kind}: {np.mean(missing):.0%} of held-out cells missing ({args.repeats} draws)", flush=True)
    results = {key: tuple(np.nanmean(values, 0)) for key, values in draws.items()}
    fit_seconds = {method: float(np.mean(seconds)) for method, seconds in fit_seconds.items()}

    methods = ["biglearn", *makers]
    print("| measure | " + " | ".join(methods) + " | biglearn / best baseline |")
    print("| --- " * (len(methods) + 2) + "|")
    for kind in MASKS:
        nrmse = [results[kind, m][0] for m in methods]
        print(f"| NRMSE, {kind} | " + " | ".join(f"{v:.3f}" for v in nrmse) + f" | {nrmse[0] / min(nrmse[1:]):.2f}x |")
    if categorical:
        for kind in MASKS:
            accuracy = [results[kind, m][1] for m in methods]
            print(
                f"| accuracy, {kind} | "
                + " | ".join(f"{v:.3f}" for v in accuracy)
                + f" | {accuracy[0] - max(accuracy[1:]):+.3f} |"
            )
    print(
        "| fit seconds | "
        + " | ".join(f"{fit_seconds[m]:.1f}" for m in methods)
        + f" | {fit_seconds['biglearn'] / max(fit_seconds[m] for m in makers):.0f}x the slowest |",
        flush=True,
    )

    if args.synthesis:
        synthetic = {
            "real training rows": train,
            "biglearn": pd.DataFrame(model.sample(len(train), seed=args.seed)),
            "independent columns": train.apply(
                lambda column: column.sample(len(train), replace=True, random_state=args.seed).to_numpy()
            ),
        }
        try:
            from sdv.metadata import Metadata
            from sdv.single_table import CTGANSynthesizer, TVAESynthesizer

            metadata = Metadata.detect_from_dataframe(train)
            for label, synthesizer in (("CTGAN", CTGANSynthesizer), ("TVAE", TVAESynthesizer)):
                start = time.perf_counter()
                engine = synthesizer(metadata)
                engine.fit(train)
                synthetic[label] = engine.sample(len(train))
                print(f"  {label} fitted in {time.perf_counter() - start:.1f} s", flush=True)
        except ImportError as error:
            print(f"  SDV not importable ({error}); CTGAN and TVAE left out")
        print("| synthetic rows | detection AUC (0.5 best) | per-column distance | correlation difference |")
        print("| --- | --- | --- | --- |")
        for label, rows in synthetic.items():
            auc, distance, correlation = synthesis_scores(test, rows, numeric, args.seed)
            print(f"| {label} | {auc:.3f} | {distance:.3f} | {correlation:.3f} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--tables",
        nargs="*",
        default=["iris", "wine", "diabetes", "breast_cancer"],
        choices=["iris", "wine", "diabetes", "breast_cancer"],
    )
    p.add_argument("--csv", nargs="*", default=[], help="CSV files to add (text columns are categorical)")
    p.add_argument("--categorical", nargs="*", default=[], help="CSV columns of numbers that are categories")
    p.add_argument("--steps", type=int, default=1000, help="biglearn's training steps per table")
    p.add_argument("--repeats", type=int, default=5, help="draws of each mask (scores are their means)")
    p.add_argument("--imputer", nargs="*", default=[], metavar="KEY=VALUE", help="other Imputer settings, e.g. bins=16")
    p.add_argument("--synthesis", action="store_true", help="also score synthetic rows")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tables = [(name, *bundled(name)) for name in args.tables]
    for path in args.csv:
        frame = pd.read_csv(path).dropna()  # the truth must be complete to score imputations
        categorical = [c for c in frame.columns if frame[c].dtype == object or c in args.categorical]
        tables.append((path, frame.astype({c: object for c in categorical}), categorical))
    for name, frame, categorical in tables:
        run_table(name, frame, categorical, args)


if __name__ == "__main__":
    main()
