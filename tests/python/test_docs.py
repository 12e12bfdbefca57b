"""Every Python snippet in README.md and docs/*.md runs as written: a document's ```python
blocks (indented ones under list items too) run in order in one fresh interpreter, as a reader
pastes them one after another, in a directory holding what they name: `train.yaml` over a
packed dataset with a `data` and a `label` field, and a single-rank torchrun environment
(MASTER_ADDR, RANK, ..., SLUICE_TOKEN). A block may follow an HTML comment `<!-- doctest: CODE
-->` whose CODE runs first, for the values a reader fills in (an address, a list of shards);
nothing else is added, and no block is skipped."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import sluice

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:^<!-- doctest: (?P<setup>.*?) -->\n)?^(?P<indent>[ \t]*)```python\n"
                   r"(?P<body>.*?)^(?P=indent)```$", re.M | re.S)


def blocks(doc: Path) -> list[tuple[int, str]]:
    text = doc.read_text()
    out = []
    for m in BLOCK.finditer(text):
        line = text.count("\n", 0, m.start("body")) + 1
        code = textwrap.dedent(m["body"])
        if m["setup"]:
            code = m["setup"] + "\n" + code
        out.append((line, code))
    return out


def test_the_documents_have_python_blocks() -> None:
    # The extraction itself can break: a pattern that matched nothing would pass every doc.
    found = {doc.name: len(blocks(doc)) for doc in DOCS}
    assert found["README.md"] >= 2 and found["python.md"] >= 3 and found["cluster.md"] >= 1, found


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("docs")
    fields = {"data": ("uint8", [-1]), "label": ("int64", [])}
    with sluice.DatasetWriter(str(d / "data"), fields, shard_bytes=64 << 10) as w:
        for i in range(2048):
            w.add({"data": bytes([i % 251]) * (16 + i % 64), "label": i % 10})
    # The README's config keys, pointed at that dataset.
    (d / "train.yaml").write_text("dataset: {path: data}\nbatch_size: 256\nseed: 1\n"
                                  "shuffle: {mode: global}\ndrop_last: true\n")
    return d


@pytest.mark.parametrize("doc", [d for d in DOCS if blocks(d)], ids=lambda d: d.name)
def test_every_python_block_runs_as_written(doc: Path, workdir: Path) -> None:
    pytest.importorskip("torch")
    program = []
    for line, code in blocks(doc):
        program.append(f"__block__ = {line}\n")  # a failure names the block's first line
        program.append(code)
    runner = textwrap.dedent("""
        import sys, traceback
        source = open(sys.argv[1]).read()
        scope = {"__name__": "__main__"}
        try:
            exec(compile(source, sys.argv[2], "exec"), scope)
        except BaseException:
            traceback.print_exc()
            sys.exit(f"{sys.argv[2]}: the python block at line {scope.get('__block__')} failed")
    """)
    script = workdir / f"{doc.stem}.snippets.py"
    script.write_text("".join(program))
    with socket.socket() as sock:  # a free port for torch.distributed's store
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
               WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               SLUICE_TOKEN="doc-test-token-0123456789abcdef")
    r = subprocess.run([sys.executable, "-c", runner, str(script), doc.name], cwd=workdir,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
