"""One description of the data a model was trained on, derived from the shards' manifest(s): which modalities, and
for each the codec and the options that decoding needs (image height, width, channels, order and tile; audio sample
rate and sample width). It is stored in every checkpoint (``checkpoint["data_description"]``) and is all that
``mmbytes sample``, ``compress``, ``compare`` and the sample callbacks read about the data, so that a file is decoded
(or coded) as the data the model was trained on was encoded (audio of a MixedDataModule's 8 kHz set is written at
8 kHz; an image is compressed in the pixel order the model learned).

Plain Python: no Lightning, no model. A description is a JSON-ready dict::

    {"version": 1,
     "modalities": {"image": {"codec": "image", "height": 32, "width": 32, "channels": 3, "order": "patch", "tile": 4},
                    "audio": {"codec": "audio", "sample_rate": 8000, "sample_width": 2},
                    "text": {"codec": "text"}},
     "sets": [{"data_dir": "data/quickstart", "codec": "auto", "codec_options": {...}, ...}]}

A modality's option that the codec left open (images kept at their own size, audio at its own rate) is taken from the
first sample of that modality in the training shards; it is None when there is none to read.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

VERSION = 1
KEY = "data_description"  # where a checkpoint holds it
RECIPE_FIELDS = ("codec", "codec_options", "val_fraction", "sources", "split", "val_sources")
"""What a manifest records of its recipe."""
BUILT_BY = "built_by"  # a manifest key: the datamodule built these shards itself, and may rebuild them


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples become lists), so a recipe's options compare equal to a manifest's."""
    return json.loads(json.dumps(value))


def modality_options(codec: str, options: dict | None) -> dict[str, dict[str, Any]]:
    """Per modality a codec can produce, what decoding needs, from the codec's name and options (None: left open)."""
    options = dict(options or {})
    if codec == "auto":
        image, audio = options.get("image") or {}, options.get("audio") or {}
        return {"image": _image("image", image), "audio": _audio(audio), "text": {"codec": "text"},
                "raw": {"codec": "raw"}}
    if codec == "image":
        return {"image": _image("image", options)}
    if codec == "idx":
        return {"image": _image("idx", {**options, "channels": 1, "size": None})}  # the size is the file's
    if codec == "audio":
        return {"audio": _audio(options)}
    return {codec if codec in ("text", "raw") else "raw": {"codec": codec}}


def _image(codec: str, options: dict) -> dict[str, Any]:
    size = options.get("size")
    h, w = (size, size) if isinstance(size, int) else (tuple(size) if size else (None, None))
    return {"codec": codec, "height": h, "width": w, "channels": options.get("channels", 3),
            "order": options.get("order", "patch"), "tile": options.get("tile", 4)}


def _audio(options: dict) -> dict[str, Any]:
    return {"codec": "audio", "sample_rate": options.get("sample_rate"), "sample_width": 2}


def read_manifest_file(data_dir: str | Path) -> dict | None:
    """``<data_dir>/manifest.json`` as a dict, or None when there is none (shards given by URL, not built yet)."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        return None
    from mmbytes.shards import read_manifest

    return read_manifest(path)


def first_sample_meta(data_dir: str | Path, manifest: dict, modality: str) -> dict | None:
    """The metadata of the first training sample of ``modality``, read through the shard reader
    (``datamodules.reader``: local shards the manifest names, members bounded; a damaged shard is passed over)."""
    from datamodules.reader import manifest_shards, tar_samples
    from mmbytes.errors import MmbytesError

    path = Path(data_dir) / "manifest.json"
    try:
        shards, bound = manifest_shards(manifest, path, "train")
    except (OSError, MmbytesError, ValueError):
        return None
    for url in shards:
        for sample in tar_samples(url, lambda exn: True, bound):
            try:
                meta = json.loads(sample.get("json", b"null"))
            except ValueError:
                continue
            if isinstance(meta, dict) and meta.get("modality") == modality:
                return meta
    return None


def describe_set(data_set: dict[str, Any]) -> dict[str, Any]:
    """The description of one shard set: ``data_dir`` (its manifest, when there is one) and the recipe fields
    ``codec``, ``codec_options`` (used when there is no manifest, e.g. shards given by URL)."""
    data_dir = data_set.get("data_dir")
    manifest = read_manifest_file(data_dir) if data_dir and not data_set.get("train_shards") else None
    if manifest is not None:
        codec, options = manifest.get("codec", "raw"), manifest.get("codec_options") or {}
        present = set(manifest.get("modalities") or {})
    else:
        codec, options = data_set.get("codec", "raw"), data_set.get("codec_options") or {}
        present = None
    modalities = modality_options(codec, options)
    if present is not None:
        modalities = {m: o for m, o in modalities.items() if m in present}
    for modality, opts in modalities.items():
        open_fields = [k for k in ("height", "width", "sample_rate") if k in opts and opts[k] is None]
        if manifest is not None and open_fields:
            meta = first_sample_meta(data_dir, manifest, modality) or {}
            for k in open_fields:
                opts[k] = meta.get(k)
    recorded = {k: manifest.get(k) for k in RECIPE_FIELDS} if manifest is not None else \
        {k: data_set.get(k) for k in RECIPE_FIELDS}
    return {"modalities": modalities, "set": _plain({"data_dir": data_dir, **recorded})}


def describe(sets: list[dict[str, Any]]) -> dict[str, Any]:
    """The description of shard sets together (a MixedDataModule's ``sets``); the first set holding a modality
    gives its options."""
    modalities: dict[str, dict] = {}
    recorded = []
    for data_set in sets:
        one = describe_set(data_set)
        for m, opts in one["modalities"].items():
            modalities.setdefault(m, opts)
        recorded.append(one["set"])
    return _plain({"version": VERSION, "modalities": modalities, "sets": recorded})


def data_sets(hparams: dict[str, Any]) -> list[dict[str, Any]]:
    """The shard sets of a datamodule's hyperparameters: a MixedDataModule's ``sets``, else the module itself."""
    hparams = dict(hparams or {})
    return [dict(s) for s in hparams["sets"]] if isinstance(hparams.get("sets"), list | tuple) else [hparams]


def of_datamodule(datamodule: Any) -> dict[str, Any] | None:
    """The description of an attached datamodule's data (None without a datamodule with hyperparameters)."""
    hparams = getattr(datamodule, "hparams", None)
    return describe(data_sets(hparams)) if hparams else None


DEFAULTS = "every modality, with the codecs' default options"
"""What a checkpoint that holds neither a description nor its datamodule's recipe is taken to describe: the auto
codec without options (images 3 channels in the patch order with 4 x 4 tiles, their size and the audio sample rate
left open: a reader's own defaults apply, ``mmbytes sample``'s 32 x 32 and 16 kHz)."""


def default() -> dict[str, Any]:
    """The description ``DEFAULTS`` names."""
    return _plain({"version": VERSION, "modalities": modality_options("auto", {}), "sets": []})


def of_checkpoint(ckpt: dict[str, Any], name: str | Path = "checkpoint",
                  notice: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """The description stored in a checkpoint. A checkpoint written before descriptions were stored gets the one
    derived from the recipe it records (its datamodule's hyperparameters: the manifests still there are read, else the
    recipe's codec options), or without one ``default()``; ``notice`` (default: a line on stderr) is told which, in
    one line naming ``name``."""
    stored = ckpt.get(KEY)
    if isinstance(stored, dict) and isinstance(stored.get("modalities"), dict):
        return stored
    hparams = ckpt.get("datamodule_hyper_parameters") or {}
    said = notice or (lambda line: print(line, file=sys.stderr))
    if hparams:
        said(f"{name}: holds no data description (written before checkpoints stored one); described from the recipe "
             "it records")
        return describe(data_sets(hparams))
    said(f"{name}: holds no data description and no data recipe; assuming {DEFAULTS}")
    return default()


def trained_modalities(description: dict[str, Any]) -> set[str]:
    """The modalities the description names."""
    return set(description.get("modalities") or {})


def codec_meta(description: dict[str, Any], modality: str, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the codec of ``modality`` needs to decode, from the description; values in ``given`` (the command line)
    replace it. Image fields the description lacks stay None here (the caller picks its defaults)."""
    opts = dict((description.get("modalities") or {}).get(modality) or {})
    opts.update({k: v for k, v in (given or {}).items() if v is not None})
    if modality == "image":
        return {k: opts.get(k) for k in ("height", "width", "channels", "order", "tile")}
    if modality == "audio":
        return {"sample_rate": opts.get("sample_rate")}
    return {}


def encoder_options(description: dict[str, Any], codec: str) -> dict[str, Any]:
    """Options for ``get_codec(codec)`` that encode a file as the training data was encoded (image size, channels,
    order and tile; audio sample rate), from the description; options it leaves open are left to the codec."""
    modalities = description.get("modalities") or {}
    image = {k: v for k, v in (modalities.get("image") or {}).items() if k in ("channels", "order", "tile")
             and v is not None}
    im = modalities.get("image") or {}
    if im.get("height") and im.get("width"):
        image["size"] = [im["height"], im["width"]]
    rate = (modalities.get("audio") or {}).get("sample_rate")
    audio = {"sample_rate": rate} if rate else {}
    if codec == "auto":
        return {"image": image, "audio": audio}
    return {"image": image, "audio": audio}.get(codec, {})


def recipe_difference(manifest: dict[str, Any], recipe: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, manifest's value, recipe's value) for each recipe field the shards were built with differently."""
    wanted = {"codec": recipe.get("codec", "raw"), "codec_options": recipe.get("codec_options") or {},
              "val_fraction": recipe.get("val_fraction", 0.1),
              "sources": [str(s) for s in recipe.get("sources") or []], "split": recipe.get("split", "auto"),
              "val_sources": [str(s) for s in recipe.get("val_sources") or []]}
    from mmbytes.shards import shown

    wanted["sources"] = [shown(s) for s in wanted["sources"]]
    wanted["val_sources"] = [shown(s) for s in wanted["val_sources"]]
    differ = []
    for k, v in _plain(wanted).items():
        theirs = _plain(manifest.get(k, {"split": "auto", "val_sources": []}.get(k)))  # fields older manifests lack
        same = theirs == v
        if k == "codec_options" and not same:  # the same codec either way ({size: 32} and {size: [32, 32]} alike)
            same = _settings(wanted["codec"], theirs) == _settings(wanted["codec"], v) is not None
        if not same:
            differ.append((k, manifest.get(k), v))
    return differ


def _settings(codec: str, options: Any) -> dict | None:
    """The full settings of a codec made with these options (defaults filled in, values normalised), or None."""
    from dataclasses import asdict, is_dataclass

    from mmbytes.codecs import get_codec

    try:
        made = get_codec(codec, **dict(options or {}))
    except Exception:  # options this codec refuses: compared as given
        return None
    parts = getattr(made, "codecs", None) or {codec: made}
    return _plain({name: asdict(c) if is_dataclass(c) else {} for name, c in parts.items()})


def mark_built_by(data_dir: str | Path, who: str) -> None:
    """Record in ``<data_dir>/manifest.json`` that ``who`` built these shards from its recipe (so it may rebuild them
    when the recipe changes); the manifest is replaced whole (``mmbytes.io``)."""
    path = Path(data_dir) / "manifest.json"
    manifest = json.loads(path.read_bytes())
    manifest[BUILT_BY] = who
    from mmbytes.io import write_text

    write_text(path, json.dumps(manifest, indent=1), ".manifest.json.partial")
