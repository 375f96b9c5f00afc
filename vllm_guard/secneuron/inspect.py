"""``vllm-guard inspect``: manifest summary plus the ciphertext detector's verdict per layer."""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from vllm_guard.secneuron.checkpoint import ffn_layout, load_checkpoint
from vllm_guard.secneuron.detector import scan_tensors
from vllm_guard.secneuron.manifest import read_manifest


def inspect_checkpoint(model_dir: str | os.PathLike[str],
                       publisher: Ed25519PublicKey | None = None) -> dict:
    """A JSON-able report; ``text`` holds the human-readable form."""
    manifest = read_manifest(model_dir)
    ckpt = load_checkpoint(model_dir)
    layers = ffn_layout(ckpt)
    verdicts = scan_tensors(ckpt.tensors, layers)
    lines = [f"checkpoint {model_dir}: {len(layers)} FFN layers, {ckpt.nbytes / 1e6:.1f} MB"]
    report: dict = {"model": str(model_dir), "manifest": None}
    if manifest is None:
        lines.append("manifest: none (plaintext checkpoint)")
    else:
        status = manifest.signature_status(publisher)
        groups = [{"id": g.id, "policy": g.policy,
                   "neurons": sum(len(v) for v in g.neurons.values())} for g in manifest.groups]
        report["manifest"] = {"checkpoint_id": manifest.checkpoint_id,
                              "tasks": manifest.tasks, "key_ids": manifest.key_ids,
                              "groups": groups, "signature": status}
        lines.append(f"manifest: checkpoint {manifest.checkpoint_id}, signature: {status}")
        lines.append(f"tasks: {', '.join(f'{t} (bit {b})' for t, b in manifest.tasks.items())}")
        lines += [f"  group {g['id']}: policy {' OR '.join(g['policy'])}, {g['neurons']} neurons"
                  for g in groups]
    report["layers"] = {v.layer: v.summary() for v in verdicts}
    report["encrypted_neurons"] = sum(s["encrypted"] for s in report["layers"].values())
    lines.append("detector (neurons that look like ciphertext / all-zero):")
    lines += [f"  layer {v.layer}: {s['encrypted']}/{s['neurons']} encrypted, {s['zeroed']} zeroed"
              for v in verdicts for s in [v.summary()]]
    lines.append(f"verdict: {report['encrypted_neurons']} neurons look encrypted")
    report["text"] = "\n".join(lines)
    return report
