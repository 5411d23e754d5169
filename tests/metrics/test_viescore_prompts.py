"""VIEScore on the release's own prompt files (``prompts_path``) and the release's judge preset,
against a local stub of the chat-completions endpoint.

The prompt folder is written here with the release's file names and layout
(``viescore/prompts_raw/context_no_delimit.txt``, ``prompts_0shot/{two_image_edit_rule,
tie_rule_SC,rule_PQ}.txt``) and made-up texts; the expected prompts are composed as the
release's ``VIEScore(task="tie")`` does: ``"\\n".join`` of context, rule and SC rule, with
``<instruction>`` replaced by the instruction.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from PIL import Image

from metrics.judge.metric import VIEScore
from metrics.judge.prompts import PROMPT_SHA256

KEY_ENV = "EDITBENCH_TEST_VIESCORE_PROMPTS_KEY"
FILES = {
    "context_no_delimit.txt": 'You judge images.\nAnswer {"score": [...], "reasoning": "..."}',
    "prompts_0shot/two_image_edit_rule.txt": "RULES:\n\nTwo images: an original and its edit.\n",
    "prompts_0shot/tie_rule_SC.txt": "\nScore the edit.\n\nEditing instruction: <instruction>\n",
    "prompts_0shot/rule_PQ.txt": "RULES:\n\nScore naturalness and artifacts.\n",
}


def write_prompts(repo: Path) -> Path:
    """The fixture folder in the release's layout; returns the repository root."""
    for name, text in FILES.items():
        path = repo / "viescore" / "prompts_raw" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return repo


@pytest.fixture
def endpoint():
    """A chat-completions stub: records every request body, answers scores [7, 8]."""
    bodies: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            answer = json.dumps({"score": [7, 8], "reasoning": "ok"})
            payload = json.dumps({"choices": [{"message": {"content": answer}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", bodies
    server.shutdown()
    server.server_close()


def images(n: int, size=(40, 56)) -> torch.Tensor:
    return torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(n)) * 2 - 1


def test_release_prompts_and_preset_reach_the_judge(tmp_path, endpoint, monkeypatch):
    url, bodies = endpoint
    monkeypatch.setenv(KEY_ENV, "k")
    repo = write_prompts(tmp_path / "VIEScore")
    metric = VIEScore(
        preset="viescore-release",
        prompts_path=str(repo),
        base_url=url,
        api_key_env=KEY_ENV,
        cache_dir=str(tmp_path / "cache"),
        num_threads=1,
    )
    metric.update(images(2), images(2), ["make it blue", " add a hat "])
    out = metric.compute()
    assert out["SC"].item() == 7 and out["PQ"].item() == 7 and out["failures"].item() == 0

    context = FILES["context_no_delimit.txt"]
    sc_template = "\n".join(
        [
            context,
            FILES["prompts_0shot/two_image_edit_rule.txt"],
            FILES["prompts_0shot/tie_rule_SC.txt"],
        ]
    )
    pq_prompt = "\n".join([context, FILES["prompts_0shot/rule_PQ.txt"]])
    texts = []
    for body in bodies:
        # the release's GPT-4o client: dated snapshot, max_tokens 1400, no temperature
        assert body["model"] == "gpt-4o-2024-05-13"
        assert body["max_tokens"] == 1400 and "temperature" not in body
        parts = body["messages"][0]["content"]
        assert parts[0]["type"] == "text"  # text first, then the images
        texts.append(parts[0]["text"])
        for part in parts[1:]:
            prefix = "data:image/jpeg;base64,"
            assert part["image_url"]["url"].startswith(prefix)
            image = Image.open(
                io.BytesIO(base64.b64decode(part["image_url"]["url"][len(prefix) :]))
            )
            assert image.format == "JPEG" and image.size == (56, 40)  # native size, not shrunk
    expected = [
        sc_template.replace("<instruction>", "make it blue"),
        pq_prompt,
        sc_template.replace("<instruction>", " add a hat "),  # inserted as given
        pq_prompt,
    ]
    assert sorted(texts) == sorted(expected)

    record = metric.provenance()
    assert (
        record["prompt_set"] == "viescore-release-0shot" and record["preset"] == "viescore-release"
    )
    assert record["prompts_path"] == str((repo / "viescore" / "prompts_raw").resolve())
    root = repo / "viescore" / "prompts_raw"
    assert record["prompt_files"] == {
        name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in FILES
    }
    assert record["prompt_sha256"] != PROMPT_SHA256 and record["image_format"] == "jpeg"
    cached = [json.loads(p.read_text()) for p in (tmp_path / "cache").rglob("*.json")]
    assert len(cached) == 4 and {c["prompt_set"] for c in cached} == {"viescore-release-0shot"}

    # the files are read at run time: another wording is another hash
    (root / "prompts_0shot" / "rule_PQ.txt").write_text("RULES:\n\nOther words.\n")
    other = VIEScore(prompts_path=str(root), base_url=url, api_key_env=KEY_ENV)
    assert other.provenance()["prompt_sha256"] != record["prompt_sha256"]


def test_builtin_prompts_keep_their_own_name(tmp_path, endpoint, monkeypatch):
    url, _ = endpoint
    monkeypatch.setenv(KEY_ENV, "k")
    metric = VIEScore(base_url=url, api_key_env=KEY_ENV, cache_dir=str(tmp_path / "c"))
    record = metric.provenance()
    assert record["prompt_set"] == "editbench-builtin" and record["prompt_sha256"] == PROMPT_SHA256
    assert "prompts_path" not in record and record["preset"] is None
    metric.update(images(1), images(1), ["make it red"])
    cached = [json.loads(p.read_text()) for p in (tmp_path / "c").rglob("*.json")]
    assert {c["prompt_set"] for c in cached} == {"editbench-builtin"}


def test_missing_prompt_file_and_preset_conflicts_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "k")
    repo = write_prompts(tmp_path / "VIEScore")
    (repo / "viescore" / "prompts_raw" / "prompts_0shot" / "tie_rule_SC.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"prompts_0shot/tie_rule_SC\.txt"):
        VIEScore(prompts_path=str(repo), api_key_env=KEY_ENV, base_url="http://localhost:1/v1")
    with pytest.raises(ValueError, match=r"preset 'viescore-release' sets max_new_tokens=1400"):
        VIEScore(preset="viescore-release", max_new_tokens=300, base_url="http://localhost:1/v1")
    with pytest.raises(ValueError, match="unknown preset 'gpt5'"):
        VIEScore(preset="gpt5", base_url="http://localhost:1/v1")
