"""`petl-bench data`: getting VTAB-1K from a stand-in hub cache (offline), a torchvision-style archive from a
local server, verification, the manifest, and the data fingerprints in records and reports."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest
from conftest import ALIASES, TINY_RUN, make_task_folder, png, run_cli, vtab_zip  # noqa: F401 - re-used
from PIL import Image

import petl_bench as pb
from petl_bench import datasets, install, records
from petl_bench.errors import UserError
from petl_bench.tasks.vtab import VTAB_TASKS

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(tmp_path: Path, archive_bytes: bytes) -> Path:
    """A Hugging Face cache holding XiN0919/VTAB-1k's vtab-1k.zip, as after a download."""
    cache = tmp_path / "hf-cache"
    repo = cache / "datasets--XiN0919--VTAB-1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    blob = repo / "blobs" / hashlib.sha256(archive_bytes).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(archive_bytes)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "vtab-1k.zip").symlink_to(os.path.relpath(blob, snapshot))
    return cache


def data_cli(tmp_path: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "PETL_BENCH_CACHE": str(tmp_path / "petl-cache")}  # fmt: skip
    env.pop("PETL_BENCH_DATA", None)
    return subprocess.run(
        [sys.executable, "-m", "petl_bench.cli", "data", *args], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.fixture(scope="module")
def good_zip(tmp_path_factory) -> bytes:
    return vtab_zip(tmp_path_factory.mktemp("zip") / "vtab-1k.zip").read_bytes()


def test_get_vtab_from_an_offline_hub_cache_verifies_maps_aliases_and_reruns_as_a_no_op(tmp_path, good_zip):
    cache, root = hub_cache(tmp_path, good_zip), tmp_path / "data"
    done = data_cli(tmp_path, cache, "get", "vtab-1k", "--root", str(root))
    assert done.returncode == 0, done.stderr
    assert "19 task(s) verified" in done.stdout
    assert sorted(p.name for p in (root / "vtab-1k").iterdir()) == sorted(name for _, name, *_ in VTAB_TASKS)
    manifest = json.loads((root / "petl-bench-manifest.json").read_text())["tasks"]
    assert manifest["oxford_iiit_pet"]["folder"] == "vtab-1k/oxford_iiit_pet"  # the alias folder, renamed
    assert set(manifest["cifar"]["lists"]) == {"train800.txt", "val200.txt", "train800val200.txt", "test.txt"}
    assert manifest["cifar"]["image_count"] == 9 and len(manifest["cifar"]["images"]) == 64
    again = data_cli(tmp_path, cache, "get", "vtab-1k", "--root", str(root))
    assert again.returncode == 0 and "already verified" in again.stdout and "extracting" not in again.stderr
    listed = data_cli(tmp_path, cache, "list", "--root", str(root))
    assert listed.returncode == 0 and "vtab-1k" in listed.stdout and "yes" in listed.stdout
    # The tasks read from there; a run's data identity names the verified manifest entry.
    data = pb.TASKS.get("cifar").splits(root, "final")
    identity = datasets.data_identity(data)
    assert identity["manifest"] == datasets.entry_digest(manifest["cifar"])
    assert identity["fingerprint"] == datasets.data_identity(data)["fingerprint"], "cached, and the same"


def test_a_truncated_zip_is_one_error_and_leaves_nothing_verify_accepts(tmp_path, good_zip):
    cache, root = hub_cache(tmp_path, good_zip[: len(good_zip) // 2]), tmp_path / "data"
    done = data_cli(tmp_path, cache, "get", "vtab-1k", "--root", str(root))
    assert done.returncode == 1, "a failed download, not a usage error"
    assert done.stderr.strip().startswith("error:") and "truncated or corrupt" in done.stderr
    assert not list((root / "vtab-1k").iterdir()), "no task folder, no partial extraction"
    assert not (root / "petl-bench-manifest.json").exists()


def test_uncached_offline_is_one_error_line(tmp_path):
    done = data_cli(tmp_path, tmp_path / "empty-cache", "get", "vtab-1k", "--root", str(tmp_path / "data"))
    assert done.returncode == 2 and "not in the Hugging Face cache" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "broken,expected",
    [
        ({"missing": "dtd"}, ["1 of 200 images listed in", "1 of 1000 images listed in"]),
        ({"short": "kitti"}, ["test.txt has 710 lines, expected 711"]),
    ],
    ids=["missing-image", "wrong-line-count"],
)
def test_a_broken_copy_fails_verification_naming_the_task_and_file(tmp_path, broken, expected):
    archive = vtab_zip(tmp_path / "vtab-1k.zip", **broken).read_bytes()
    cache, root = hub_cache(tmp_path, archive), tmp_path / "data"
    done = data_cli(tmp_path, cache, "get", "vtab-1k", "--root", str(root))
    assert done.returncode == 1
    task = next(iter(broken.values()))
    problems = [line for line in done.stderr.splitlines() if line.startswith("problem:")]
    assert len(problems) == len(expected), problems  # the image is missing from val200 and from train800val200
    assert all(p.startswith(f"problem: {task}:") and e in p for p, e in zip(problems, expected))
    manifest = json.loads((root / "petl-bench-manifest.json").read_text())["tasks"]
    assert task not in manifest and len(manifest) == 18, "only what verified is fingerprinted"
    verify = data_cli(tmp_path, cache, "verify", "--root", str(root), "--suite", "vtab")
    assert verify.returncode == 1 and expected[0] in verify.stderr


def test_an_interrupted_extraction_leaves_nothing_and_a_rerun_completes(tmp_path, monkeypatch, capsys, good_zip):
    few = [t for t in VTAB_TASKS if t[1] in ("kitti", "dtd")]
    archive = vtab_zip(tmp_path / "few.zip", tasks=few)
    root = tmp_path / "data"
    tasks = [pb.TASKS.get(name) for _, name, *_ in few]
    calls = {"n": 0}
    original = zipfile.ZipFile.extract

    def interrupted(self, member, path=None, pwd=None):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return original(self, member, path, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "extract", interrupted)
    with pytest.raises(KeyboardInterrupt):
        install.install_archive(archive, root / "vtab-1k", tasks)
    assert not any((root / "vtab-1k").iterdir()), "no partial folder is left behind"
    # A kill -9 cannot clean up: its temporary folder is never read, and the next get removes it.
    stale = root / "vtab-1k" / ".partial-999999" / "vtab-1k" / "kitti"
    stale.mkdir(parents=True)
    (stale / "test.txt").write_text("images/0.png 0\n")
    with pytest.raises(UserError, match="task 'kitti' not found"):
        pb.TASKS.get("kitti").folder(root)
    monkeypatch.setattr(zipfile.ZipFile, "extract", original)
    install.install_archive(archive, root / "vtab-1k", tasks)
    assert sorted(p.name for p in (root / "vtab-1k").iterdir()) == ["dtd", "kitti"]
    checks = [datasets.check_task(task, root) for task in tasks]
    assert all(check.ok for check in checks), [c.problems for c in checks]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def local_server(tmp_path):
    """A web server on 127.0.0.1 serving tmp_path/www (what torchvision downloads from in the test)."""
    www = tmp_path / "www"
    www.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def tar_gz(path: Path, files: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as bundle:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            bundle.addfile(info, io.BytesIO(content))
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_fewshot_pets_through_torchvision_from_a_local_archive(tmp_path, monkeypatch, capsys, local_server):
    import torchvision

    www, url = local_server
    shipped = Path(pb.__file__).parent / "splits" / "few-shot" / "oxford-pets" / "annotations"
    names = {line.rsplit(" ", 1)[0] for f in shipped.iterdir() for line in f.read_text().splitlines() if line}
    read = {line.rsplit(" ", 1)[0] for f in shipped.iterdir() if f.name != "train_meta.list"  # the few-shot lists
            for line in f.read_text().splitlines() if line}  # fmt: skip
    image = png(1)
    images_md5 = tar_gz(www / "images.tar.gz", {f"images/{name}": image for name in sorted(names)})
    annotations_md5 = tar_gz(www / "annotations.tar.gz", {"annotations/test.txt": b"", "annotations/trainval.txt": b""})
    monkeypatch.setattr(
        torchvision.datasets.OxfordIIITPet,
        "_RESOURCES",
        ((f"{url}/images.tar.gz", images_md5), (f"{url}/annotations.tar.gz", annotations_md5)),
    )
    root = tmp_path / "data"
    code, stdout, stderr = run_cli(monkeypatch, capsys, "data", "get", "oxford-pets", "--root", str(root))
    assert code == 0, stderr
    folder = root / "few-shot" / "oxford-pets"
    assert (folder / "images").is_symlink(), "images are linked, not copied"
    assert (folder / "annotations" / "train_meta.list.num_shot_16.seed_2").is_file()
    entry = json.loads((root / "petl-bench-manifest.json").read_text())["tasks"]["fs_pets"]
    assert len(entry["lists"]) == 17 and entry["image_count"] == len(read)
    data = pb.TASKS.get("fs_pets").variants([4], [1])[0].splits(root, "final")
    assert len(data.eval) == 3669


def test_two_copies_with_different_images_get_different_fingerprints_and_the_report_warns(
    monkeypatch, capsys, caplog, tmp_path, tiny_plugin
):
    first = make_task_folder(tmp_path / "a" / "colours")
    second = make_task_folder(tmp_path / "b" / "colours")
    changed = next((second / "images").rglob("*.jpg"))
    Image.new("RGB", (16, 16), (1, 2, 3)).save(changed)
    for task, out in ((first, "runs/a"), (second, "runs/b"), (first, "runs/c")):
        args = ["run", "--plugin", str(tiny_plugin), "--task-dir", str(task), "--methods", "linear", "--epochs", "1",
                "--output", str(tmp_path / out), *TINY_RUN]  # fmt: skip
        code, _, stderr = run_cli(monkeypatch, capsys, *args)
        assert code == 0, stderr
    fingerprints = {out: records.load_records(tmp_path / "runs" / out)[0].data["fingerprint"] for out in "abc"}
    assert fingerprints["a"] == fingerprints["c"] != fingerprints["b"]
    code, stdout, stderr = run_cli(monkeypatch, capsys, "report", "--results", str(tmp_path / "runs"),
                                   "--out", str(tmp_path / "report"))  # fmt: skip
    assert code == 0, stderr
    assert "read different data" in caplog.text
    report = (tmp_path / "report" / "report.md").read_text()
    assert "MIXED DATA" in report and "colours (2 copies)" in report


def test_unknown_dataset_is_one_error_line(monkeypatch, capsys, tmp_path):
    code, _, stderr = run_cli(monkeypatch, capsys, "data", "get", "vtab-2k", "--root", str(tmp_path))
    assert code == 2 and "unknown dataset or suite 'vtab-2k'" in stderr


def test_manual_datasets_print_their_steps_and_verify_reports_what_is_missing(monkeypatch, capsys, tmp_path):
    code, stdout, stderr = run_cli(monkeypatch, capsys, "data", "get", "imagenet", "--root", str(tmp_path))
    assert code == 1
    assert "ILSVRC2012_img_train.tar" in " ".join(stdout.split()) and "problem: dg_imagenet" in stderr


def test_class_folder_lists_use_imagenet_1k_labels(tmp_path):
    from petl_bench.tasks.dg import index_label, wnid_labels

    folder = tmp_path / "imagenet-r"
    for wnid in ("n01443537", "n15075141"):
        (folder / wnid).mkdir(parents=True)
        (folder / wnid / "x.jpg").write_bytes(png(0))
    (folder / "README.txt").write_text("not a class")
    assert install.write_class_folder_list(folder, wnid_labels().get, "annotations/val_meta.list") == 2
    lines = (folder / "annotations" / "val_meta.list").read_text().splitlines()
    assert lines == ["n01443537/x.jpg 1", "n15075141/x.jpg 999"]
    assert index_label("17") == 17 and index_label("1000") is None and index_label("meta") is None


def test_deep_verification_decodes_every_image(tmp_path):
    from petl_bench.task import folder_task

    task = folder_task(make_task_folder(tmp_path / "colours"))
    assert datasets.check_task(task, None, deep=True).ok
    broken = next((tmp_path / "colours" / "images").rglob("*.jpg"))
    broken.write_bytes(broken.read_bytes()[:40])
    shallow, deep = datasets.check_task(task, None), datasets.check_task(task, None, deep=True)
    assert shallow.ok and not deep.ok
    assert len(deep.problems) == 1 and str(broken) in deep.problems[0] and "does not decode" in deep.problems[0]


def test_an_imagenet_variant_archive_becomes_a_verified_target_with_imagenet_1k_labels(tmp_path, local_server):
    from petl_bench.tasks.dg import class_folder_fetch, target_task, url_archive

    www, url = local_server
    files = {f"imagenet-r/{wnid}/{i}.jpg": png(i) for wnid in ("n01443537", "n01484850") for i in range(2)}
    md5 = tar_gz(www / "imagenet-r.tar", {**files, "imagenet-r/README.txt": b"about"})
    root = tmp_path / "data"
    class_folder_fetch("imagenet_r", url_archive(f"{url}/imagenet-r.tar", md5), "imagenet-r", True)(root)
    listed = (root / "imagenet-r" / "annotations" / "val_meta.list").read_text().splitlines()
    assert listed == ["n01443537/0.jpg 1", "n01443537/1.jpg 1", "n01484850/0.jpg 2", "n01484850/1.jpg 2"]
    assert datasets.check_task(target_task("imagenet_r"), root).ok
    assert not [p for p in root.iterdir() if p.name.startswith(".partial")]


def test_get_vtab_from_a_file_fetched_elsewhere_and_the_offline_message_says_how(tmp_path, good_zip):
    archive = tmp_path / "elsewhere" / "vtab-1k.zip"
    archive.parent.mkdir()
    archive.write_bytes(good_zip)
    empty_cache, root = tmp_path / "empty-hf-cache", tmp_path / "data"
    offline = data_cli(tmp_path, empty_cache, "get", "vtab-1k", "--root", str(root))
    assert offline.returncode == 2 and "data get vtab-1k --from PATH/vtab-1k.zip" in " ".join(offline.stderr.split())
    done = data_cli(tmp_path, empty_cache, "get", "vtab-1k", "--root", str(root), "--from", str(archive))
    assert done.returncode == 0, done.stderr
    assert "19 task(s) verified" in done.stdout
    wrong = data_cli(tmp_path, empty_cache, "get", "food101", "--root", str(root), "--from", str(archive))
    assert wrong.returncode == 2 and "--from works for datasets that come as one archive" in wrong.stderr


def test_get_fewshot_names_the_host_that_failed_and_goes_on(monkeypatch, capsys, tmp_path):
    import urllib.error

    import torchvision.datasets

    calls = []

    def unreachable(name):
        original = getattr(torchvision.datasets, name)

        class Unreachable(original):
            def __init__(self, *args, **kwargs):
                calls.append(name)
                raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

        return Unreachable

    for name in ("FGVCAircraft", "Food101", "Flowers102", "OxfordIIITPet"):
        monkeypatch.setattr(torchvision.datasets, name, unreachable(name))
    code, stdout, stderr = run_cli(monkeypatch, capsys, "data", "get", "fewshot", "--root", str(tmp_path / "data"))
    assert code == 1 and len(calls) == 4, "every dataset is tried"
    text = " ".join(stderr.split())
    assert "failed fgvc-aircraft: cannot download FGVCAircraft with torchvision from www.robots.ox.ac.uk" in text
    assert "from data.vision.ee.ethz.ch" in text and "Traceback" not in stderr
    assert "not downloaded: fgvc-aircraft, food101, oxford-flowers102, oxford-pets" in " ".join(stdout.split())
    assert "stanford-cars cannot be downloaded for you" in " ".join(stdout.split())


def _faulty_zip(path: Path, fault: str) -> Path:
    """A one-task zip whose first image has ``fault``: encrypted, an unknown compression method, corrupt deflate."""
    import struct

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED if fault == "compression" else zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("vtab-1k/kitti/images/a.png", png(1) * 50)
        bundle.writestr("vtab-1k/kitti/test.txt", "images/a.png 0\n")
    data = bytearray(path.read_bytes())
    central = data.index(b"PK\x01\x02")
    if fault == "encrypted":  # the general purpose flag's bit 0, in the local and the central header
        data[6] |= 0x1
        data[central + 8] |= 0x1
    if fault == "compression":
        data[8:10] = struct.pack("<H", 99)  # the local header's method
        data[central + 10 : central + 12] = struct.pack("<H", 99)
    if fault == "deflate":
        start = 30 + len("vtab-1k/kitti/images/a.png")
        data[start + 5 : start + 25] = b"\xff" * 20
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("fault", ["encrypted", "compression", "deflate"])
def test_a_broken_archive_is_one_line_exit_1_and_nothing_half_extracted(tmp_path, fault):
    archive = _faulty_zip(tmp_path / "vtab-1k.zip", fault)
    root = tmp_path / "data"
    done = data_cli(tmp_path, tmp_path / "hf", "get", "vtab-1k", "--root", str(root), "--from", str(archive))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("error:") == 1 and "download again" in done.stderr
    assert not (root / "vtab-1k").exists() or not list((root / "vtab-1k").iterdir())


def test_an_archive_larger_than_the_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil as shutil_module

    archive = vtab_zip(tmp_path / "few.zip", tasks=[t for t in VTAB_TASKS if t[1] == "kitti"])
    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(install, "declared_size", lambda path: usage.free * 2)
    with pytest.raises(UserError, match="not enough free space for extracting few.zip"):
        install.install_archive(archive, tmp_path / "data" / "vtab-1k", [pb.TASKS.get("kitti")])
    assert not list((tmp_path / "data" / "vtab-1k").iterdir())


def test_changed_data_is_not_passed_off_as_verified_and_get_repairs_it(tmp_path, good_zip, caplog):
    archive = tmp_path / "vtab-1k.zip"
    archive.write_bytes(good_zip)
    root, hf = tmp_path / "data", tmp_path / "hf"
    assert data_cli(tmp_path, hf, "get", "vtab-1k", "--root", str(root), "--from", str(archive)).returncode == 0
    image = root / "vtab-1k" / "cifar" / "images" / "test0.png"
    image.write_bytes(png(7))
    identity = datasets.data_identity(pb.TASKS.get("cifar").splits(root, "final"))
    assert identity["manifest"] is None and "does not match test.txt" in identity["manifest_mismatch"]
    assert "does not match test.txt" in caplog.text
    (root / "vtab-1k" / "cifar" / "images" / "test1.png").unlink()
    verify = data_cli(tmp_path, hf, "verify", "--root", str(root), "--tasks", "cifar")
    assert verify.returncode == 1
    manifest = json.loads((root / "petl-bench-manifest.json").read_text())["tasks"]
    assert "cifar" not in manifest and len(manifest) == 18, "a task that fails verify loses its entry"
    repaired = data_cli(tmp_path, hf, "get", "vtab-1k", "--root", str(root), "--from", str(archive))
    assert (
        repaired.returncode == 0
        and "already verified" not in repaired.stdout
        and "19 task(s) verified" in repaired.stdout
    )
