"""setup/download_datasets.py against a local HTTP server.

The server serves the copies of the published prompt files kept in the shared
folder next to the repository (never copied into the repository itself), or a
temporary folder built from them for the corruption cases.
"""

import functools
import hashlib
import importlib.util
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "setup" / "download_datasets.py"
SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"

pytestmark = pytest.mark.skipif(
    not SHARED_DATASETS.is_dir(), reason=f"no local copy of the published prompt sets at {SHARED_DATASETS}"
)


def load_module():
    spec = importlib.util.spec_from_file_location("download_datasets", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dl = load_module()


class Server:
    """A quiet threaded HTTP server for one folder that counts GET requests."""

    def __init__(self, root):
        self.requests = []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(root):
        servers.append(Server(root))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def run(server, dest, *args):
    return dl.main(["--base_url", server.url, "--dest", str(dest), "--retries", "0", "--timeout", "10", *args])


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_pinned_checksums_match_the_local_copies():
    for dataset, splits in dl.DATASETS.items():
        for file_name, expected in splits.values():
            copy = SHARED_DATASETS / dataset / file_name
            if expected is not None and copy.exists():
                assert sha256(copy) == expected, copy


def test_known_files_download_and_verify(serve, tmp_path, capsys):
    server = serve(SHARED_DATASETS)
    dest = tmp_path / "dataset"
    assert run(server, dest, "--only", "pickscore") == 0
    assert run(server, dest, "--only", "geneval,ocr", "--splits", "test") == 0
    for dataset, file_name in [
        ("pickscore", "train.txt"),
        ("pickscore", "test.txt"),
        ("geneval", "test_metadata.jsonl"),
        ("ocr", "test.txt"),
    ]:
        got = dest / dataset / file_name
        assert got.read_bytes() == (SHARED_DATASETS / dataset / file_name).read_bytes()
    # Only the final files are left behind: no temporary files.
    assert sorted(p.name for p in dest.rglob("*") if p.is_file()) == sorted(
        ["train.txt", "test.txt", "test_metadata.jsonl", "test.txt"]
    )
    assert "UNVERIFIED" not in capsys.readouterr().err


def test_rerun_is_a_no_op(serve, tmp_path, capsys):
    server = serve(SHARED_DATASETS)
    dest = tmp_path / "dataset"
    assert run(server, dest, "--only", "pickscore,ocr", "--splits", "test") == 0
    files = sorted(dest.rglob("*.txt"))
    before = {p: p.stat().st_mtime_ns for p in files}
    server.requests.clear()
    capsys.readouterr()

    assert run(server, dest, "--only", "pickscore,ocr", "--splits", "test") == 0
    assert server.requests == []
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert "up to date" in capsys.readouterr().out

    assert run(server, dest, "--only", "pickscore", "--splits", "test", "--force") == 0
    assert server.requests == ["/pickscore/test.txt"]


def test_corrupted_download_is_rejected(serve, tmp_path, capsys):
    mirror = tmp_path / "mirror"
    (mirror / "pickscore").mkdir(parents=True)
    text = (SHARED_DATASETS / "pickscore" / "test.txt").read_text(encoding="utf-8")
    (mirror / "pickscore" / "test.txt").write_text(text.replace("a", "b", 1), encoding="utf-8")
    server = serve(mirror)
    dest = tmp_path / "dataset"

    assert run(server, dest, "--only", "pickscore", "--splits", "test") == 1
    assert "checksum mismatch" in capsys.readouterr().err
    # Nothing half-written is left where the trainer would read it.
    assert not (dest / "pickscore" / "test.txt").exists()
    assert list((dest / "pickscore").iterdir()) == []


def test_corrupted_local_copy_is_replaced(serve, tmp_path):
    server = serve(SHARED_DATASETS)
    dest = tmp_path / "dataset"
    local = dest / "ocr" / "test.txt"
    local.parent.mkdir(parents=True)
    local.write_text("not the published file\n")
    assert run(server, dest, "--only", "ocr", "--splits", "test") == 0
    assert sha256(local) == dl.DATASETS["ocr"]["test"][1]


def test_missing_file_fails_clearly(serve, tmp_path, capsys):
    server = serve(tmp_path / "empty_mirror")
    (tmp_path / "empty_mirror").mkdir()
    assert run(server, tmp_path / "dataset", "--only", "ocr", "--splits", "test") == 1
    err = capsys.readouterr().err
    assert "HTTP 404" in err and "/ocr/test.txt" in err


def test_unpinned_file_is_accepted_with_warning(serve, tmp_path, capsys):
    assert dl.DATASETS["ocr"]["train"][1] is None
    mirror = tmp_path / "mirror"
    (mirror / "ocr").mkdir(parents=True)
    (mirror / "ocr" / "train.txt").write_text('A sign that says "hello"\n')
    server = serve(mirror)
    dest = tmp_path / "dataset"
    assert run(server, dest, "--only", "ocr", "--splits", "train") == 0
    err = capsys.readouterr().err
    assert "UNVERIFIED" in err and sha256(mirror / "ocr" / "train.txt") in err
    assert (dest / "ocr" / "train.txt").exists()


def test_html_page_is_rejected(serve, tmp_path, capsys):
    mirror = tmp_path / "mirror"
    (mirror / "geneval").mkdir(parents=True)
    (mirror / "geneval" / "train_metadata.jsonl").write_text("<!DOCTYPE html><html>rate limited</html>\n")
    server = serve(mirror)
    dest = tmp_path / "dataset"
    assert run(server, dest, "--only", "geneval", "--splits", "train") == 1
    assert "HTML" in capsys.readouterr().err
    assert not (dest / "geneval" / "train_metadata.jsonl").exists()


def test_unknown_dataset_is_an_argument_error(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--only", "geneval,coco", "--dest", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "coco" in result.stderr and "pickscore" in result.stderr


def test_command_line_run(serve, tmp_path):
    server = serve(SHARED_DATASETS)
    dest = tmp_path / "dataset"
    cmd = [sys.executable, str(SCRIPT), "--base_url", server.url, "--dest", str(dest), "--only", "geneval"]
    result = subprocess.run([*cmd, "--splits", "test"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (dest / "geneval" / "test_metadata.jsonl").exists()
    # The train split has no copy on this mirror: a non-zero exit, named in the error.
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "geneval/train" in result.stderr


def test_shared_copies_not_in_repo():
    """The published files must be fetched, never committed."""
    tracked = subprocess.run(
        ["git", "ls-files", "dataset/geneval", "dataset/ocr", "dataset/pickscore"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    assert tracked.stdout.strip() == ""
