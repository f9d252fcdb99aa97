"""The task contract: a named benchmark task that finds, validates and returns its splits.

Protocols pick the splits: ``final`` and ``paper`` train on train+val and evaluate on test (``paper``
evaluates test periodically and reports the max, as the official code did); ``tune`` trains on train
and evaluates on val.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import Recipe
from .data import Split, check_size, list_problems, read_split
from .errors import UserError
from .records import variant_key

PROTOCOLS = ("final", "paper", "tune")  # what `run --protocol` takes
SPLIT_PROTOCOLS = (*PROTOCOLS, "tuned")  # "tuned": stage 2 of `petl-bench tune`, the splits of "final"


@dataclass(frozen=True)
class EvalTarget:
    """A further evaluation split (domain generalisation targets). ``classes``: the classes it covers,
    when fewer than the task's (ImageNet-A/-R cover 200 of ImageNet's 1000)."""

    split: Split
    classes: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TaskData:
    """What one run trains and evaluates on."""

    train: Split
    eval: Split
    num_classes: int
    targets: dict[str, EvalTarget] = field(default_factory=dict)
    class_names: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ListNames:
    """List-file names of a task folder."""

    train: str = "train800.txt"
    val: str = "val200.txt"
    trainval: str = "train800val200.txt"
    test: str = "test.txt"


@dataclass(frozen=True)
class ReportLayout:
    """How the report tabulates a suite's runs, and which published numbers it prints beside them.

    ``kind``: ``tasks`` (a column per task, group means and averages), ``shots`` (per dataset a column per
    number of shots, and the average over the datasets) or ``targets`` (the source task and each evaluation
    target). The reference CSVs (``results/reference``) are printed only for runs on ``reference_backbone``
    at ``reference_size`` px, where the published numbers were measured (``shots`` and ``targets`` tables
    print theirs always, as the paper's figure and table they come from)."""

    kind: str = "tasks"
    title: str = ""  # the suite's name in table titles (default: the suite's name)
    paper: str | None = None  # the reference paper's table (CSV)
    published: tuple[str, ...] = ()  # other publications' rows (CSV, each row naming its source)
    reference_backbone: str | None = None
    reference_size: int = 224
    backbone_paper: str | None = None  # tasks: a table of group means per backbone, beside this CSV
    paper_names: tuple[tuple[str, str], ...] = ()  # shots: (task, its name in the paper's CSV)
    targets: tuple[str, ...] = ()  # targets: the evaluation targets, in column order
    source: str = ""  # targets: the source task's column (default: the task's name)


@dataclass(frozen=True)
class Suite:
    """A named set of tasks with the defaults a run of it uses, and how the report shows it."""

    name: str
    description: str
    backbone: str
    methods: tuple[str, ...]  # default methods; empty: every registered method
    recipe: Recipe
    tasks: tuple[str, ...] = ()  # default tasks; empty: every registered task of this suite
    seeds: tuple[int, ...] = (0,)
    report: ReportLayout = ReportLayout()


@dataclass
class FileListTask:
    """A task stored as ``<folder>/{lists}`` plus images, e.g. one VTAB-1K task in NOAH's layout."""

    name: str
    suite: str
    num_classes: int
    group: str = ""
    aliases: tuple[str, ...] = ()  # other folder names of the same data
    sizes: dict[str, int] = field(default_factory=dict)  # expected size per list file name
    lists: ListNames = ListNames()
    how_to_get: str = ""
    description: str = ""
    location: Path | None = None  # a fixed folder (bring-your-own and generated tasks) instead of data_root
    parents: tuple[str, ...] = ("vtab-1k",)  # sub-folders of data_root that may hold the task folder
    image_dir: str = ""  # images live under <folder>/<image_dir>
    image_dirs: dict[str, str] = field(default_factory=dict)  # per list file, overriding image_dir
    variant: dict[str, int] = field(default_factory=dict)  # e.g. {"shots": 4, "split_seed": 1}

    def evaluation_sets(self) -> list[str]:
        """What a run of this task is evaluated on (``final`` protocol), for ``petl-bench tasks``."""
        return [f"{Path(self.lists.test).name} (trained on {Path(self.lists.trainval).name})"]

    def variants(self, shots: list[int] | None = None, split_seeds: list[int] | None = None) -> list["FileListTask"]:
        """The concrete tasks a run trains on (few-shot tasks expand to shots x split seeds)."""
        return [self]

    @property
    def key(self) -> str:
        """The task's name plus its variant, e.g. ``fs_pets-shots4-split_seed1``."""
        return variant_key(self.name, self.variant)

    def folder(self, data_root: Path | None) -> Path:
        """The task's folder under ``data_root``; accepts the folder aliases other repositories use."""
        if self.location is not None:
            return self.location
        if data_root is None:
            raise UserError(
                f"task '{self.name}' needs a data root: pass --data-root PATH, set PETL_BENCH_DATA, or get the data "
                f"with 'petl-bench data get'. {self.how_to_get}"
            )
        names = (self.name, *self.aliases)
        candidates = [data_root / name for name in names]
        candidates += [data_root / parent / name for parent in self.parents for name in names]
        for candidate in candidates:
            if candidate.is_dir():
                return candidate
        looked = ", ".join(str(c) for c in candidates)
        raise UserError(f"task '{self.name}' not found under {data_root} (looked for {looked}). {self.how_to_get}")

    def present(self, data_root: Path | None) -> bool:
        """The task's folder is there (nothing is created or generated to find out)."""
        try:
            self.folder(data_root)
            return True
        except UserError:
            return False

    def _list_args(self, folder: Path, list_name: str) -> tuple:
        image_root = folder / self.image_dirs.get(list_name, self.image_dir)
        name = Path(list_name).name.removesuffix(".txt")
        return name, folder / list_name, image_root, self.num_classes, self.how_to_get

    def read(self, folder: Path, list_name: str, strict: bool) -> Split:
        split = read_split(*self._list_args(folder, list_name))
        check_size(split, self.sizes.get(list_name), strict)
        return split

    def check_list(self, folder: Path, list_name: str) -> tuple[Split | None, list[str]]:
        """(the split of the good lines or None, every problem of the list file), for ``data verify``."""
        return list_problems(*self._list_args(folder, list_name))

    def splits(self, data_root: Path | None, protocol: str, strict: bool = False) -> TaskData:
        if protocol not in SPLIT_PROTOCOLS:
            raise UserError(f"unknown protocol '{protocol}'; choose from: {', '.join(PROTOCOLS)}")
        folder = self.folder(data_root)
        train_list, eval_list = (
            (self.lists.train, self.lists.val) if protocol == "tune" else (self.lists.trainval, self.lists.test)
        )
        return TaskData(self.read(folder, train_list, strict), self.read(folder, eval_list, strict), self.num_classes)


def folder_task(path: str | Path) -> FileListTask:
    """A bring-your-own task from a folder with ``train800val200.txt``/``test.txt`` style lists
    (or ``train.txt``/``test.txt`` with an optional ``val.txt``). Classes: ``classes.txt`` (one name per
    line) when present, else one more than the largest label."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"--task-dir {folder} is not a folder")
    if (folder / "train800val200.txt").is_file():
        lists = ListNames()
    elif (folder / "train.txt").is_file():
        lists = ListNames(train="train.txt", val="val.txt", trainval="train.txt", test="test.txt")
    else:
        raise UserError(f"{folder} has neither train800val200.txt nor train.txt (lines '<image path> <label>')")
    classes_file = folder / "classes.txt"
    if classes_file.is_file():
        num_classes = len([line for line in classes_file.read_text().splitlines() if line.strip()])
    else:
        labels = []
        for name in {lists.trainval, lists.test, lists.train, lists.val}:
            if (folder / name).is_file():
                labels += [read_split(name, folder / name, folder, None).labels]
        num_classes = max(max(group) for group in labels) + 1
    return FileListTask(name=folder.name, suite="custom", num_classes=num_classes, lists=lists, location=folder)
