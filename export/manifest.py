"""The manifest contract: every manifest.json the export tool writes is validated against
engines/manifest.schema.json, the JSON Schema generated from the server's manifest types
(src/bundle/manifest.rs; a Rust test keeps the file current), so a bundle the server would refuse is never written.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "engines" / "manifest.schema.json"


class ManifestError(Exception):
    """A manifest that does not satisfy the schema (a bug of the export tool, not of its input)."""


@lru_cache(maxsize=1)
def _validator():
    from jsonschema import Draft202012Validator

    schema = json.loads(SCHEMA_PATH.read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def problems(manifest: dict) -> list[str]:
    """Every way `manifest` breaks the schema, as `path: message` lines (empty when it is valid)."""
    from jsonschema.exceptions import best_match

    out = []
    for e in sorted(_validator().iter_errors(manifest), key=lambda e: [str(p) for p in e.absolute_path]):
        # "T or null" keys: name the problem inside T rather than "not valid under any of the schemas".
        while e.context:
            inner = [c for c in e.context if c.schema != {"type": "null"}]
            e = best_match(inner or e.context)
        out.append(f"{'/'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}")
    return out


def check(manifest: dict) -> None:
    """Raises ManifestError naming every problem; call before writing a manifest."""
    found = problems(manifest)
    if found:
        raise ManifestError(
            f"the manifest does not satisfy {SCHEMA_PATH.name} (the server would refuse the bundle): "
            + "; ".join(found)
        )


def write(path: Path, manifest: dict) -> None:
    """Validates `manifest`, then writes it as the export tool always does (indented, UTF-8)."""
    check(manifest)
    Path(path).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
