"""Where pretrained weights come from: a file, a model directory, or a Hugging Face hub id.

`resolve(source)` gives a `Pretrained` (directories.py): the weights with the architecture,
class names and preprocessing that came with them. Hub ids (`microsoft/swin-tiny-patch4-window7-224`,
`timm/swin_tiny_patch4_window7_224.ms_in1k`, `hf-hub:...`, optionally `@revision`) are
resolved by huggingface_hub, from its local cache when offline (`HF_HUB_OFFLINE=1`, or no
network), with a message naming the cache folder when the weights are not there.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from swinx.model.config import SwinConfig
from swinx.weights import layouts
from swinx.weights.checkpoint import CheckpointError, read_metadata, read_state_dict
from swinx.weights.directories import SHARD_INDEXES, WEIGHT_FILES, Pretrained, is_model_dir, read_model_dir

HUB_ID = re.compile(r"(?:hf-hub:|hf_hub:)?([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([\w./-]+))?")
HUB_FILES = ["config.json", "preprocessor_config.json", *WEIGHT_FILES, *SHARD_INDEXES, "*.safetensors"]
IMAGENET_CLASSES = 1000


def hub_cache() -> Path:
    """huggingface_hub's cache folder, read now: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def parse_hub_id(source: str) -> tuple[str, str | None] | None:
    """(repo id, revision) when `source` reads as a hub id, else None."""
    m = HUB_ID.fullmatch(str(source).strip())
    return (m[1], m[2]) if m else None


def resolve(source: str | os.PathLike) -> Pretrained:
    """Read pretrained weights from a file, a model directory or a hub id (see the module docstring)."""
    path = Path(source).expanduser()
    if path.is_file():
        return read_file(path)
    if path.is_dir():
        if is_model_dir(path):
            return read_model_dir(path)
        files = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
        if files:  # weights without a config.json: the shapes say the architecture
            return read_file(files[0])
        raise CheckpointError(
            f"{path} is a directory without a model in it: expected config.json with "
            f"{' or '.join(WEIGHT_FILES)} (as transformers and timm write them)"
        )
    hub = parse_hub_id(str(source))
    if hub is None or str(source).startswith(("/", ".", "~")) or path.suffix in (".pth", ".pt", ".bin", ".safetensors"):
        raise CheckpointError(
            f"{source} does not exist: it is not a file or directory, nor a hub id (organisation/name, "
            "e.g. microsoft/swin-tiny-patch4-window7-224)"
        )
    return read_hub(*hub)


def read_file(path: Path) -> Pretrained:
    """A single checkpoint file of any layout; a swinx safetensors file brings its config, classes and input."""
    meta = read_metadata(path) if path.suffix == ".safetensors" else {}
    state, wrapped = read_state_dict(path)
    if meta.get("format") == "swinx" and "config" in meta:
        config = SwinConfig.from_dict(json.loads(meta["config"]))
        classes = json.loads(meta["class_names"]) if "class_names" in meta else None
        spec = json.loads(meta["input"]) if "input" in meta else None
        return Pretrained(config, state, "swinx", classes, spec, "swinx", path)
    parts, _ = layouts.model_parts(state)
    try:
        layout = layouts.detect_layout(parts, wrapped)
        config = layouts.infer_config(parts, layout)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    classes = imagenet_classes() if config.num_classes == IMAGENET_CLASSES else None
    return Pretrained(config, state, layout, classes, None, "file", path)


def imagenet_classes() -> list[str]:
    """The ImageNet-1k class names in index order (torchvision ships them with its weights' metadata)."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)


def repo_folder(repo_id: str) -> Path:
    return hub_cache() / ("models--" + repo_id.replace("/", "--"))


def read_hub(repo_id: str, revision: str | None = None) -> Pretrained:
    """A hub repository's model directory: downloaded (config and weights only) or, offline, from the cache."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{repo_id} reads as a hub id, which needs huggingface_hub: pip install huggingface_hub"
        ) from None
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kwargs = dict(revision=revision, cache_dir=hub_cache(), allow_patterns=HUB_FILES)
    name = repo_id + (f"@{revision}" if revision else "")
    try:
        if hub_offline():
            folder = snapshot_download(repo_id, local_files_only=True, **kwargs)
        else:
            try:
                folder = snapshot_download(repo_id, **kwargs)
            except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError):
                raise
            except Exception:  # no network, hub down: what the cache holds
                folder = snapshot_download(repo_id, local_files_only=True, **kwargs)
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise CheckpointError(
            f"hub repository {name} was not found or is not accessible ({type(e).__name__})"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"hub repository {repo_id} has no revision {revision!r}") from None
    except HFValidationError as e:
        raise CheckpointError(f"{name} is not a valid hub id: {e}") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(_not_cached(repo_id, name)) from None
    folder = Path(folder)
    try:
        return read_model_dir(folder)
    except CheckpointError as e:
        partial = sorted(repo_folder(repo_id).glob("blobs/*.incomplete"))
        if partial:
            raise CheckpointError(
                f"{name}: a download into the Hugging Face cache was interrupted ({partial[0]} is half "
                "written), so the weights are missing; delete that file and download again "
                f"(`hf download {repo_id}`)"
            ) from None
        raise CheckpointError(
            f"{name} (Hugging Face cache {folder}): {e}. If a file there is damaged or half downloaded, "
            f"delete {repo_folder(repo_id)} and download again"
        ) from None


def _not_cached(repo_id: str, name: str) -> str:
    why = "HF_HUB_OFFLINE is set" if hub_offline() else "the hub could not be reached"
    return (
        f"{name} is not in the Hugging Face cache ({repo_folder(repo_id)} has no snapshot of it) and {why}. "
        f"Download it where there is network (`hf download {repo_id}`) into HF_HUB_CACHE={hub_cache()}, or give "
        "a file or model directory"
    )


def load_pretrained(source, base: SwinConfig | None = None, **overrides):
    """A SwinTransformer built for `source`'s weights (or for `base`), with `overrides`, the weights loaded.

    Sets `class_names` (when the source's head is kept), `pretrained_cfg` (the source's
    preprocessing as an input spec, plus "source") and `load_report`."""
    from swinx.classification.inference import default_input_spec
    from swinx.model.swin import SwinTransformer
    from swinx.weights.checkpoint import load_checkpoint

    pre = resolve(source)
    try:
        config = (base or pre.config).replace(**overrides)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot build a model for {source}: {e}") from None
    model = SwinTransformer(config)
    report = load_checkpoint(model, pre.state, layout=pre.layout)
    classes = pre.class_names
    if report.head.startswith("ImageNet-22k head remapped"):
        classes = imagenet_classes()
    keep = report.head in ("loaded",) or report.head.startswith("ImageNet-22k")
    model.class_names = list(classes) if keep and classes and len(classes) == model.num_classes else None
    spec = dict(pre.preprocessing or default_input_spec(config))
    spec["channels"] = config.in_chans
    model.pretrained_cfg = {**spec, "source": str(source), "origin": pre.origin}
    model.load_report = report
    return model
