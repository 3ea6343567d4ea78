"""The serving side imports without llm-compressor (vLLM's environment has none)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Hide llm-compressor: find_spec says "not installed" and any import of it fails loudly.
_HIDE_LLMCOMPRESSOR = """
import importlib.util, sys
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: (
    None if name.split(".")[0] == "llmcompressor" else _find_spec(name, *a)
)
sys.modules["llmcompressor"] = None
"""


def _run(body: str) -> subprocess.CompletedProcess:
    code = _HIDE_LLMCOMPRESSOR + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_serving_modules_import_without_llmcompressor() -> None:
    proc = _run(
        """
        import pifa_modifier, pifa_modifier.vllm
        from pifa_modifier.checkpoint.metadata import parse_pifa_config
        from pifa_modifier.vllm.layout import fused_pifa_forward
        assert "llmcompressor" not in {m.split(".")[0] for m in sys.modules if sys.modules[m]}
        pifa_modifier.vllm.register()
        print("ok", pifa_modifier.PIFALinear.__name__)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "ok PIFALinear" in proc.stdout


def test_pifamodifier_without_llmcompressor_says_why() -> None:
    proc = _run(
        """
        import pifa_modifier
        try:
            pifa_modifier.PIFAModifier
        except ImportError as err:
            print("ImportError:", err)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "PIFAModifier needs llm-compressor" in proc.stdout
    assert "pip install pifa-modifier" in proc.stdout


def test_checkpoint_entry_points_resolve_lazily() -> None:
    from pifa_modifier.checkpoint import attach_pifa_save, export_dense, install

    assert callable(attach_pifa_save) and callable(export_dense) and callable(install)
