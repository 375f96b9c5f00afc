"""``vllm-guard inspect``: manifest summary, signed file hashes against the files on disk, and
the ciphertext detector's verdict per layer."""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from vllm_guard.secneuron.checkpoint import ffn_layout, load_checkpoint
from vllm_guard.secneuron.detector import scan_tensors
from vllm_guard.secneuron.manifest import read_manifest
from vllm_guard.secneuron.verify import file_report


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
        checks = file_report(model_dir, manifest)
        files = {c.name: {"signed_sha256": c.signed.sha256 if c.signed else None,
                          "sha256": c.actual.sha256 if c.actual else None,
                          "size": c.actual.size if c.actual else None,
                          "status": c.status} for c in checks}
        intact = all(c.status == "ok" for c in checks)
        report["manifest"] = {"checkpoint_id": manifest.checkpoint_id,
                              "version": manifest.version,
                              "tasks": manifest.tasks, "key_ids": manifest.key_ids,
                              "revoked": manifest.revoked,
                              "groups": groups, "signature": status,
                              "files": files, "files_intact": intact}
        lines.append(f"manifest: checkpoint {manifest.checkpoint_id}, version "
                     f"{manifest.version}, signature: {status}")
        lines.append(f"tasks: {', '.join(f'{t} (bit {b})' for t, b in manifest.tasks.items())}")
        lines += [f"  revoked key {kid} of task {r['task']} at version {r['version']}"
                  for kid, r in manifest.revoked.items()]
        lines += [f"  group {g['id']}: policy {' OR '.join(g['policy'])}, {g['neurons']} neurons"
                  for g in groups]
        lines.append(f"files (signed SHA-256 vs disk): "
                     f"{'all match' if intact else 'DO NOT MATCH: refused by the loader'}")
        for c in checks:
            signed = c.signed.sha256 if c.signed else "-"
            disk = c.actual.sha256 if c.actual else "-"
            lines.append(f"  {c.status:<10} {signed} {c.name}" if c.status == "ok" else
                         f"  {c.status:<10} {signed} {c.name} (on disk: {disk})")
    report["layers"] = {v.layer: v.summary() for v in verdicts}
    report["encrypted_neurons"] = sum(s["encrypted"] for s in report["layers"].values())
    lines.append("detector (neurons that look like ciphertext / all-zero):")
    lines += [f"  layer {v.layer}: {s['encrypted']}/{s['neurons']} encrypted, {s['zeroed']} zeroed"
              for v in verdicts for s in [v.summary()]]
    lines.append(f"verdict: {report['encrypted_neurons']} neurons look encrypted")
    report["text"] = "\n".join(lines)
    return report
