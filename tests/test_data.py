"""File lists, validation messages, and the decoded cache's exactness."""

from __future__ import annotations

import pytest
import torch
from conftest import OFFLINE_DATA, make_task_folder
from PIL import Image

import petl_bench as pb
from petl_bench.data import Normalizer, TensorDataset, decoded_images, kept_on_devices, on_device, read_split
from petl_bench.errors import UserError
from petl_bench.task import folder_task


def test_cache_equals_torchvision_decoding_every_epoch(tmp_path, monkeypatch):
    from torchvision import transforms

    monkeypatch.setenv("PETL_BENCH_CACHE", str(tmp_path / "cache"))
    folder = make_task_folder(tmp_path / "task", train=12, test=4, size=37)
    split = read_split("train", folder / "train800val200.txt", folder, 4)
    pipeline = transforms.Compose([
        transforms.Resize((24, 24), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])  # fmt: skip
    expected = torch.stack([pipeline(Image.open(p).convert("RGB")) for p in split.files()])
    normalizer = Normalizer((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    cached = normalizer(decoded_images(split, (24, 24), "bicubic"))
    torch.testing.assert_close(cached, expected, rtol=0, atol=0)
    again = decoded_images(split, (24, 24), "bicubic")  # served from the cache
    assert torch.equal(again, decoded_images(split, (24, 24), "bicubic"))
    assert len(list((pb.data.cache_dir() / "decoded").glob("*.npy"))) == 1


def test_cache_key_changes_with_size_and_content(tmp_path, monkeypatch):
    monkeypatch.setenv("PETL_BENCH_CACHE", str(tmp_path / "cache"))
    folder = make_task_folder(tmp_path / "task", train=8, test=4)
    split = read_split("train", folder / "train800val200.txt", folder, 4)
    decoded_images(split, (8, 8), "bicubic")
    decoded_images(split, (12, 12), "bicubic")
    Image.new("RGB", (16, 16), (255, 0, 0)).save(folder / split.paths[0])
    changed = decoded_images(split, (8, 8), "bicubic")
    assert len(list((pb.data.cache_dir() / "decoded").glob("*.npy"))) == 3
    assert changed[0, 0].float().mean() > 250


def test_a_split_stays_on_its_device_for_the_next_run_that_reads_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PETL_BENCH_CACHE", str(tmp_path / "cache"))
    folder = make_task_folder(tmp_path / "task", train=8, test=4)
    train = read_split("train", folder / "train800val200.txt", folder, 4)
    test = read_split("test", folder / "test.txt", folder, 4)
    device = torch.device("meta")  # a device that is not the CPU; nothing is allocated

    def load(role, split, size=(8, 8), **kwargs):
        return on_device(role, split, size, "bicubic", device, **kwargs)

    first = load("train", train)
    assert first.images.device == device and load("train", train) is not first, "kept only inside a sweep"
    with kept_on_devices():
        first = load("train", train)
        assert load("train", train) is first and load("eval", test) is load("eval", test), "a seed after another"
        assert load("train", train, (12, 12)) is not first, "other images (another size) replace the kept ones"
        assert load("train", train, (12, 12)).images.shape[-1] == 12
        assert load("eval", train, fits=lambda data: False).images.device.type == "cpu", "not moved when too big"
    assert load("train", train, (12, 12)) is not load("train", train, (12, 12)), "dropped after the sweep"
    on_cpu = on_device("train", train, (8, 8), "bicubic", torch.device("cpu"))
    assert torch.equal(on_cpu.images, decoded_images(train, (8, 8), "bicubic"))


def test_batches_drop_last_and_seeded_shuffle():
    data = TensorDataset(torch.arange(10).view(10, 1, 1, 1).to(torch.uint8), torch.arange(10))
    batches = list(data.batches(4, shuffle=True, generator=torch.Generator().manual_seed(0), drop_last=True))
    assert [len(b[1]) for b in batches] == [4, 4]
    again = list(data.batches(4, shuffle=True, generator=torch.Generator().manual_seed(0), drop_last=True))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    assert [len(b[1]) for b in data.batches(4)] == [4, 4, 2]


@pytest.mark.parametrize(
    "line,message",
    [
        ("images/train/000000.jpg", r"train800val200.txt:3: malformed line"),
        ("images/train/000000.jpg seven", r"train800val200.txt:3: malformed line"),
        ("images/train/000000.jpg 9", r"train800val200.txt:3: label 9 outside \[0, 4\)"),
        (
            "images/train/nope.jpg 1",
            r"1 of 41 images listed in .*train800val200.txt are missing: .*nope.jpg \(line 3\)",
        ),
    ],
)
def test_list_errors_name_the_file_and_line(tmp_path, line, message):
    folder = make_task_folder(tmp_path / "task")
    lines = (folder / "train800val200.txt").read_text().splitlines()
    lines.insert(2, line)
    (folder / "train800val200.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=message):
        read_split("train", folder / "train800val200.txt", folder, 4)


def test_paths_with_spaces_split_on_the_last_space(tmp_path):
    (tmp_path / "my images").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "my images" / "a b.png")
    (tmp_path / "list.txt").write_text("my images/a b.png 3\n")
    split = read_split("list", tmp_path / "list.txt", tmp_path, 5)
    assert split.paths == ("my images/a b.png",) and split.labels == (3,)


def test_vtab_task_folder_aliases_and_missing_data_message(tmp_path, caplog):
    cifar = pb.TASKS.get("cifar100")
    assert cifar.name == "cifar" and cifar.num_classes == 100
    with pytest.raises(UserError, match=r"task 'cifar' not found under .* \(looked for .*cifar, .*cifar100\).*NOAH"):
        cifar.splits(tmp_path, "final")
    with pytest.raises(UserError, match="needs a data root: pass --data-root PATH, set PETL_BENCH_DATA"):
        cifar.splits(None, "final")
    make_task_folder(tmp_path / "cifar100", classes=4)
    data = cifar.splits(tmp_path, "final")
    assert len(data.train) == 40 and data.eval.name == "test"
    assert "train800val200.txt has 40 images; the protocol expects 1000" in caplog.text
    with pytest.raises(UserError, match=r"has 40 images; the protocol expects 1000 \(--strict\)"):
        cifar.splits(tmp_path, "final", strict=True)
    tune = cifar.splits(tmp_path, "tune")
    assert (len(tune.train), len(tune.eval), tune.eval.name) == (32, 8, "val200")


def test_folder_task_infers_classes_or_reads_classes_txt(tmp_path):
    folder = make_task_folder(tmp_path / "mine", classes=3)
    assert folder_task(folder).num_classes == 3
    (folder / "classes.txt").write_text("a\nb\nc\nd\ne\n")
    assert folder_task(folder).num_classes == 5
    with pytest.raises(UserError, match="has neither train800val200.txt nor train.txt"):
        folder_task(tmp_path)


@pytest.mark.skipif(not (OFFLINE_DATA / "cifar10_vtab1k_style").is_dir(), reason="../shared/offline_data is absent")
def test_real_cifar10_lists_validate():
    task = folder_task(OFFLINE_DATA / "cifar10_vtab1k_style")
    data = task.splits(None, "final")
    assert task.num_classes == 10 and len(data.train) == 1000 and len(data.eval) == 1000


def test_a_corrupt_image_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("PETL_BENCH_CACHE", str(tmp_path / "cache"))
    folder = make_task_folder(tmp_path / "task", train=8, test=4)
    split = read_split("train", folder / "train800val200.txt", folder, 4)
    (folder / split.paths[3]).write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(UserError, match=r"cannot decode image .*000003.jpg"):
        decoded_images(split, (8, 8), "bicubic")
    assert not list((tmp_path / "cache" / "decoded").glob("*.npy")), "nothing half-written looks cached"
