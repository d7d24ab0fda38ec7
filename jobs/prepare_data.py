"""Convert real formats into a biglearn dataset (Parquet shards + manifest.json, written last),
in a local folder or under s3://bucket/prefix.

    python jobs/prepare_data.py --set source.kind=idx --set source.images=train-images-idx3-ubyte.gz \\
        --set source.labels=train-labels-idx1-ubyte.gz --set output=s3://my-bucket/datasets/mnist
    python jobs/prepare_data.py --set source.kind=images --set source.folder=img_align_celeba \\
        --set source.resolution=64 --set source.encoding=patches --set source.patch=8 \\
        --set source.attributes=list_attr_celeba.txt --set output=data/celeba64
    python jobs/prepare_data.py --set source.kind=text --set source.files=corpus/ --set output=data/text
    python jobs/prepare_data.py --set source.kind=gmm --set output=data/gmm25
    python jobs/prepare_data.py --config my-dataset.yaml

An interrupted run leaves no manifest; running the same command again completes the dataset,
converting only the shards it lacks. S3 credentials come from the AWS chain (environment,
profile, role); set AWS_ENDPOINT_URL_S3 for an S3-compatible store.
"""

from __future__ import annotations

import logging
import sys

from biglearn.config import ConfigError, job_parser, load_config
from biglearn.data.manifest import DatasetError
from biglearn.data.prepare import PrepareConfig, prepare_dataset
from biglearn.data.storage import StorageError


def main(argv: list[str] | None = None) -> int:
    args = job_parser(__doc__, "YAML with source, output and options", "source.kind=text").parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        cfg = load_config(PrepareConfig, args.config, args.set)
        manifest = prepare_dataset(cfg)
    except (ConfigError, DatasetError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shape = f"V={manifest.vocab_size}" if manifest.kind == "discrete" else f"P={manifest.patch_dim}"
    splits = ", ".join(f"{split} {manifest.rows(split)}" for split in manifest.splits)
    print(f"[biglearn] {manifest.name}: {manifest.kind}, L={manifest.length}, {shape}; rows: {splits}; at {cfg.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
