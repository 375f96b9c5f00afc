"""Every vLLM internal vllm-guard hooks, pinned by reading vLLM's source (no vLLM import).

The runner hook, the masked ``SiluAndMul``, the ``secneuron`` loader, the grant's path
through ``vllm_xargs`` and the masking field tables all rest on vLLM internals that change
between releases (``vllm_guard/compat.py``). These tests read them with ``ast`` from the
installed vLLM, so an upgrade that moves one fails here, in a second, rather than in a
server test or in production.

``VLLM_GUARD_VLLM_SOURCE=/path/to/unpacked/wheel/vllm`` points them at another vLLM's source
(a downloaded wheel, unzipped, never installed): how ``docs/vllm-0.33.md`` checked 0.33.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from functools import cache
from pathlib import Path

import pytest

from vllm_guard.compat import check_vllm_version, vllm_version_in
from vllm_guard.errors import GuardError
from vllm_guard.masking import fields
from vllm_guard.runtime import GRANT_XARG

SOURCE_ENV = "VLLM_GUARD_VLLM_SOURCE"
REQUEST_MODELS = {  # route -> (module file, class) of vLLM's request model
    fields.COMPLETIONS: ("entrypoints/openai/completion/protocol.py", "CompletionRequest"),
    fields.CHAT: ("entrypoints/openai/chat_completion/protocol.py", "ChatCompletionRequest"),
    fields.RESPONSES: ("entrypoints/openai/responses/protocol.py", "ResponsesRequest"),
}


@cache
def vllm_root() -> Path:
    """The vLLM package directory under test: ``$VLLM_GUARD_VLLM_SOURCE`` or the installed one."""
    given = os.environ.get(SOURCE_ENV)
    if given:
        root = Path(given)
    else:
        spec = importlib.util.find_spec("vllm")
        if spec is None or spec.origin is None:
            pytest.skip("vLLM is not installed")
        root = Path(spec.origin).parent
    assert (root / "_version.py").is_file(), f"{root} is not a vLLM package directory"
    return root


def under_source_env() -> bool:
    return bool(os.environ.get(SOURCE_ENV))


@cache
def tree(rel: str) -> ast.Module:
    path = vllm_root() / rel
    assert path.is_file(), f"vLLM has no {rel} (moved or removed)"
    return ast.parse(path.read_text(), str(path))


def top(rel: str, name: str) -> ast.AST:
    for node in tree(rel).body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef) and node.name == name:
            return node
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return node
    raise AssertionError(f"vLLM's {rel} no longer defines {name}")


def method(cls: ast.ClassDef, name: str) -> ast.FunctionDef:
    for node in cls.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            return node
    raise AssertionError(f"vLLM's {cls.name} no longer has {name}()")


def params(fn: ast.FunctionDef) -> list[str]:
    a = fn.args
    return [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]


def statements(fn: ast.AST) -> set[str]:
    """Every statement and call inside ``fn``, as ``ast.unparse`` writes it (layout-free)."""
    return {ast.unparse(n) for n in ast.walk(fn) if isinstance(n, ast.stmt | ast.Call)}


def annotated(cls: ast.ClassDef) -> dict[str, str]:
    return {n.target.id: ast.unparse(n.annotation) for n in cls.body
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


# --- the runner hook (vllm_guard/runtime/runner_hook.py) -------------------------------------

RUNNER = "v1/worker/gpu_model_runner.py"


def test_runner_prepare_inputs_has_the_signature_the_hook_wraps():
    cls = top(RUNNER, "GPUModelRunner")
    assert params(method(cls, "_prepare_inputs")) == ["self", "scheduler_output",
                                                      "num_scheduled_tokens"]


def test_runner_prepares_inputs_with_token_counts_in_input_batch_order():
    """The hook pairs ``num_scheduled_tokens[i]`` with ``input_batch.req_ids[i]``."""
    body = statements(method(top(RUNNER, "GPUModelRunner"), "execute_model"))
    for stmt in ("req_ids = self.input_batch.req_ids",
                 "tokens = [scheduler_output.num_scheduled_tokens[i] for i in req_ids]",
                 "num_scheduled_tokens_np = np.array(tokens, dtype=np.int32)",
                 "self._prepare_inputs(scheduler_output, num_scheduled_tokens_np)"):
        assert stmt in body, f"GPUModelRunner.execute_model no longer runs {stmt!r}"


def test_runner_state_the_hook_reads():
    init = statements(method(top(RUNNER, "GPUModelRunner"), "__init__"))
    assert "self.requests: dict[str, CachedRequestState] = {}" in init
    batch = "v1/worker/gpu_input_batch.py"
    assert "sampling_params" in annotated(top(batch, "CachedRequestState"))
    req_ids = method(top(batch, "InputBatch"), "req_ids")
    assert any(ast.unparse(d) == "property" for d in req_ids.decorator_list)
    assert "extra_args" in annotated(top("sampling_params.py", "SamplingParams"))


def test_cpu_runner_inherits_the_hooked_prepare_inputs():
    cls = top("v1/worker/cpu_model_runner.py", "CPUModelRunner")
    assert [ast.unparse(b) for b in cls.bases] == ["GPUModelRunner"]
    assert all(getattr(n, "name", None) != "_prepare_inputs" for n in cls.body)


def test_v1_runner_can_still_be_chosen():
    """``vllm-guard serve`` sets ``VLLM_USE_V2_MODEL_RUNNER=0``: the hook is V1's."""
    envs = tree("envs.py")
    assert "VLLM_USE_V2_MODEL_RUNNER" in {k.value for n in ast.walk(envs)
                                         if isinstance(n, ast.Dict) for k in n.keys
                                         if isinstance(k, ast.Constant)}
    use_v2 = statements(method(top("config/vllm.py", "VllmConfig"), "use_v2_model_runner"))
    assert "use_v2_model_runner = envs.VLLM_USE_V2_MODEL_RUNNER" in use_v2


def test_config_fields_the_grant_refusals_read():
    """``refuse_configs_that_bypass_grants`` reads these vLLM config fields by name."""
    cfg = top("config/vllm.py", "VllmConfig")
    assert {"speculative_config", "kv_transfer_config", "ec_transfer_config",
            "kv_events_config", "model_config", "parallel_config", "lora_config"} <= set(
        annotated(cfg))
    assert method(cfg, "use_v2_model_runner")
    for rel, name, field in (("config/speculative.py", "SpeculativeConfig", "method"),
                             ("config/speculative.py", "SpeculativeConfig",
                              "suffix_decoding_max_cached_requests"),
                             ("config/kv_transfer.py", "KVTransferConfig", "kv_connector"),
                             ("config/kv_events.py", "KVEventsConfig", "enable_kv_cache_events"),
                             ("config/model.py", "ModelConfig", "enable_sleep_mode")):
        assert field in annotated(top(rel, name)), f"vLLM's {name} has no {field}"
    assert method(top("config/parallel.py", "ParallelConfig"), "use_ubatching")


@pytest.mark.parametrize("route", fields.ROUTES)
def test_grant_reaches_the_runner_through_vllm_xargs(route):
    """The grant middleware sets ``vllm_xargs[GRANT_XARG]``; the hook reads ``extra_args``."""
    rel, name = REQUEST_MODELS[route]
    cls = top(rel, name)
    assert "vllm_xargs" in annotated(cls)
    assert ("extra_args: dict[str, Any] = self.vllm_xargs if self.vllm_xargs else {}"
            in statements(method(cls, "to_sampling_params"))), GRANT_XARG


# --- the masked activation (vllm_guard/kernels/layer.py, masked_silu.py) ----------------------


def test_silu_and_mul_is_an_out_of_tree_replaceable_custom_op():
    cls = top("model_executor/layers/activation.py", "SiluAndMul")
    assert [ast.unparse(b) for b in cls.bases] == ["CustomOp"]
    native = method(cls, "forward_native")
    assert params(native) == ["x"], "forward_native is no longer a staticmethod of x"
    custom_op = top("model_executor/custom_op.py", "CustomOp")
    oot = statements(method(custom_op, "register_oot"))  # keyed by the replaced class's name
    assert {"reg_name = name if name is not None else cls.__name__",
            "op_registry_oot[reg_name] = op_cls"} <= oot
    new = statements(method(custom_op, "__new__"))
    assert "op_cls_to_instantiate = op_registry_oot[op_name]" in new


def test_custom_op_registration_and_config_lookup():
    fn = top("utils/torch_utils.py", "direct_register_custom_op")
    assert params(fn)[:4] == ["op_name", "op_func", "mutates_args", "fake_impl"]
    assert isinstance(top("config/vllm.py", "get_current_vllm_config_or_none"), ast.FunctionDef)
    sched = annotated(top("config/scheduler.py", "SchedulerConfig"))
    assert {"max_num_batched_tokens", "max_num_seqs"} <= set(sched)


# --- the loader (vllm_guard/loader/secneuron_loader.py) --------------------------------------


def test_model_loader_api_the_secneuron_loader_implements():
    base = top("model_executor/model_loader/base_loader.py", "BaseModelLoader")
    abstract = {n.name: params(n) for n in base.body if isinstance(n, ast.FunctionDef)
                and any(ast.unparse(d) == "abstractmethod" for d in n.decorator_list)}
    assert abstract == {"download_model": ["self", "model_config"],
                        "load_weights": ["self", "model", "model_config"]}
    assert params(method(base, "__init__")) == ["self", "load_config"]
    assert params(top("model_executor/model_loader/__init__.py", "register_model_loader")) == [
        "load_format"]
    assert "model_loader_extra_config" in annotated(top("config/load.py", "LoadConfig"))
    assert {"get_tensor_model_parallel_rank", "get_tensor_model_parallel_world_size"} <= {
        n.name for n in tree("distributed/parallel_state.py").body
        if isinstance(n, ast.FunctionDef)}


# --- the server entry point and middlewares (vllm_guard/cli/serve.py) ------------------------


def test_server_module_and_middleware_option():
    from vllm_guard.cli.serve import SERVER_MODULE

    rel = SERVER_MODULE.removeprefix("vllm.").replace(".", "/") + ".py"
    assert "__name__ == '__main__'" in {ast.unparse(n.test) for n in tree(rel).body
                                        if isinstance(n, ast.If)}
    register = "entrypoints/serve/middleware/register.py"
    assert any("for middleware in args.middleware" in s for s in statements(tree(register)))


# --- the masking field tables (vllm_guard/masking/fields.py) ---------------------------------


def _class_anywhere(rel: str, name: str, depth: int = 0) -> tuple[str, ast.ClassDef] | None:
    """``name`` as module ``rel`` sees it: defined there or imported from inside vLLM."""
    for node in tree(rel).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return rel, node
    if depth > 6:
        return None
    for node in ast.walk(tree(rel)):
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name
                                                    for a in node.names):
            mod = node.module or ""
            if node.level:
                base = Path(rel).parents[node.level - 1]
                target = base.joinpath(*mod.split(".")) if mod else base
            elif mod.startswith("vllm."):
                target = Path(*mod.split(".")[1:])
            else:
                return None  # pydantic, openai: not a vLLM request model
            for cand in (f"{target}.py", f"{target}/__init__.py"):
                if (vllm_root() / cand).is_file():
                    return _class_anywhere(cand, name, depth + 1)
    return None


def model_fields(rel: str, name: str) -> set[str]:
    """A pydantic model's field names from source: annotated class attributes of the class
    and of its vLLM bases, without ``ClassVar``s and private names."""
    found = _class_anywhere(rel, name)
    if found is None:
        return set()
    where, cls = found
    out: set[str] = set()
    for b in cls.bases:
        if isinstance(b, ast.Name):
            out |= model_fields(where, b.id)
    return out | {k for k, ann in annotated(cls).items()
                  if not k.startswith("_") and "ClassVar" not in ann}


@pytest.mark.parametrize("route", fields.ROUTES)
def test_every_request_field_is_masked_checked_or_refused(route):
    """A field vLLM adds is refused as unknown at run time (fail closed); this makes the
    upgrade fail here instead, until the field is put in one of the tables."""
    known = (set(fields.TEXT[route]) | set(fields.REFUSED) | set(fields.SCALARS)
             | set(fields.CONTROLS))
    vllm = model_fields(*REQUEST_MODELS[route])
    assert len(vllm) > 20, f"{route}: request model not found in vLLM's source"
    assert not sorted(vllm - known), f"{route}: fields not in our tables: {sorted(vllm - known)}"


@pytest.mark.skipif(under_source_env(), reason="compares with the installed vLLM")
@pytest.mark.parametrize("route", fields.ROUTES)
def test_source_reading_finds_the_fields_pydantic_finds(route):
    from tests.unit.masking.test_fields import vllm_models

    assert model_fields(*REQUEST_MODELS[route]) == set(vllm_models()[route].model_fields)


# --- the version gate (vllm_guard/compat.py) -------------------------------------------------


def test_version_gate_matches_the_source_under_test():
    version = vllm_version_in(vllm_root())
    assert version != "unknown", "no version in _version.py"
    if under_source_env():  # another vLLM: say whether the gate lets it through
        try:
            check_vllm_version(version)
        except GuardError:
            pytest.xfail(f"vLLM {version} is outside the tested range (compat.TESTED_VLLM)")
    else:
        check_vllm_version(version)  # the installed vLLM is a tested one
