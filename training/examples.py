"""The dataset's typed values: one training example, and a built dataset with its card
(training/dataset.py builds them; the trainer and the gate read them)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path


@dataclass
class Example:
    """One training example. `prompt` is chat messages; the answer is `completion`
    (SFT, KTO) or `chosen` / `rejected` (preference)."""

    key: str
    kind: str  # sft | preference | kto
    source: str  # merged_change | review_revision | preference | kto
    prompt: list[dict]
    completion: str = ""
    chosen: str = ""
    rejected: str = ""
    label: bool | None = None  # KTO: desirable?
    when: datetime | None = None
    paths: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def answer_text(self) -> str:
        return self.completion or self.chosen

    def change_text(self) -> str:
        """The change itself (changed lines of its diff, and the requirement): what duplicates
        and contamination are judged on, since whole-file answers of one file look alike."""
        return self.meta.get("change") or self.answer_text()

    def to_json(self) -> dict:
        out = asdict(self)
        out["when"] = self.when.isoformat() if self.when else None
        return out


@dataclass
class TrainingData:
    repo: str
    edit_format: str
    sft: list[Example]
    heldout: list[Example]
    preference: list[Example]
    kto: list[Example]
    card: dict
    data_until: datetime | None

    def save(self, directory: Path) -> Path:
        """Write the examples (JSONL per split) and the dataset card (JSON) to `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        for name in ("sft", "heldout", "preference", "kto"):
            with open(directory / f"{name}.jsonl", "w", encoding="utf-8") as fh:
                for ex in getattr(self, name):
                    fh.write(json.dumps(ex.to_json()) + "\n")
        path = directory / "dataset_card.json"
        path.write_text(json.dumps(self.card, indent=2, sort_keys=True))
        return path
