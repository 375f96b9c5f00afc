"""The neuron selection (per layer, per task, the neurons ``extract`` chose) and its policy
tree: neurons grouped by the exact set of tasks that selected them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from vllm_guard.errors import ManifestError
from vllm_guard.secneuron.manifest import Group


@dataclass
class Selection:
    """Per-layer neuron sets per task, as written by ``extract``."""

    tasks: list[str]
    neurons: dict[int, dict[str, list[int]]]  # layer -> task -> neuron indices
    info: dict = field(default_factory=dict)
    # layer -> task -> attention columns (sealed capabilities' heads; see capability.py)
    attn: dict[int, dict[str, list[int]]] = field(default_factory=dict)
    # layer -> task -> k/v_proj rows of the KV heads those heads read (grouped-query
    # attention); absent: the attn columns (one KV head per head)
    kv: dict[int, dict[str, list[int]]] = field(default_factory=dict)

    def to_json(self) -> dict:
        doc = {"tasks": self.tasks, "info": self.info,
               "layers": {str(k): v for k, v in sorted(self.neurons.items())}}
        if self.attn:
            doc["attn"] = {str(k): v for k, v in sorted(self.attn.items())}
        if self.kv:
            doc["kv"] = {str(k): v for k, v in sorted(self.kv.items())}
        return doc

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Selection:
        try:
            doc = json.loads(Path(path).read_text())
            def per_layer(d: dict) -> dict[int, dict[str, list[int]]]:
                return {int(k): {t: sorted(int(i) for i in v) for t, v in per.items()}
                        for k, per in d.items()}
            return cls(list(doc["tasks"]), per_layer(doc["layers"]), doc.get("info", {}),
                       per_layer(doc.get("attn", {})), per_layer(doc.get("kv", {})))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ManifestError(f"cannot read neuron selection {path}: {e}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.to_json()))


def policy_tree(selection: Selection) -> list[Group]:
    """Group neurons by the exact set of tasks that selected them; each set is an OR policy."""
    def grouped(per_layer: dict[int, dict[str, list[int]]]
                ) -> dict[tuple[str, ...], dict[int, list[int]]]:
        by_policy: dict[tuple[str, ...], dict[int, list[int]]] = {}
        for layer, per_task in sorted(per_layer.items()):
            owners: dict[int, list[str]] = {}
            for task in selection.tasks:
                for n in per_task.get(task, []):
                    owners.setdefault(n, []).append(task)
            for n, tasks in sorted(owners.items()):
                by_policy.setdefault(tuple(sorted(tasks)), {}).setdefault(layer, []).append(n)
        return by_policy

    neurons, attn = grouped(selection.neurons), grouped(selection.attn)
    kv = grouped(selection.kv)
    ordered = sorted(set(neurons) | set(attn) | set(kv), key=lambda p: (len(p), p))
    return [Group(f"g{i}", list(policy), neurons.get(policy, {}), attn=attn.get(policy, {}),
                  kv=kv.get(policy, {}))
            for i, policy in enumerate(ordered)]
