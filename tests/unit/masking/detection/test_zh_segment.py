"""The Chinese segmenter: loaded once per process and never at import, offsets that index the
text, names no dictionary holds kept as one word."""

from __future__ import annotations

import subprocess
import sys

from vllm_guard.masking.detection.zh_segment import segmenter


def test_not_loaded_at_import_and_once_per_process():
    code = ("import sys, vllm_guard.masking.detection.zh_segment as z, vllm_guard.cli.scrub\n"
            "assert 'jieba' not in sys.modules, 'jieba imported at import time'\n"
            "a = z.segmenter(); b = z.segmenter(); assert a is b\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Building prefix dict" not in out.stderr  # jieba's own log stays quiet


def test_tokens_index_the_text():
    seg = segmenter()
    text = "Mixed 文本：黄蕾和马超下周出差。"
    tokens = seg.tokens(text)
    assert all(text[t.start:t.end] == t.word for t in tokens)
    words = {t.word: t.known for t in tokens}
    assert words["黄蕾"] is False and words["和"] is True  # an unknown word: a name, here


def test_prefix_cache_is_private(tmp_path, monkeypatch):
    """jieba's default cache is /tmp/jieba.cache, which anyone may plant: ours is the
    user's own directory, and one others may write is not used."""
    from vllm_guard.masking.detection.zh_segment import _private_cache_dir

    monkeypatch.setenv("VLLM_GUARD_CACHE", str(tmp_path / "cache"))
    path = _private_cache_dir()
    assert path == tmp_path / "cache" / "jieba" and path.stat().st_mode & 0o777 == 0o700
    assert segmenter().tokenizer.tmp_dir != "/tmp"
    path.chmod(0o777)  # group/world-writable: not trusted
    other = _private_cache_dir()
    assert other != path and other.stat().st_mode & 0o777 == 0o700
