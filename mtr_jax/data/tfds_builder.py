"""TFDS copy of a QA dataset: prepared once from local files into `array_record`, then read with
random access through `tfds.data_source` (no TensorFlow needed for either step).

    prepare_tfds("hotpotqa", {"dev": "data/hotpot_dev_distractor_v1.json"}, data_dir="~/tfds")
    load_records("hotpotqa", "tfds:~/tfds", split="dev")

One builder, `mtr_qa`, with one config per dataset name; each example is the record's id and its
`QARecord` JSON (lossless, and the schema stays in `records.py`, not duplicated as TFDS features).
"""

from __future__ import annotations

import json
import pathlib
from typing import Iterator

import tensorflow_datasets as tfds

from mtr_jax.data.loaders import DATASETS, canonical_name, canonical_split, load_records
from mtr_jax.errors import MtrError

VERSION = "1.0.0"


class MtrQa(tfds.core.GeneratorBasedBuilder):
    """QA records of one benchmark (config = dataset name), converted by `mtr_jax.data.loaders`."""

    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n) for n in DATASETS]

    # tfds locates a builder's code (for checksum files we do not have) through
    # `importlib_resources`, which is not installed on Python >= 3.9; nothing is downloaded here.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None

    def __init__(self, *, sources: dict[str, str] | None = None, **kwargs):
        self._sources = dict(sources or {})  # split -> local file; only needed to prepare
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({"id": tfds.features.Text(), "record": tfds.features.Text()})
        # disable_shuffling keeps the source file's order, so ids line up with the original files
        return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
        if not self._sources:
            raise MtrError(f"mtr_qa/{self.builder_config.name}: not prepared and no source files given")
        return {split: self._generate_examples(path, split) for split, path in self._sources.items()}

    def _generate_examples(self, path: str, split: str):
        for rec in load_records(self.builder_config.name, path, split):
            yield rec.id, {"id": rec.id, "record": json.dumps(rec.to_json(), ensure_ascii=False)}


def prepare_tfds(name: str, sources: dict[str, str], data_dir: str) -> MtrQa:
    """Convert local files (split -> path) once into array_record under data_dir; a no-op if done."""
    name = canonical_name(name)
    sources = {canonical_split(name, s): str(pathlib.Path(p).expanduser()) for s, p in sources.items()}
    builder = MtrQa(config=name, data_dir=str(pathlib.Path(data_dir).expanduser()), sources=sources,
                    file_format="array_record")
    builder.download_and_prepare()
    return builder


def read_tfds(name: str, data_dir: str, split: str) -> Iterator[tuple[str, object]]:
    """(where, QARecord) pairs of a prepared split, for `loaders.iter_raw`."""
    from mtr_jax.data.records import QARecord

    root = pathlib.Path(data_dir).expanduser()
    try:
        source = tfds.data_source(f"mtr_qa/{name}", data_dir=str(root), split=split, download=False)
    except Exception as e:  # not prepared, unknown split: tfds raises several types
        raise MtrError(f"tfds:{root}: no prepared split '{split}' of mtr_qa/{name} ({type(e).__name__}); "
                       "run prepare_tfds first") from None
    for i in range(len(source)):
        row = json.loads(source[i]["record"].decode("utf-8"))
        yield f"tfds:{root}/mtr_qa/{name}[{split}][{i}]", QARecord.from_json(row)

