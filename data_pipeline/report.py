"""The preparation report: what was read, what was written, and every skip with its reason.

Printed at the end of `launch.prepare_data` and stored as `prepare_report.json` beside the prepared
dataset, so a data problem found weeks later can be traced to the files that were left out.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any

from absl import logging

from melody_jax.training.metrics import write_json_atomic


@dataclasses.dataclass
class PrepareReport:
    items_read: int = 0  # files, manifest/CSV rows or synthetic clips attempted
    examples_written: int = 0
    seconds_written: float = 0.0
    elapsed_s: float = 0.0
    examples_per_split: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # {item, segment, reason, detail}
    reused: bool = False  # the dataset already existed with the same settings: nothing was prepared
    notes: list[dict[str, str]] = dataclasses.field(default_factory=list)  # {item, note}: kept despite a defect

    def skip(self, item: str, reason: str, detail: str = "", segment: int | None = None) -> None:
        self.skipped.append({"item": item, "segment": segment, "reason": reason, "detail": detail})
        where = item if segment is None else f"{item} (segment {segment})"
        logging.warning("skipped %s: %s%s", where, reason, f" ({detail})" if detail else "")

    def note(self, item: str, note: str) -> None:
        self.notes.append({"item": item, "note": note})
        logging.warning("kept %s: %s", item, note)

    def wrote(self, split: str, seconds: float) -> None:
        self.examples_written += 1
        self.seconds_written += seconds
        self.examples_per_split[split] = self.examples_per_split.get(split, 0) + 1

    @property
    def items_skipped(self) -> int:
        return sum(1 for s in self.skipped if s["segment"] is None)

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(sorted(collections.Counter(s["reason"] for s in self.skipped).items()))

    @property
    def hours_prepared(self) -> float:
        return self.seconds_written / 3600.0

    @property
    def prepared_hours_per_second(self) -> float:
        return self.hours_prepared / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(items_skipped=self.items_skipped, skipped_by_reason=self.skipped_by_reason(),
                   hours_prepared=self.hours_prepared, prepared_hours_per_second=self.prepared_hours_per_second)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PrepareReport:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, path: str) -> None:
        write_json_atomic(path, self.to_json(), sort_keys=False)

    def summary(self) -> str:
        lines = [
            f"items read:       {self.items_read}" + ("  (reused an existing dataset)" if self.reused else ""),
            f"examples written: {self.examples_written} {self.examples_per_split}",
            f"hours prepared:   {self.hours_prepared:.4f} in {self.elapsed_s:.1f} s "
            f"({self.prepared_hours_per_second:.4f} h/s)",
            f"items skipped:    {self.items_skipped}, segments skipped: {len(self.skipped) - self.items_skipped}",
        ]
        if self.notes:
            lines.append(f"kept with a note: {len(self.notes)} (see notes in the report, e.g. truncated files)")
        lines += [f"  {n:6d}  {reason}" for reason, n in self.skipped_by_reason().items()]
        return "\n".join(lines)
