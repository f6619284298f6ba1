"""Dataset specs: ``kind:path`` plus ``:key=value`` options, parsed into ``DatasetSpec``
(the grammar is in ``ifc_ds.data``'s docstring)."""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("parquet", "imagefolder", "disk", "arrow", "sklearn")
OPTIONS = ("split", "image_column", "label_column", "start", "limit", "streaming")


class DatasetSpecError(ValueError):
    """A dataset spec that cannot be loaded; the message names the spec."""


@dataclass(frozen=True)
class DatasetSpec:
    kind: str  # one of KINDS, or "hub"
    path: str
    split: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    start: int = 0
    limit: int | None = None
    streaming: bool = False
    text: str = ""

    def error(self, message: str) -> DatasetSpecError:
        return DatasetSpecError(f"dataset '{self.text}': {message}")


def parse_spec(text: str) -> DatasetSpec:
    """``"parquet:/x/*.parquet:split=train"`` -> DatasetSpec (see the module docstring)."""
    if not text or not isinstance(text, str):
        raise DatasetSpecError(f"dataset spec must be a non-empty string, got {text!r}")
    head, _, rest = text.partition(":")
    if head in KINDS:
        kind, body = head, rest
    elif "/" in head and not head.startswith(("/", ".")):
        kind, body = "hub", text
    else:
        raise DatasetSpecError(f"dataset '{text}': unknown kind '{head}'; use one of {', '.join(KINDS)} "
                               "or a hub name owner/name")
    # options are the trailing ':key=value' segments; everything before them is the path
    segments = body.split(":")
    options: dict = {}
    while len(segments) > 1 and "=" in segments[-1]:
        for item in segments.pop().split(","):
            key, _, value = item.partition("=")
            if key not in OPTIONS:
                raise DatasetSpecError(f"dataset '{text}': unknown option '{key}'; options: {', '.join(OPTIONS)}")
            options[key] = value
    path = ":".join(segments)
    if not path:
        raise DatasetSpecError(f"dataset '{text}': missing path")
    try:
        limit = int(options["limit"]) if "limit" in options else None
        start = int(options.get("start", 0))
        valid = start >= 0 and (limit is None or limit >= 0)
    except ValueError:
        valid = False
    if not valid:
        raise DatasetSpecError(f"dataset '{text}': start and limit must be integers >= 0")
    if "split" in options and kind in ("parquet", "arrow", "sklearn"):
        # the files given are all of the data: a split would only rename them, and "split=test" on a glob over
        # train-*.parquet and test-*.parquet read both as "test", silently
        raise DatasetSpecError(f"dataset '{text}': split= chooses among the splits of an imagefolder, disk or hub "
                               f"dataset; a {kind} spec reads exactly its files, so name the split's files instead "
                               "(e.g. parquet:/data/test-*.parquet)")
    return DatasetSpec(kind=kind, path=path, split=options.get("split"), image_column=options.get("image_column"),
                       label_column=options.get("label_column"), start=start, limit=limit,
                       streaming=options.get("streaming", "false").lower() in ("1", "true", "yes"), text=text)


