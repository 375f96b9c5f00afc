"""``vllm-guard train-locks``: fine-tune a model to respect its neuron locks."""

from __future__ import annotations

import argparse

from vllm_guard.cli.commands import add_parser
from vllm_guard.cli.common import parse_pairs
from vllm_guard.errors import GuardError


def register(sub: argparse._SubParsersAction) -> None:
    s = add_parser(sub, "train-locks")
    s.add_argument("--model", required=True, help="plaintext model directory to fine-tune")
    s.add_argument("--task", action="append", required=True, metavar="NAME=TRAIN.jsonl",
                   help="prompt/answer JSONL per task (as for extract)")
    s.add_argument("--selection", help="neuron assignment from extract")
    s.add_argument("--block", type=int, help="or: reserve N neurons per task per layer")
    # defaults: TrainLocksConfig's (not imported here: it pulls in torch)
    s.add_argument("--steps", type=int, help="training steps (default 1600)")
    s.add_argument("--batch-size", type=int, help="examples per step (default 64)")
    s.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
    s.add_argument("--grant-prob", type=float, help="chance each task is in a sampled grant")
    s.add_argument("--collapse-weight", type=float, help="weight of the collapse objective")
    s.add_argument("--collapse-task", action="append", default=[], metavar="NAME=FILE.jsonl",
                   help="extra examples of a task used only while it is locked (e.g. decoys)")
    s.add_argument("--member-match", type=float,
                   help="weight matching trained vs --collapse-task answer loss while locked")
    s.add_argument("--seal", action="append", default=[], metavar="TASK",
                   help="learn TASK only in its own neurons, after the rest, so the model with "
                   "TASK locked never depends on its data (use a model not trained on it)")
    s.add_argument("--sealed-block", type=int, help="with --block: neurons per sealed task")
    s.add_argument("--seal-steps", type=int, help="steps of the sealing phase (default 1500)")
    s.add_argument("--seal-lr", type=float, help="its learning rate (default 3e-3)")
    s.add_argument("--seal-capability", metavar="TASK",
                   help="learn the capability TASK only in attention heads and FFN neurons "
                   "added for it (--capability-heads, --capability-neurons), on --model trained "
                   "without it; the other --task files are outputs it must not change. Its "
                   "lock then survives fine-tuning of the public weights (docs/efficacy.md)")
    s.add_argument("--capability-heads", type=int, help="heads added per layer (default 2)")
    s.add_argument("--capability-neurons", type=int,
                   help="FFN neurons added per layer (default 64)")
    s.add_argument("--trap", action="store_true",
                   help="collapse trap: a simulated fine-tuning attack on a locked task must "
                   "wreck the open tasks, simulated benign tuning must not (costs ~3x)")
    s.add_argument("--trap-weight", type=float, help="weight of collapse after the attack")
    s.add_argument("--trap-benign-weight", type=float,
                   help="weight of keeping open tasks after benign tuning")
    s.add_argument("--trap-inner-steps", type=int, help="simulated fine-tuning steps")
    s.add_argument("--trap-inner-lr", type=float, help="simulated step size (sign steps)")
    s.add_argument("--trap-every", type=int, help="add the trap on every n-th step")
    s.add_argument("--trap-settle", type=float,
                   help="share of the last steps without the trap (default 0.2)")
    s.add_argument("--trap-lora-share", type=float,
                   help="share of simulated attacks made through LoRA adapters (default 0.5)")
    s.add_argument("--trap-lora-rank", type=int, help="rank of those adapters (default 8)")
    s.add_argument("--seed", type=int, help="random seed (default 0)")
    s.add_argument("--out", required=True,
                   help="output model directory (with lock_selection.json for lock)")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import transformers

    from vllm_guard.secneuron.examples import read_calibration
    from vllm_guard.secneuron.selection import Selection
    from vllm_guard.secneuron.train import TrainLocksConfig, reserved_blocks, train_locks
    from vllm_guard.secneuron.trap import TrapConfig

    trap_given = {f: getattr(args, f"trap_{f}") for f in (
        "weight", "benign_weight", "inner_steps", "inner_lr", "every", "settle", "lora_share",
        "lora_rank")}
    if not args.trap and any(v is not None for v in trap_given.values()):
        raise GuardError("--trap-* options need --trap")
    trap = TrapConfig(**{k: v for k, v in trap_given.items() if v is not None}) \
        if args.trap else None
    data = {t: read_calibration(p) for t, p in parse_pairs(args.task, "--task").items()}
    if args.seal_capability:
        return _seal_capability(args, data)
    if (args.selection is None) == (args.block is None):
        raise GuardError("train-locks needs exactly one of --selection FILE or --block N")
    if args.selection:
        selection = Selection.load(args.selection)
    else:
        cfg = transformers.AutoConfig.from_pretrained(args.model)
        sizes = {t: args.sealed_block for t in args.seal} if args.sealed_block else None
        selection = reserved_blocks(sorted(data), cfg.num_hidden_layers, cfg.intermediate_size,
                                    args.block, sizes)
    given = {f: getattr(args, f) for f in ("steps", "batch_size", "lr", "grant_prob",
                                           "collapse_weight", "member_match", "seal_steps",
                                           "seal_lr", "seed")}
    config = TrainLocksConfig(**{k: v for k, v in given.items() if v is not None},
                              sealed=tuple(args.seal), trap=trap)
    collapse = {t: read_calibration(p)
                for t, p in parse_pairs(args.collapse_task, "--collapse-task").items()}
    out = train_locks(args.model, data, selection, config, args.out, collapse_data=collapse)
    print(f"wrote lock-aware model to {out}; lock it with: vllm-guard lock --model {out} "
          f"--selection {out / 'lock_selection.json'} --key TASK=KEYFILE ... --signing-key FILE "
          "--out DIR")
    return 0


def _seal_capability(args: argparse.Namespace, data: dict) -> int:
    from vllm_guard.secneuron.capability import SealConfig, seal_capability

    task = args.seal_capability
    if task not in data:
        raise GuardError(f"--seal-capability {task}: give its examples with --task {task}=FILE")
    clash = [f"--{f.replace('_', '-')}" for f in ("selection", "block", "seal", "trap")
             if getattr(args, f)]
    if clash:
        raise GuardError(f"--seal-capability cannot be combined with {', '.join(clash)}")
    given = {"heads": args.capability_heads, "neurons": args.capability_neurons,
             "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
             "seed": args.seed}
    config = SealConfig(**{k: v for k, v in given.items() if v is not None})
    out = seal_capability(args.model, task, data[task],
                          {t: rows for t, rows in data.items() if t != task}, config, args.out)
    print(f"wrote {out} with {task!r} sealed in heads and neurons of its own; lock it with: "
          f"vllm-guard lock --model {out} --selection {out / 'lock_selection.json'} "
          "--key TASK=KEYFILE ... --signing-key FILE --out DIR")
    return 0
