"""Data stage: fetch each split of a recipe and write plain UTF-8 files plus stats.json.

Where a split comes from, in order:
1. `src_file`/`tgt_file` in the recipe: local files.
2. NMT_DATA_MIRROR set: `<mirror>/<corpus>/<split>.<lang>[.gz]`, and nothing else, so a
   machine without network never tries to reach it.
3. The data dir (NMT_DATA_DIR, default ./data), laid out like the mirror: a hub download is
   exported there once, and read from there on later runs.
4. The Hugging Face hub through `datasets` (`hub`, `hub_config`, `hub_split`).
"""

from __future__ import annotations

import os
from pathlib import Path

from nmt.clean import clean_pairs
from nmt.config import Config, SplitSource, config_to_dict, save_config
from nmt.errors import NmtError
from nmt.io import read_aligned, remove_stale_temps, start_stage, versions, write_json, write_lines


def mirror_dir() -> Path | None:
    value = os.environ.get("NMT_DATA_MIRROR", "").strip()
    if not value:
        return None
    path = Path(value)
    if not path.is_dir():
        raise NmtError(f"NMT_DATA_MIRROR={value}: not a directory")
    return path


def data_dir() -> Path:
    return Path(os.environ.get("NMT_DATA_DIR", "data"))


def _find(root: Path, source: SplitSource, lang: str) -> Path | None:
    for name in (f"{source.split}.{lang}", f"{source.split}.{lang}.gz"):
        path = root / source.corpus / name
        if path.is_file():
            return path
    return None


def fetch_split(source: SplitSource, src_lang: str, tgt_lang: str, key: str, skip_bad: bool = False):
    """Both sides of one split, the number of pairs dropped for invalid text (only with skip_bad),
    and a description of where they came from."""
    if source.src_file is not None:
        src_path, tgt_path = Path(source.src_file), Path(source.tgt_file)
        return (*read_aligned(src_path, tgt_path, skip_bad), f"files {src_path}, {tgt_path}")
    mirror = mirror_dir()
    roots = [mirror] if mirror is not None else [data_dir()]
    for root in roots:
        src_path, tgt_path = _find(root, source, src_lang), _find(root, source, tgt_lang)
        if src_path and tgt_path:
            return (*read_aligned(src_path, tgt_path, skip_bad), f"{root}/{source.corpus}/{source.split}")
    if mirror is not None:
        raise NmtError(
            f"{key}: NMT_DATA_MIRROR={mirror} has no {source.corpus}/{source.split}."
            f"{{{src_lang},{tgt_lang}}}[.gz]; with a mirror set nothing is fetched from the network"
        )
    if source.hub is None:
        raise NmtError(
            f"{key}: {data_dir()}/{source.corpus}/{source.split}.{{{src_lang},{tgt_lang}}} not found "
            "and no `hub` dataset is named; set NMT_DATA_MIRROR or give src_file/tgt_file"
        )
    download_from_hub(source, (src_lang, tgt_lang), data_dir(), key)
    src_path, tgt_path = _find(data_dir(), source, src_lang), _find(data_dir(), source, tgt_lang)
    return (*read_aligned(src_path, tgt_path, skip_bad), f"hub {source.hub} ({source.hub_config})")


def download_from_hub(source: SplitSource, langs: tuple[str, str], root: Path, key: str) -> None:
    """Export one split of a `datasets` dataset to <root>/<corpus>/<split>.<lang>.

    Handles both layouts found on the hub: a `translation` column of {lang: text} dicts
    (wmt14, iwslt2017) and one column per language (bentrevett/multi30k).
    """
    import datasets  # slow to import: only here

    split = source.hub_split or source.split
    try:
        dataset = datasets.load_dataset(source.hub, source.hub_config, split=split)
    except Exception as err:  # datasets raises many types: network, missing config, bad split
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NmtError(
            f"{key}: cannot load hub dataset {source.hub} (config {source.hub_config}, split "
            f"{split}): {first_line}; set NMT_DATA_MIRROR to read a local mirror instead"
        ) from None
    columns = dataset.column_names
    sides: dict[str, list[str]] = {}
    for lang in langs:
        if "translation" in columns:
            sides[lang] = [row[lang] for row in dataset["translation"]]
        elif lang in columns:
            sides[lang] = list(dataset[lang])
        else:
            raise NmtError(
                f"{key}: hub dataset {source.hub} has no '{lang}' text (columns: {', '.join(columns)})"
            )
    remove_stale_temps(root / source.corpus)  # an export killed mid-write
    for lang, lines in sides.items():
        # A line break inside a sentence would misalign the files: fold it into a space.
        text = [" ".join(str(line).splitlines()) for line in lines]
        write_lines(root / source.corpus / f"{source.split}.{lang}", text)


def run_data_stage(config: Config, exp_dir: Path) -> dict:
    """Write exp/<recipe>/data/{train,valid,<test>}.{src,tgt} and stats.json (written last)."""
    out = exp_dir / "data"
    # stats.json marks a complete stage: removed first, written last.
    stats_path = start_stage(out, "stats.json")
    data = config.data
    langs = (data.src_lang, data.tgt_lang)

    train_src, train_tgt, sources, invalid = [], [], [], 0
    for i, source in enumerate(data.train):
        src, tgt, bad, where = fetch_split(source, *langs, f"data.train.{i}", data.bad_lines == "skip")
        train_src += src
        train_tgt += tgt
        invalid += bad
        sources.append(where)
    kept_src, kept_tgt, train_stats = clean_pairs(train_src, train_tgt, data.clean)
    if invalid:
        train_stats["pairs_in"] += invalid
        train_stats["dropped"]["invalid_text"] = invalid
    if not kept_src:
        raise NmtError(f"data.train: no training pairs left after cleaning ({train_stats})")
    write_lines(out / "train.src", kept_src)
    write_lines(out / "train.tgt", kept_tgt)
    stats = {"train": {**train_stats, "sources": sources}}

    # Valid and test sets are written unfiltered: the references must stay the references.
    held_out = {"valid": (data.valid, "data.valid")}
    held_out.update({name: (src, f"data.test.{name}") for name, src in data.test.items()})
    for name, (source, key) in held_out.items():
        src, tgt, _, where = fetch_split(source, *langs, key)
        if not src:
            raise NmtError(f"{key}: {where} is empty")
        write_lines(out / f"{name}.src", src)
        write_lines(out / f"{name}.tgt", tgt)
        stats[name] = {"pairs_in": len(src), "pairs_kept": len(src), "dropped": {}, "sources": [where]}

    save_config(config, out / "config.yaml")
    write_json(stats_path, {"splits": stats, "config": config_to_dict(config), "versions": versions()})
    return stats
