"""Chat (issue 14): :meth:`MoEModel.chat` keeps the KV cache across turns (each turn passes only its new
tokens through the model, and gives what one generate() over the whole conversation gives), ``/reset``, the
stop at the model's context, chat templates, ``edgemoe-run -i`` / ``edgemoe-chat`` on stdin, and the live
tokens/s in the terminal title."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.export  # the session bundle is exported with torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tiny_bundle: Path) -> Iterator[object]:
    from edgemoe_ort.runtime import load_model

    with load_model(tiny_bundle) as m:
        yield m


def _counting(model: object, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the number of tokens of every pass through ``model.forward``."""
    seen: list[int] = []
    forward = model.forward

    def counted(input_ids: np.ndarray, past: object = None) -> object:
        seen.append(int(np.asarray(input_ids).shape[1]))
        return forward(input_ids, past)

    monkeypatch.setattr(model, "forward", counted)
    return seen


def test_turns_keep_the_kv_cache(model: object, monkeypatch: pytest.MonkeyPatch) -> None:
    chat = model.chat()
    assert chat.template is None  # the default model is a code model without a chat template
    first = "".join(chat.send("def fib(n):", max_new_tokens=6))
    r1 = chat.last_result
    assert first == r1.text and r1.stop_reason == "max_new_tokens" and len(r1.tokens) == 6
    assert chat.pending == r1.tokens[-1:]  # sampled, not yet fed
    before = [*chat.tokens, *chat.pending]
    seen = _counting(model, monkeypatch)
    new = model.encode("    return")
    "".join(chat.send("    return", max_new_tokens=6))
    r2 = chat.last_result
    # only the new tokens went through the model: the pending one + the turn, then one per decode step
    assert seen == [1 + len(new)] + [1] * (len(r2.tokens) - 1)
    assert r2.stats.prompt_tokens == 1 + len(new)
    monkeypatch.undo()
    # the same as one generate() over the conversation's token ids
    whole = model.generate([*before, *new], max_new_tokens=6)
    assert whole.tokens == r2.tokens and whole.text == r2.text
    assert chat.tokens == [*before, *new, *r2.tokens[:-1]] and chat.pending == r2.tokens[-1:]


def test_turn_logits_equal_a_full_pass(model: object, monkeypatch: pytest.MonkeyPatch) -> None:
    chat = model.chat()
    "".join(chat.send("import os", max_new_tokens=4))
    conversation = [*chat.tokens, *chat.pending, *model.encode("\nimport sys")]
    got: list[np.ndarray] = []
    forward = model.forward

    def keep(input_ids: np.ndarray, past: object = None) -> object:
        logits, present = forward(input_ids, past)
        got.append(logits[0, -1])
        return logits, present

    monkeypatch.setattr(model, "forward", keep)
    "".join(chat.send("\nimport sys", max_new_tokens=1))
    monkeypatch.undo()
    full = model.logits(conversation)[-1]
    np.testing.assert_allclose(got[0], full, rtol=1e-3, atol=1e-3)


def test_reset_starts_over(model: object) -> None:
    chat = model.chat()
    a = "".join(chat.send("def fib(n):", max_new_tokens=5))
    "".join(chat.send("x = 1", max_new_tokens=5))
    chat.reset()
    assert chat.tokens == [] and chat.pending == [] and chat.messages == []
    b = "".join(chat.send("def fib(n):", max_new_tokens=5))
    assert a == b and chat.last_result.stats.prompt_tokens == len(model.encode("def fib(n):"))


def test_stops_at_the_context(model: object) -> None:
    ctx = model.context_length
    assert ctx == 256
    chat = model.chat()
    list(chat.send([5] * 200, max_new_tokens=3000))
    r = chat.last_result
    assert r.stop_reason == "context" and 200 + len(r.tokens) == ctx and chat.context_tokens == ctx
    kept = list(chat.tokens)
    assert list(chat.send("x", max_new_tokens=8)) == []  # the turn does not fit: nothing runs
    assert chat.last_result.stop_reason == "context" and chat.last_result.tokens == []
    assert chat.tokens == kept
    chat.reset()
    list(chat.send("x", max_new_tokens=2))
    assert chat.last_result.stop_reason in ("max_new_tokens", "eos")


def test_bad_turns_are_one_error(model: object) -> None:
    from edgemoe_ort.runtime.generate import GenerationError

    chat = model.chat()
    with pytest.raises(GenerationError, match="empty"):
        list(chat.send(""))
    with pytest.raises(GenerationError, match="^temperature"):
        list(chat.send("x", temperature=-1))
    assert chat.tokens == [] and chat.last_result is None


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_template_formats_each_turn_incrementally(tiny_bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("jinja2")
    from edgemoe_ort.runtime import load_model

    dst = tmp_path / "templated"
    shutil.copytree(tiny_bundle, dst)
    cfg_path = dst / "tokenizer" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHATML
    cfg_path.write_text(json.dumps(cfg))
    with load_model(dst) as m:
        chat = m.chat()
        assert chat.template is not None
        assert chat.turn_ids("hi") == m.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
        "".join(chat.send("hi", max_new_tokens=3))
        # the second turn: what the template puts after the first reply, not the conversation again
        assert chat.turn_ids("yo") == m.encode("<|im_end|>\n<|im_start|>user\nyo<|im_end|>\n"
                                               "<|im_start|>assistant\n")
        assert m.chat(template=False).template is None


def _run_app(*args: object, input: str) -> object:
    from typer.testing import CliRunner

    from edgemoe_ort.cli import run_app

    return CliRunner().invoke(run_app, [str(a) for a in args], input=input, prog_name="edgemoe-run",
                              env={"COLUMNS": "80"})


def test_cli_interactive_reads_turns_until_eof(tiny_bundle: Path, model: object) -> None:
    res = _run_app(tiny_bundle, "-i", "-n", "6", input="def fib(n):\n/reset\ndef fib(n):\n    return\n")
    assert res.exit_code == 0, res.stderr
    expected = model.chat()
    a = "".join(expected.send("def fib(n):", max_new_tokens=6))
    b = "".join(expected.send("    return", max_new_tokens=6))
    assert res.stdout == f"{a}\n{a}\n{b}\n"
    assert "conversation reset" in res.stderr and "Traceback" not in res.stderr


def test_cli_interactive_quiet_and_bad_flags(tiny_bundle: Path) -> None:
    res = _run_app(tiny_bundle, "--interactive", "-n", "4", "-q", input="import os\n\nnot read\n")
    assert res.exit_code == 0 and res.stderr == "" and res.stdout.count("\n") == 1, res.stderr
    bad = _run_app(tiny_bundle, "-i", "--json", input="")
    assert bad.exit_code == 2 and bad.stderr.startswith("error: --interactive") and "--json" in bad.stderr


def test_cli_interactive_says_when_the_context_is_full(tiny_bundle: Path) -> None:
    long = " ".join(["x"] * 400)
    res = _run_app(tiny_bundle, "-i", "-n", "4", input=f"{long}\n")
    assert res.exit_code == 0, res.stderr
    assert "stopped at the model's context: 256 tokens" in res.stderr and "/reset" in res.stderr


def test_edgemoe_chat_entry_point_in_a_subprocess(tiny_bundle: Path) -> None:
    code = "import sys; from edgemoe_ort.cli import chat_app; sys.argv[0] = 'edgemoe-chat'; chat_app()"
    res = subprocess.run([sys.executable, "-c", code, str(tiny_bundle), "-n", "5"], input="import os\n",
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.endswith("\n") and res.stdout.strip() and "Traceback" not in res.stderr
    assert "5 generated" in res.stderr or "eos" in res.stderr


def test_live_rate_writes_only_the_terminal_title(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgemoe_ort import cli

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    fake = Tty()
    monkeypatch.setattr(sys, "stderr", fake)
    monkeypatch.setenv("TERM", "xterm")
    with cli._LiveRate("edgemoe-run", every_s=0.0) as rate:
        for _ in range(3):
            rate.tick()
    text = fake.getvalue()
    assert text.startswith("\x1b[22;0t") and text.endswith("\x1b[23;0t")
    assert "\x1b]0;edgemoe-run: " in text and " tok/s\x07" in text
    # the title is set by escapes only: nothing printable outside them
    import re

    assert re.sub(r"\x1b\[2[23];0t|\x1b\]0;[^\x07]*\x07", "", text) == ""
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: nothing at all
    with cli._LiveRate("edgemoe-run", every_s=0.0) as rate:
        rate.tick()
        rate.tick()
    assert sys.stderr.getvalue() == ""
