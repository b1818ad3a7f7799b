"""Other names for installed models (`edge-llm alias llama3.2:latest llama-3.2-1b-instruct-int4`,
and the names a pull was asked by, `hf.co/REPO:Q4_K_M`): a small JSON table, name -> model id.
`model_store` keeps it in $EDGE_LLM_HOME/aliases.json and checks what it points to.

Names compare as Ollama compares them: case does not matter, and a name without a tag is the
same as NAME:latest."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

VALID = re.compile(r"^\w[\w.:/@+-]{0,199}$")


def normalize(name: str) -> str:
    n = name.strip().lower()
    return n[: -len(":latest")] if n.endswith(":latest") else n


class AliasTable:
    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.path}: unreadable alias file ({e}); fix or delete it") from None
        if not isinstance(data, dict):
            return {}
        return {normalize(k): v for k, v in data.items() if isinstance(v, str)}

    def save(self, table: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dict(sorted(table.items())), indent=1))
        os.replace(tmp, self.path)

    def lookup(self, name: str) -> str | None:
        return self.load().get(normalize(name))

    def set(self, alias: str, model_id: str, replace: bool = False) -> None:
        if not VALID.match(alias):
            raise ValueError(f"{alias!r}: an alias is letters, digits and . _ - : / @ + (up to 200)")
        table = self.load()
        key = normalize(alias)
        if not replace and key in table and table[key] != model_id:
            raise FileExistsError(f"{alias!r} already names {table[key]}; remove it first "
                                  f"(edge-llm alias --rm {alias}) or give --force")
        table[key] = model_id
        self.save(table)

    def remove(self, alias: str) -> str:
        table = self.load()
        key = normalize(alias)
        if key not in table:
            raise FileNotFoundError(f"{alias}: no such alias")
        target = table.pop(key)
        self.save(table)
        return target

    def of(self, model_id: str) -> list[str]:
        return sorted(k for k, v in self.load().items() if v == model_id)

    def drop_target(self, model_id: str) -> None:
        table = self.load()
        kept = {k: v for k, v in table.items() if v != model_id}
        if kept != table:
            self.save(kept)
