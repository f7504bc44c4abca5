"""The SimpleBooks download path, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import http.server
import threading
import uuid
import zipfile
from pathlib import Path

import pytest
from conftest import CORPUS, TINY, assert_user_error, minigpt


class _Server(http.server.ThreadingHTTPServer):
    def __init__(self, root: Path):
        self.requests: list[str] = []
        root_str = str(root)

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(inner, *args, **kwargs):
                super().__init__(*args, directory=root_str, **kwargs)

            def do_GET(inner):
                self.requests.append(inner.path)
                super().do_GET()

            def log_message(inner, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def server(tmp_path):
    """Serves a zip in SimpleBooks' layout (simplebooks/simplebooks-2-raw/{train,valid}.txt)."""
    root = tmp_path / "www"
    root.mkdir()
    with zipfile.ZipFile(root / "simplebooks.zip", "w") as zf:
        for subset in ("simplebooks-2-raw", "simplebooks-92-raw"):
            for split in ("train", "valid"):
                zf.write(CORPUS / f"{split}.txt", f"simplebooks/{subset}/{split}.txt")
    (root / "broken.zip").write_bytes(b"<html>not a zip</html>")
    srv = _Server(root)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _sets(url: str, cache: Path, *extra: str) -> list[str]:
    args = []
    for s in [f"data.url={url}", f"data.cache_dir={cache}", "data.subset=simplebooks-2-raw", *TINY, *extra]:
        args += ["--set", s]
    return args


def test_download_once_then_cached(server, tmp_path):
    url = f"http://127.0.0.1:{server.server_port}/simplebooks.zip"
    cache = tmp_path / "cache"
    first = minigpt("vocab", "--run-dir", tmp_path / "run", *_sets(url, cache))
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "run" / "vocab.txt").is_file()
    assert server.requests == ["/simplebooks.zip"]
    assert list(cache.rglob("simplebooks-2-raw/train.txt"))
    assert not list(cache.rglob("*.partial"))
    second = minigpt("vocab", "--run-dir", tmp_path / "run2", *_sets(url, cache))
    assert second.returncode == 0, second.stderr
    assert server.requests == ["/simplebooks.zip"], "the archive was downloaded twice"
    assert (tmp_path / "run" / "vocab.txt").read_text() == (tmp_path / "run2" / "vocab.txt").read_text()


def test_failed_download_says_how_to_work_offline(server, tmp_path):
    url = f"http://127.0.0.1:{server.server_port}/missing.zip"
    result = minigpt("vocab", "--run-dir", tmp_path / "run", *_sets(url, tmp_path / "cache"))
    assert_user_error(result, "could not download", "data.train")
    assert not (tmp_path / "run" / "vocab.txt").exists()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()], "partial download left in the cache"


def test_not_a_zip(server, tmp_path):
    url = f"http://127.0.0.1:{server.server_port}/broken.zip"
    result = minigpt("vocab", "--run-dir", tmp_path / "run", *_sets(url, tmp_path / "cache"))
    assert_user_error(result, "did not give a zip archive")


def test_missing_subset(server, tmp_path):
    url = f"http://127.0.0.1:{server.server_port}/simplebooks.zip"
    result = minigpt(
        "vocab", "--run-dir", tmp_path / "run", *_sets(url, tmp_path / "cache", "data.subset=simplebooks-9-raw")
    )
    assert_user_error(result, "simplebooks-9-raw", "data.subset")


@pytest.mark.parametrize("member", ["../evil.txt", "simplebooks/../../evil.txt", "/tmp/minigpt-evil-{}.txt"])
def test_archive_reaching_outside_its_folder_is_refused(server, tmp_path, member):
    """A zip member that would land outside the extraction folder: refused, nothing extracted, cache clean."""
    member = member.format(uuid.uuid4().hex)
    with zipfile.ZipFile(tmp_path / "www" / "evil.zip", "w") as zf:
        for split in ("train", "valid"):
            zf.write(CORPUS / f"{split}.txt", f"simplebooks/simplebooks-2-raw/{split}.txt")
        zf.writestr(zipfile.ZipInfo(member), "gotcha\n")  # a ZipInfo keeps the name as given
    assert member in zipfile.ZipFile(tmp_path / "www" / "evil.zip").namelist()
    url = f"http://127.0.0.1:{server.server_port}/evil.zip"
    cache = tmp_path / "cache"
    try:
        result = minigpt("vocab", "--run-dir", tmp_path / "run", *_sets(url, cache))
        assert_user_error(result, "outside its folder", repr(member), "nothing was extracted")
        assert not Path(member).exists()
    finally:
        if member.startswith("/"):
            Path(member).unlink(missing_ok=True)
    assert server.requests == ["/evil.zip"]
    assert not list(tmp_path.rglob("*evil.txt")), "a member was written outside"
    assert not [p for p in cache.rglob("*") if p.is_file()], "the archive or a partial extraction is left in the cache"
    assert not (tmp_path / "run" / "vocab.txt").exists()
