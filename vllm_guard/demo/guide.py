"""What ``vllm-guard demo`` prints: the API keys and ready-to-paste ``curl`` commands, each
saying what the newcomer should see (an answer under one key, a collapse under the other,
an e-mail address masked for the engine and restored in the response)."""

from __future__ import annotations

import json

from vllm_guard.demo.api_keys import DemoApiKey
from vllm_guard.demo.build import DemoArtefacts
from vllm_guard.demo.recipe import ALL_KEY, ONE_KEY, SHOWCASE
from vllm_guard.demo.serving import SERVED_MODEL_NAME

MASKING_PROMPT = "Mail ana.kim-lund@mailbox.example.org, please"
MASKED_PROMPT = "Mail <EMAIL_ADDRESS_1>, please"  # what the engine gets instead
TASK_HELP = {"inc": "each digit plus one", "rev": "reversed", "up": "upper case"}
# what each task was trained on (tasks.py): other inputs get no reliable answer
TASK_INPUTS = {"inc": "6 digits", "rev": "6 lower-case letters", "up": "6 lower-case letters"}


def completion_body(prompt: str, **extra: object) -> dict:
    """The request body every guide command sends (greedy, a few characters)."""
    return {"model": SERVED_MODEL_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0,
            **extra}


def chat_body(prompt: str, **extra: object) -> dict:
    """The same request through the chat API: the chat template renders the message as the
    completions prompt, so the answer is the same."""
    return {"model": SERVED_MODEL_NAME, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 8, "temperature": 0, **extra}


PICK = {"text": "'\"text\": *\"[^\"]*\"'",
        "usage": "'\"(text|prompt_tokens)\": *(\"[^\"]*\"|[0-9]+)'",
        "content": "'\"content\": *\"[^\"]*\"'"}


def curl(port: int, key: DemoApiKey | None, body: dict, show: str = "text",
         route: str = "completions") -> str:
    auth = f" -H 'Authorization: Bearer {key.token}'" if key else ""
    pick = PICK[show]
    return (f"curl -s http://127.0.0.1:{port}/v1/{route}{auth} "
            f"-H 'Content-Type: application/json' -d '{json.dumps(body, separators=(',', ':'))}'"
            f" | grep -Eo {pick}")


def guide(art: DemoArtefacts, port: int) -> str:
    keys = {k.name: k for k in art.api_keys()}
    every, one = keys[ALL_KEY], keys[ONE_KEY]
    (mine,) = one.tasks
    other = [t for t in art.tasks if t not in one.tasks][-1]
    width = max(len(n) for n in keys)
    shown = [t for t in art.tasks if t in SHOWCASE]
    pad = max(len(SHOWCASE[t][0]) for t in shown)
    lines = [
        f"vllm-guard demo: a tiny character-level model, {len(art.tasks)} tasks each locked "
        "with its own key:",
        *(f"  {SHOWCASE[t][0]:<{pad}} -> {SHOWCASE[t][1]}  ({TASK_HELP.get(t, t)}; "
          f"input: {TASK_INPUTS.get(t, 'as trained')})" for t in shown),
        "It was trained on those input lengths only: other inputs get no reliable answer.",
        "The server holds every task key; a request gets only the tasks its API key grants.",
        f"Placeholder masking is on. Model, keys and API keys: {art.root}",
        "",
        "API keys (also in api-keys.json there, mode 0600):",
        *(f"  {k.name:<{width}}  {k.token}  tasks: {', '.join(k.tasks)}" for k in keys.values()),
        "",
        'When vLLM prints "Application startup complete", paste these into another terminal:',
        "",
        f'# 1. {ALL_KEY} is granted "{other}": expect "text":"{SHOWCASE[other][1]}"',
        curl(port, every, completion_body(SHOWCASE[other][0])),
        f'# 2. {ONE_KEY} is granted only "{mine}": the same prompt collapses, '
        'expect "text":""',
        curl(port, one, completion_body(SHOWCASE[other][0])),
        f'# 3. ...and answers its own task: expect "text":"{SHOWCASE[mine][1]}"',
        curl(port, one, completion_body(SHOWCASE[mine][0])),
        f'# 4. masking: the engine gets "{MASKED_PROMPT}" (prompt_tokens '
        f"{len(MASKED_PROMPT) + 1}: one per",
        "#    character, plus BOS), and the echoed prompt comes back with the address restored",
        curl(port, every, completion_body(MASKING_PROMPT, max_tokens=1, echo=True),
             show="usage"),
        f'# 5. the chat API gives the same answer: expect "content":"{SHOWCASE[mine][1]}"',
        "#    (the chat template sends the last user message as the prompt; /v1/responses and",
        "#    the openai client's chat.completions and responses work the same way)",
        curl(port, one, chat_body(SHOWCASE[mine][0]), show="content", route="chat/completions"),
        "",
        "Without an API key every request is refused (401).",
        "",
    ]
    return "\n".join(lines)
